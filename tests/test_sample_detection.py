"""The shared sample-detection core (platform/secsweep/sample_detection.py): ROC / AUC / thresholds,
the detection test sets, and the downstream-defense protocol on a tiny real victim (a one-epoch
BadEncoder of a one-epoch SimCLR on sklearn digits, 8x8; its white 2x2 corner trigger).

The end-to-end tests use two scorers whose behaviour is known without training anything: one that
reads the trigger's corner (it separates triggered from clean digits almost perfectly: the digits'
bottom-right corner is dark) and one that flags nothing. About 15 s on two shared CPU cores.
"""

from __future__ import annotations

import pytest
import torch

from secsweep import registry
from secsweep import sample_detection as sd
from secsweep.context import LocalContext
from secsweep.errors import ConfigError

SIMCLR = {"trainable": "simclr", "dataset": "digits", "train_size": 300, "epochs": 1, "batch_size": 64,
          "monitor_size": 100}
BADENCODER = {"trainable": "badencoder", "encoder": SIMCLR, "downstream_dataset": "digits", "shadow_size": 200,
              "epochs": 1, "batch_size": 64, "monitor_size": 100}
SMALL = {"victim": BADENCODER, "test_size": 200, "downstream_epochs": 10}


def corner_scorer(x: torch.Tensor) -> torch.Tensor:
    return x[..., -2:, -2:].mean(dim=(1, 2, 3))  # the 2x2 trigger corner on 8x8 (1.0 when stamped)


# -- ROC and AUC ---------------------------------------------------------------------------------

def test_roc_points_are_the_swept_thresholds_and_auc_is_their_trapezoid():
    sklearn = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    y = torch.rand(300, generator=g) < 0.3
    s = torch.randn(300, generator=g) + 1.2 * y.float()
    s[:40] = s[:40].round()  # ties: one ROC point per distinct score
    fpr, tpr, thr = sd.roc_curve(s, y)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert len(thr) == len(torch.unique(s)) + 1 and thr[0] == float("inf")
    for f, t, th in zip(fpr, tpr, thr):  # every point is what flagging score >= threshold gives
        flags = s.double() >= th
        assert f == pytest.approx(flags[~y].double().mean().item()) and t == pytest.approx(flags[y].double().mean().item())
    res = sd.evaluate_detection(s, y, threshold=0.5)
    assert res.auc == pytest.approx(sklearn.roc_auc_score(y.numpy(), s.numpy()), abs=1e-12)
    assert res.auc == pytest.approx(sd.trapezoid_auc(fpr, tpr))
    assert 0.7 < res.auc < 0.9  # separated by 1.2 standard deviations: about 0.8
    assert res.tpr == pytest.approx((s[y] > 0.5).float().mean().item())
    assert res.fpr == pytest.approx((s[~y] > 0.5).float().mean().item())
    assert sd.evaluate_detection(-s, y, 0.0).auc == pytest.approx(1 - res.auc)


def test_roc_refuses_one_class_and_mismatched_shapes():
    with pytest.raises(ValueError, match="both classes"):
        sd.roc_curve(torch.rand(5), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        sd.roc_curve(torch.rand(5), torch.zeros(4, dtype=torch.bool))


@pytest.mark.parametrize("rule, expected", [
    ("train_mean", 2.0), ("train_median", 2.0), ("quantile:0.75", 2.5), ("median", 25.0), ("test_mean", 25.0),
    ("test_quantile:0.25", 17.5),
])
def test_threshold_rules(rule, expected):
    train, test = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([40.0, 10.0, 30.0, 20.0])
    assert sd.resolve_threshold(rule, train, test) == pytest.approx(expected)


@pytest.mark.parametrize("rule", ["mean", "quantile:1.5", "quantile:x", "test_quantile:0"])
def test_bad_threshold_rule_is_one_line(rule):
    with pytest.raises(ConfigError) as e:
        sd.parse_threshold(rule)
    assert str(e.value).startswith("threshold=") and "\n" not in str(e.value)


def test_train_rule_without_training_scores_is_refused():
    with pytest.raises(ConfigError, match="^threshold='train_mean': needs the detector's scores"):
        sd.resolve_threshold("train_mean", None, torch.rand(4))


# -- test sets -----------------------------------------------------------------------------------

def test_detection_set_has_the_rate_and_triggers_only_non_target_images():
    g = torch.Generator().manual_seed(1)
    images, labels = torch.rand(400, 1, 8, 8, generator=g) * 0.5, torch.arange(400) % 10
    stamp = lambda x: torch.ones_like(x)  # noqa: E731 - a trigger that is easy to recognise
    for rate, n_trig in ((0.5, 100), (0.01, 2)):
        x, y, lab = sd.detection_set(images, labels, stamp, 3, size=200, rate=rate, seed=0)
        assert len(x) == 200 and int(y.sum()) == n_trig
        assert (x[y] == 1).all() and (x[~y] < 1).all() and (lab[y] != 3).all()
        # clean images are distinct originals: none of them is also among the triggered
        assert len({tuple(v.flatten().tolist()) for v in x[~y]}) == int((~y).sum())
    a, b = (sd.detection_set(images, labels, stamp, 3, size=200, rate=0.5, seed=s)[0] for s in (0, 0))
    assert torch.equal(a, b)
    x, y, _ = sd.detection_set(images[:50], labels[:50], stamp, 3, size=200, rate=0.5, seed=0)
    assert len(x) == 50 and int(y.sum()) == 25  # capped at the split


# -- config ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, field", [
    ({"victim": SIMCLR}, "trigger_from"),                      # a clean victim needs a trigger source
    ({"victim": "badnets"}, "victim"),                         # a classifier attack is no encoder
    ({"poison_rates": [0.5, 1.0]}, "poison_rates"),
    ({"threshold": "max"}, "threshold"),
    ({"test_size": 2}, "test_size"),
    ({"downstream_poison_rate": 0.0}, "downstream_poison_rate"),
])
def test_bad_detector_config_is_one_line_naming_the_field(values, field):
    with pytest.raises(ConfigError) as e:
        registry.discover()
        from secsweep.config import build

        build(sd.DetectorConfig, values)
    msg = str(e.value)
    assert "\n" not in msg and msg.split(":")[0].startswith(f"{field}="), msg


def test_clean_victim_takes_the_trigger_of_its_source():
    from secsweep.config import build

    registry.discover()
    cfg = build(sd.DetectorConfig, {"victim": SIMCLR, "trigger_from": BADENCODER})
    assert cfg.trigger_source.trainable == "badencoder" and cfg.victim.trainable == "simclr"


# -- end to end on a tiny real victim --------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    from secsweep.config import build

    registry.discover()
    cfg = build(sd.DetectorConfig, SMALL)
    ctx = LocalContext(workdir=tmp_path_factory.mktemp("w"), stage_root=tmp_path_factory.mktemp("stages"))
    victim = sd.load_victim(cfg, ctx)
    return cfg, ctx, victim, sd.Evaluation.build(cfg, ctx, victim)


def test_victim_and_its_test_sets(evaluation):
    cfg, _, victim, ev = evaluation
    assert victim.backdoored and victim.shape == (1, 8) and victim.target_label == 0
    assert victim.embed(ev.test.images[:5]).shape[0] == 5
    for (prefix, rate), (x, y) in ev.sets.items():
        assert x.shape[1:] == (1, 8, 8) and int(y.sum()) == max(1, round(rate * len(x)))
    assert len(ev.sets[("", 0.5)][0]) == cfg.test_size  # 200 of the 360 test digits
    assert len(ev.sets[("val_", 0.5)][0]) == 143        # the whole digits hold-out


def test_a_trigger_reading_scorer_detects_and_the_protocol_removes_the_backdoor(evaluation):
    cfg, ctx, victim, ev = evaluation
    scorer = sd.Scorer(corner_scorer, train_scores=torch.full((10,), 0.5))
    out = ev.evaluate(scorer, ctx)
    assert out["auc"] > 0.99 and out["val_auc"] > 0.99 and out["auc_1pct"] > 0.99, out
    assert out["tpr"] == 1.0 and out["fpr"] < 0.05 and out["auc"] == out["auc_50pct"]
    # every poisoned training image is dropped; with all triggered test inputs detected, ASR is 0,
    # while the classifier trained on the poisoned data (No Def.) learned the trigger
    assert out[sd.REMOVED_POISON] == 1.0 and out[sd.REMOVED_CLEAN] < 0.05
    assert out["asr"] == 0.0 and out["asr_before"] > 0.5, out
    assert abs(out["clean_acc"] - out["clean_acc_before"]) < 0.1 and out["clean_acc"] > 0.5, out
    res = ev.results[("", 0.5)]
    assert res.auc == pytest.approx(sd.trapezoid_auc(res.roc_fpr, res.roc_tpr))
    assert (ctx.workdir / "artifacts" / "roc_test_50pct.csv").is_file()
    assert (ctx.output_dir / "scores.safetensors").is_file()


def test_a_detector_that_flags_nothing_changes_nothing_downstream(evaluation):
    _, _, victim, ev = evaluation
    flat = sd.Scorer(lambda x: torch.zeros(len(x)), train_scores=torch.zeros(3))
    out = ev.protocol(flat)
    assert out[sd.REMOVED_POISON] == 0.0 and out[sd.REJECTED_CLEAN] == 0.0
    assert out["asr"] == out["asr_before"] and out["clean_acc"] == out["clean_acc_before"], out
    det = ev.detection(flat, rates=(0.5,), prefixes=("",))
    assert det["auc"] == pytest.approx(0.5) and det["tpr"] == 0.0


def test_run_detector_reports_once_for_a_scoring_rule(evaluation, tmp_path):
    cfg, ctx, _, _ = evaluation
    run_ctx = LocalContext(workdir=tmp_path / "w", stage_root=ctx.stage_root)
    sd.run_detector(cfg, run_ctx, lambda victim, ev: sd.Scorer(corner_scorer, train_scores=torch.full((4,), 0.5)))
    (last,) = run_ctx.history
    for m in sd.METRICS:
        assert m in last, m
    assert last["val_auc"] > 0.99 and last["epoch"] == 1 and "der" in last
