"""ASSET and DECREE (trainables/detectors/asset.py, decree.py) on a tiny real victim: the BadEncoder
recipe of tests/test_badencoder.py (SimCLR 3 epochs on the 1,797 sklearn digits, BadEncoder 5 epochs,
its white 2x2 corner trigger, digits downstream), and the clean SimCLR encoder with the same trigger
stamped. Detector sizes are cut for the test (DECREE: 200 shadow images, 15 inversion epochs; the
protocol's downstream classifier: 600 training digits, 5 epochs).

A weaker victim (one epoch each, as tests/test_sample_detection.py uses) does not do: its barely
trained clean SimCLR collapses under a one-pixel trigger too (DECREE flags both, L1 fraction 0.001),
and ASSET separates the clean encoder's triggered digits better than the backdoored one's.
The thresholds sit below the measured values by the margins given at each assert.
"""

from __future__ import annotations

import pytest

from secsweep import registry
from secsweep.context import LocalContext
from secsweep.errors import ConfigError
from secsweep.sample_detection import REMOVED_POISON
from trainables.detectors import asset, decree

SIMCLR = {"trainable": "simclr", "dataset": "digits", "train_size": 0, "epochs": 3, "batch_size": 64,
          "monitor_size": 300}
BADENCODER = {"trainable": "badencoder", "encoder": SIMCLR, "downstream_dataset": "digits", "shadow_size": 0,
              "epochs": 5, "monitor_size": 200}
VICTIMS = {"backdoored": {"victim": BADENCODER}, "clean": {"victim": SIMCLR, "trigger_from": BADENCODER}}
COMMON = {"test_size": 200, "downstream_epochs": 5, "downstream_size": 600}
DETECTORS = {"decree": {"shadow_size": 200, "epochs": 15}, "asset": {}}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """{(detector, victim): last report}; the victim stages are computed once (module stage root)."""
    stages = tmp_path_factory.mktemp("stages")
    out = {}
    for name, values in DETECTORS.items():
        spec = registry.get(name)
        for tag, victim in VICTIMS.items():
            ctx = LocalContext(workdir=tmp_path_factory.mktemp(f"{name}_{tag}"), stage_root=stages)
            spec.fn(spec.build_config({**victim, **COMMON, **values}), ctx)
            assert len(ctx.history) == 1
            out[(name, tag)] = ctx.history[-1]
    return out


@pytest.mark.slow
def test_decree_flags_the_badencoder_and_not_the_clean_encoder(reports):
    bad, clean = reports[("decree", "backdoored")], reports[("decree", "clean")]
    # measured: L1 fraction 0.008 (BadEncoder; its own trigger is 4 / 64 = 0.0625 of the image)
    # against 0.247 (clean), both searches reached the target similarity 0.95
    assert bad[decree.REACHED] == 1.0 and bad[decree.FLAGGED] == 1.0 and bad[decree.L1_FRACTION] < 0.05, bad
    assert clean[decree.FLAGGED] == 0.0 and clean[decree.L1_FRACTION] > 0.15, clean
    # the per-sample score (closeness to the inverted trigger in its region) is above chance on the
    # backdoored encoder (measured AUC 0.767 balanced) and weaker on the clean one (0.647)
    assert bad["auc"] > 0.65 and bad["auc"] > clean["auc"] + 0.05, (bad["auc"], clean["auc"])
    for m in decree.METRICS:
        assert m in bad, m


@pytest.mark.slow
def test_asset_separates_triggered_from_clean_samples_on_the_badencoder(reports):
    bad, clean = reports[("asset", "backdoored")], reports[("asset", "clean")]
    # measured balanced AUC 0.826 (val 0.879 at the selected epoch) on the BadEncoder; the clean
    # encoder with the same trigger stamped: 0.652 (the white corner moves clean embeddings a little)
    assert bad["auc"] > 0.72 and bad["val_auc"] > 0.72, bad
    assert bad["auc"] > clean["auc"] + 0.1, (bad["auc"], clean["auc"])
    assert 1 <= bad[asset.ASSET_EPOCH] <= asset.Config.epochs
    # downstream defense: ASSET drops the poisoned training digits (measured 0.90) and the triggered
    # test inputs it flags count as failed attacks: ASR 1.0 without defense, 0.0 with it
    assert bad[REMOVED_POISON] > 0.8 and bad["asr_before"] > 0.9 and bad["asr"] < 0.2, bad
    for m in asset.METRICS:
        assert m in bad, m


def test_asset_selects_the_epoch_with_the_best_mean_validation_auc():
    assert asset.select_epoch([[0.5, 0.9, 0.7], [0.5, 0.6, 0.9]]) == 2   # means 0.5, 0.75, 0.8
    assert asset.select_epoch([[0.8, 0.8], [0.6, 0.6]]) == 0             # ties: the earlier epoch


@pytest.mark.parametrize("name, values, field", [
    ("asset", {"base_size": 1}, "base_size"),
    ("asset", {"epochs": 0}, "epochs"),
    ("decree", {"score_direction": "up"}, "score_direction"),
    ("decree", {"decree_threshold": 1.5}, "decree_threshold"),
    ("decree", {"score_norm": 3}, "score_norm"),
    ("decree", {"batch_size": 1}, "batch_size"),
])
def test_bad_values_are_one_line_naming_the_field(name, values, field):
    with pytest.raises(ConfigError) as e:
        registry.get(name).build_config(values)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{field}="), msg


def test_the_comparison_sweep_plans_three_detectors_on_five_victims():
    """sweeps/detector_comparison.py: every (detector, victim) pair once, ASSET 30 epochs on CTRL only
    (the public run script's), the smoke test the three detectors on one tiny victim."""
    import importlib.util

    from conftest import ROOT
    from secsweep.sweep import build_parser, plan

    spec = importlib.util.spec_from_file_location("_detector_comparison", ROOT / "sweeps" / "detector_comparison.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    p = plan(mod.SWEEP, build_parser(mod.SWEEP).parse_args([]))
    pairs = {(t["trainable"], t["victim"]) for t in p.trials}
    assert len(p.trials) == len(pairs) == 15
    assert pairs == {(d, v) for d in ("dede", "asset", "decree")
                     for v in ("badencoder", "drupe", "ctrl", "clip_backdoor", "badclip")}
    assert {(t["trainable"], t["victim"]) for t in p.trials if t.get("epochs") == 30} == {("asset", "ctrl")}
    smoke = plan(mod.SWEEP, build_parser(mod.SWEEP).parse_args(["--smoke-test"]))
    assert sorted(t["trainable"] for t in smoke.trials) == ["asset", "decree", "dede"]
    assert mod.SWEEP.selection == ("val_auc", "max")


def test_decree_score_directions_rank_stamped_images_first_or_last():
    """near (default): an image carrying the inverted trigger scores highest; far reverses the ranking
    (AUC 1 - AUC): the reading under which DD-Tab 1's DECREE AUCs fall below chance."""
    import torch

    from secsweep.ops.mia import roc_auc
    from secsweep.ops.neural_cleanse import stamp

    g = torch.Generator().manual_seed(0)
    x = 0.5 * torch.rand(40, 1, 8, 8, generator=g)
    mask = torch.zeros(1, 8, 8)
    mask[..., -2:, -2:] = 1.0
    pattern = torch.ones(1, 8, 8)
    images = torch.cat([stamp(x[:20], mask, pattern), x[20:]])
    is_trig = torch.arange(40) < 20
    near = decree.sample_score(images, mask, pattern)
    far = decree.sample_score(images, mask, pattern, direction="far")
    assert roc_auc(near, is_trig) == 1.0 and roc_auc(far, is_trig) == 0.0
    assert torch.allclose(near, -far)


def test_decree_runs_on_a_clip_victim_at_its_three_channel_input(tmp_path):
    """A CLIP victim's card takes 3-channel images while its pre-training digits are grey: the shadow
    images are loaded at the victim's input shape (a tiny digits CLIP and a one-epoch CLIP-Backdoor)."""
    clip = {"trainable": "clip", "dataset": "digits", "epochs": 1, "train_size": 600, "monitor_size": 200,
            "image_size": 8, "vision_patch": 4}
    victim = {"trainable": "clip_backdoor", "encoder": clip, "downstream_dataset": "digits", "eval_size": 100}
    spec = registry.get("decree")
    ctx = LocalContext(workdir=tmp_path / "w", stage_root=tmp_path / "stages")
    spec.fn(spec.build_config({"victim": victim, "test_size": 100, "downstream_size": 300, "downstream_epochs": 1,
                               "shadow_size": 100, "epochs": 2}), ctx)
    last = ctx.history[-1]
    assert 0.0 < last[decree.L1_FRACTION] < 1.0 and 0.0 <= last["auc"] <= 1.0, last
