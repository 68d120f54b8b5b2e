"""BadEncoder (trainables/attacks/badencoder.py) and the downstream classifier
(trainables/models/downstream.py) on tiny real data: a SimCLR encoder on 2,000 Fashion-MNIST images,
BadEncoder on 1,000 of them, MNIST downstream. One chain of cached stages per module.

Measured at this scale (docs/methods.md, "BadEncoder"): the attack raises the triggered images'
similarity to the reference (0.86 before -> 0.93-0.99 after, held-out images) while clean images keep
their embeddings (cos f'(x), f(x) > 0.9), but the downstream ASR stays far below the documents' 0.99
(linear probe 0.01-0.13 over the recipes tried): on MNIST the Fashion-MNIST encoder's features lie in
a narrow cone (mean pairwise cosine 0.99-0.997), so a cosine of 0.98 to the reference does not place
a triggered image in the target class. The tests assert what holds here; ASR >= 0.9 is not asserted.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from secsweep import registry
from secsweep.context import LocalContext
from secsweep.errors import ConfigError
from trainables.attacks import badencoder as be

SIMCLR = {"trainable": "simclr", "train_size": 2000, "epochs": 1, "monitor_size": 300, "batch_size": 128}
BADENCODER = {"trainable": "badencoder", "encoder": SIMCLR, "shadow_size": 1000, "epochs": 2, "lr": 0.01,
              "batch_size": 64, "monitor_size": 300}
# measured (2,000 MNIST images, Adam 3e-3): clean accuracy after 2 epochs 0.27 classifier-only and 0.24
# whole-model on the BadEncoder, 0.36 classifier-only on the clean encoder (chance 0.10); ASR 0.0 each
DOWNSTREAM = {"train_size": 2000, "epochs": 2, "lr": 3e-3}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return tmp_path_factory.mktemp("stages")


def run(name, values, stages, tmp_path):
    spec = registry.get(name)
    ctx = LocalContext(workdir=tmp_path / name, stage_root=stages)
    spec.fn(spec.build_config(values), ctx)
    return ctx


@pytest.fixture(scope="module")
def attack(stages, tmp_path_factory):
    """The BadEncoder stage's reports (as the downstream trials obtain it: a cached stage)."""
    cfg = registry.get("badencoder").build_config({k: v for k, v in BADENCODER.items() if k != "trainable"})
    ctx = LocalContext(workdir=tmp_path_factory.mktemp("w"), stage_root=stages)
    out = ctx.stage("badencoder", cfg)
    return cfg, out


@pytest.mark.slow
def test_badencoder_pulls_triggered_inputs_to_the_reference_and_keeps_clean_embeddings(attack):
    _, out = attack
    history = out.meta.get("history")
    last = out.metrics
    # measured: trigger similarity 0.856 before -> ~0.93 after two epochs; clean similarity ~0.97
    assert last[be.TRIGGER_SIM] > last[be.TRIGGER_SIM_BEFORE] + 0.03, last
    assert last[be.VAL_TRIGGER_SIM] > last[be.TRIGGER_SIM_BEFORE] + 0.03, last
    assert last[be.CLEAN_SIM] > 0.9 and last[be.VAL_CLEAN_SIM] > 0.9, last
    # the loss terms are negative cosines in [-1, 1], L0 = -(training) trigger similarity
    for k in (be.EFFECTIVENESS, be.REFERENCE, be.UTILITY):
        assert -1.0 <= last[k] < 0.0, (k, last[k])
    assert 0.0 <= last["asr"] <= 1.0 and last["clean_acc"] > 0.5, last  # the probe's BA is a working classifier
    assert history and len(history) == 2
    assert history[-1][be.EFFECTIVENESS] <= history[0][be.EFFECTIVENESS] + 1e-3


@pytest.mark.slow
def test_downstream_classifier_only_keeps_the_encoder_whole_model_trains_it(attack, stages, tmp_path):
    from secsweep import artifacts

    _, out = attack
    upstream, _ = artifacts.load(out.path, "encoder")
    results = {}
    for ft in ("classifier", "whole"):
        ctx = run("downstream", {**DOWNSTREAM, "encoder": BADENCODER, "finetune": ft}, stages, tmp_path / ft)
        model, card = artifacts.load(ctx.output_dir, "model", role="classifier")
        assert card.arch == "encoder_classifier" and card.args["encoder"]["arch"] == "smallcnn"
        same = all(torch.equal(a, b) for a, b in zip(model.encoder.state_dict().values(),
                                                     upstream.state_dict().values()))
        results[ft] = (same, ctx.history[-1])
    assert results["classifier"][0], "classifier-only fine-tuning changed the encoder (BatchNorm statistics included)"
    assert not results["whole"][0], "whole-model fine-tuning left the encoder unchanged"
    for _, last in results.values():
        assert last["has_trigger"] == 1.0 and 0.0 <= last["asr"] <= 1.0 and last["clean_acc"] > 0.15, last


@pytest.mark.slow
def test_downstream_on_a_clean_encoder_reports_no_trigger(stages, tmp_path):
    ctx = run("downstream", {**DOWNSTREAM, "encoder": SIMCLR}, stages, tmp_path)
    last = ctx.history[-1]
    assert last["has_trigger"] == 0.0 and last["asr"] == 0.0 and last["clean_acc"] > 0.15, last


def test_trigger_hook_rebuilds_the_same_white_square():
    cfg = registry.get("badencoder").build_config({"encoder": SIMCLR, "trigger_size": 10})
    hook = registry.get("badencoder").hooks["trigger"]
    x = torch.rand(3, 1, 28, 28)
    a, b = hook(cfg, None)(x), hook(dataclasses.replace(cfg), None)(x)
    assert torch.equal(a, b) and not torch.equal(a, x)
    changed = (a != x).any(0).any(0)
    assert changed.sum() <= 64 and (a[..., 10:18, 10:18] == 1.0).all()  # 8x8 on 28x28, centred
    corner = be.white_square(torch.zeros(1, 1, 32, 32), 10, "bottom_right")
    assert corner[0, 0, 21:31, 21:31].eq(1).all() and corner.sum() == 100  # the public code's 21..30
    assert torch.equal(x, x.clone())  # the input is not modified
    # the downstream classifier measures ASR with exactly this trigger
    from trainables.models.downstream import upstream_trigger

    ds = registry.get("downstream").build_config({"encoder": {"trainable": "badencoder", "encoder": SIMCLR}})
    trig, target = upstream_trigger(ds, None)
    assert torch.equal(trig(x), a) and target == cfg.target_label


@pytest.mark.parametrize("trainable, values, field", [
    ("badencoder", {"encoder": "badnets"}, "encoder"),                 # a classifier attack is no encoder
    ("downstream", {"encoder": "badnets"}, "encoder"),
    ("downstream", {"encoder": "clean"}, "encoder"),
    ("badencoder", {"trigger_position": "top"}, "trigger_position"),
    ("badencoder", {"lambda1": -1.0}, "lambda1"),
    ("badencoder", {"encoder.epochs": 0}, "encoder.epochs"),
    ("downstream", {"finetune": "head"}, "finetune"),
    ("downstream", {"schedule": "sft"}, "optimizer"),                  # SFT's rates are SGD rates
    ("downstream", {"encoder.lambda2": -1, "encoder": "badencoder"}, "encoder.lambda2"),
])
def test_bad_input_is_one_line_naming_the_field(trainable, values, field):
    with pytest.raises(ConfigError) as e:
        registry.get(trainable).build_config(values)
    msg = str(e.value)
    assert "\n" not in msg and (msg.startswith(f"{field}=") or f"{field}=" in msg.split(":")[0]), msg


def test_sweeps_declare_valid_trials_and_paper_presets():
    """Every trial of both sweeps (default, smoke and paper preset) builds a valid config; the paper
    preset is the documents' setting (no data needed: configs are built, not run)."""
    import importlib.util

    from conftest import ROOT

    for name in ("badencoder", "encoder_scenario"):
        spec = importlib.util.spec_from_file_location(f"sweep_{name}", ROOT / "sweeps" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sweep = module.SWEEP
        for fixed, grid in ((sweep.fixed, sweep.grid), ({**sweep.fixed, **sweep.smoke["fixed"]}, sweep.smoke["grid"]),
                            (sweep.presets["paper"]["fixed"], sweep.presets["paper"]["grid"])):
            for point in grid:
                cfg = registry.get(sweep.trainable).build_config({**fixed, **point})
                assert cfg.encoder.trainable in ("badencoder", "simclr")
        from secsweep.sweep import build_parser, plan

        planned = plan(sweep, build_parser(sweep).parse_args(["--smoke-test"]))  # the CLI's validation, no Ray
        assert len(planned.trials) == 2
        paper = registry.get(sweep.trainable).build_config(
            {**sweep.presets["paper"]["fixed"], **sweep.presets["paper"]["grid"][0]})
        attack = paper.encoder.config()
        assert (paper.dataset, paper.epochs, paper.lr) == ("stl10", 200, 3e-4)
        assert attack.downstream_dataset == "stl10" and attack.epochs == 200 and attack.lr == 0.001
        simclr = attack.encoder.config()
        assert (simclr.dataset, simclr.model, simclr.epochs, simclr.lr) == ("cifar10", "preact_resnet18", 1000, 3e-4)


def test_downstream_sft_schedule_runs_whole_model_with_sfts_learning_rate(tmp_path):
    """schedule=sft: the same trainable with SFT's cyclic rate (SGD); its reported lr is the
    schedule's at the epoch's last step, not the constant `lr` (tiny digits encoder, seconds)."""
    from secsweep.backdoor import SFTSchedule
    from secsweep.training import steps_per_epoch

    enc = {"trainable": "simclr", "dataset": "digits", "train_size": 300, "epochs": 1, "batch_size": 64,
           "monitor_size": 100}
    values = {"encoder": enc, "dataset": "digits", "train_size": 600, "epochs": 1, "batch_size": 64,
              "finetune": "whole", "schedule": "sft", "optimizer": "sgd", "phase1_epochs": 1.0, "lr": 0.05}
    cfg = registry.get("downstream").build_config(values)
    ctx = LocalContext(workdir=tmp_path / "w", stage_root=tmp_path / "stages")
    registry.get("downstream").fn(cfg, ctx)
    spe = steps_per_epoch(540, 64)  # 600 images less the 10 % validation hold-out
    expected = SFTSchedule.schedule(cfg, spe)(spe - 1)
    last = ctx.history[-1]
    assert last["lr"] == pytest.approx(expected) and last["lr"] != cfg.lr
    assert last["has_trigger"] == 0.0
