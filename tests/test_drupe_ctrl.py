"""DRUPE (trainables/attacks/drupe.py) and CTRL (trainables/attacks/ctrl.py) on tiny real data:
the 1,797 real sklearn digits (8x8), one SimCLR encoder pre-trained 3 epochs on them (shared: it is
DRUPE's and BadEncoder's clean encoder and CTRL's clean baseline), digits downstream.

* DRUPE and BadEncoder at the same recipe (BadEncoder's offline default with 50 references, 5
  epochs over the digits): DRUPE implants (downstream ASR high, BA near the clean encoder's CA), and
  its backdoor embeddings are closer in distribution to the clean embeddings than BadEncoder's,
  measured with both distances (SWD, which DRUPE trains on, and MMD, which it does not).
* CTRL: the trigger is invisible (largest per-pixel change, PSNR), and the poisoned pre-training
  (SimCLR, same recipe, 9 % poison) is compared with the clean encoder on the rate at which
  triggered inputs land in the target class: at this scale it does not raise it (CTRL needs long
  pre-training), and the test asserts that. The measured numbers are in docs/methods.md ("DRUPE",
  "CTRL"); thresholds sit below them by the margins given at each assert.
"""

from __future__ import annotations

import pytest
import torch

from secsweep import registry
from secsweep.context import LocalContext
from secsweep.errors import ConfigError
from secsweep.refs import StageRef
from trainables.attacks import badencoder as be
from trainables.attacks import ctrl, drupe

SIMCLR = {"dataset": "digits", "train_size": 0, "epochs": 3, "batch_size": 64, "monitor_size": 300}
RECIPE = {"encoder": {"trainable": "simclr", **SIMCLR}, "downstream_dataset": "digits", "shadow_size": 0,
          "epochs": 5, "monitor_size": 200, "n_reference": 50}
# 9 % of the 1,294 pre-training digits: 116 of the 125 images of class 0 (1 % changed nothing measurable)
CTRL = {**SIMCLR, "downstream_dataset": "digits", "poison_rate": 0.09}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return LocalContext(workdir=tmp_path_factory.mktemp("w"), stage_root=tmp_path_factory.mktemp("stages"))


def _stage(ctx, name, values):
    cfg = registry.get(name).build_config(values)
    out = ctx.stage(name, cfg)
    encoder, _ = ctx.load_model(StageRef(name, values), role="encoder")
    return cfg, out.metrics, encoder


@pytest.fixture(scope="module")
def victims(ctx):
    """{name: (cfg, last report, encoder)} for badencoder, drupe, and the clean encoder's probe."""
    out = {name: _stage(ctx, name, RECIPE) for name in ("badencoder", "drupe")}
    cfg = out["drupe"][0]
    clean, _ = ctx.load_model(cfg.encoder, role="encoder")
    splits = be.downstream_splits(cfg, ctx, (1, 8))
    out["clean"] = be.probe(clean, splits, be.trigger(cfg), cfg.target_label, include_target_class=False,
                            seed=cfg.seed, device=ctx.device)
    out["splits"] = splits
    return out


@pytest.fixture(scope="module")
def distances(victims, ctx):
    """Both victims' distances on the downstream test split (the same fixed SWD directions)."""
    _, _, test = victims["splits"]
    cfg = victims["drupe"][0]
    return {name: drupe.distances(victims[name][2], test.images, test.labels, be.trigger(cfg), cfg.target_label,
                                  ctx.device) for name in ("badencoder", "drupe")}


@pytest.mark.slow
def test_drupe_implants_with_ba_near_ca(victims):
    _, m, _ = victims["drupe"]
    ca = victims["clean"]["clean_acc"]
    # measured (lambda3 0.1): ASR 0.869 (val 0.907), BA 0.914; BadEncoder at the same recipe 0.885 / 0.931
    assert m["asr"] >= 0.75 and m["val_asr"] >= 0.75, m
    assert m["clean_acc"] >= ca - 0.05, (m["clean_acc"], ca)
    # the clean encoder does not map the trigger to the target class: the backdoor is DRUPE's doing
    assert victims["clean"]["asr"] < 0.3, victims["clean"]
    for k in (drupe.DIST_LOSS, *drupe.DISTANCE_METRICS, *("val_" + d for d in drupe.DISTANCE_METRICS)):
        assert k in m and m[k] == m[k], k


@pytest.mark.slow
def test_drupe_backdoor_embeddings_are_closer_to_clean_ones_than_badencoders(distances):
    bad, dru = distances["badencoder"], distances["drupe"]
    # against the clean embeddings of the same (non-target) test images, with both distances; measured
    # BadEncoder -> DRUPE: SWD 0.281 -> 0.204, MMD^2 1.872 -> 1.438 (ratios 0.73, 0.77). Against the
    # clean target-class embeddings it goes the other way (SWD 0.060 -> 0.146, MMD^2 0.089 -> 0.555:
    # BadEncoder's collapsed point sits at that class's centre); not asserted, docs/methods.md says so.
    assert dru[drupe.SWD_CLEAN] < 0.85 * bad[drupe.SWD_CLEAN], (bad, dru)
    assert dru[drupe.MMD_CLEAN] < 0.85 * bad[drupe.MMD_CLEAN], (bad, dru)


def test_drupe_config_checks():
    spec = registry.get("drupe")
    with pytest.raises(ConfigError, match="lambda3"):
        spec.build_config({"lambda3": -1})
    with pytest.raises(ConfigError, match="distance="):
        spec.build_config({"distance": "kl"})
    with pytest.raises(ConfigError, match="n_reference"):
        spec.build_config({"distance": "mmd", "n_reference": 1})
    # the trigger hook is BadEncoder's white square
    cfg = spec.build_config({})
    assert torch.equal(spec.hooks["trigger"](cfg, None)(torch.zeros(1, 1, 32, 32)),
                       be.white_square(torch.zeros(1, 1, 32, 32), 10, "bottom_right"))


# -- CTRL --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ctrl_victim(ctx, victims):  # after `victims`: its SimCLR stage is CTRL's clean baseline
    return _stage(ctx, "ctrl", CTRL)


def test_poison_stamps_only_target_class_images_at_the_rate():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(200, 1, 8, 8, generator=g) * 0.5 + 0.25
    labels = torch.arange(200) % 10
    cfg = registry.get("ctrl").build_config({"dataset": "digits", "downstream_dataset": "digits", "target_label": 3})
    out, mask = ctrl.poison(images, labels, ctrl.trigger(cfg), rate=0.05, target=3, gen=g)
    assert int(mask.sum()) == 10 and bool((labels[mask] == 3).all())
    assert torch.equal(out[~mask], images[~mask])
    assert torch.allclose(out[mask], ctrl.trigger(cfg)(images[mask]))
    with pytest.raises(ConfigError, match="poison_rate"):
        ctrl.poison(images, labels, ctrl.trigger(cfg), rate=0.2, target=3, gen=g)  # 40 > the 20 of class 3


def test_ctrl_config_checks():
    spec = registry.get("ctrl")
    for values, field in (({"target_label": 10}, "target_label"), ({"positions": (15, 15, 31)}, "positions"),
                          ({"positions": (15, 32)}, "positions"), ({"components": "rgb"}, "components"),
                          ({"window": 5}, "window"), ({"poison_rate": 0.0}, "poison_rate")):
        with pytest.raises(ConfigError, match=field):
            spec.build_config(values)


@pytest.mark.slow
def test_ctrl_trigger_is_invisible(ctrl_victim):
    cfg, m, _ = ctrl_victim
    assert m[ctrl.N_POISONED] == round(0.09 * 1294), m
    # the bound 2 x 4 m / 32 = 0.049 (ops); measured on the poisoned digits: 0.041, PSNR 36.5 dB
    assert 0.005 < m[ctrl.TRIGGER_MAX_CHANGE] < 0.05, m
    assert m[ctrl.TRIGGER_PSNR] > 30.0, m


@pytest.mark.slow
def test_ctrl_poisoned_pretraining_against_the_clean_encoder(ctx, ctrl_victim):
    """What the small scale shows: the poisoned pre-training trains a different encoder with the
    clean one's accuracy, but does NOT raise the rate at which triggered inputs land in the target
    class (measured ASR 0.003 vs the clean encoder's 0.006 here; also none at 20 epochs, at 1 % and
    9 % poison, and at magnitude 1.0: docs/methods.md, "CTRL"). The assert pins that no-effect, so a
    change that makes CTRL implant at this scale shows up here and must update the docs."""
    cfg, m, encoder = ctrl_victim
    clean, _ = ctx.load_model(cfg.clean_encoder(), role="encoder")
    diff = max((a - b).abs().max().item() for a, b in zip(encoder.state_dict().values(), clean.state_dict().values())
               if a.dtype.is_floating_point)
    assert diff > 1e-3, diff  # the poisoned images were trained on
    assert abs(m["clean_acc"] - m[ctrl.CLEAN_ENCODER_ACC]) < 0.04, m  # measured 0.944 vs 0.931
    assert abs(m["asr"] - m[ctrl.CLEAN_ENCODER_ASR]) < 0.03, m
    assert m[ctrl.CLEAN_ENCODER_ASR] < 0.1 and m[ctrl.VAL_CLEAN_ENCODER_ASR] < 0.1, m
