"""Selection on a validation split, seeds with confidence intervals, and the backdoor floor.

Sweeps select on `val_*` metrics computed on a stratified split of the training data; the test split
is only reported. `--seeds N` repeats grid points; tables give mean and 95 % CI over seeds. A defense
of a backdoor that never reached `min_asr_before` is flagged and no objective can select it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from secsweep import registry
from secsweep.backdoor import load_split, poisoned_train_set
from secsweep.context import LocalContext
from secsweep.data import stratified_split
from secsweep.errors import ConfigError
from secsweep.ops.metrics import with_der
from secsweep.report import pareto_front, seed_summary, summary_markdown, write_report
from secsweep.sweep import Sweep, build_parser, grid, plan, with_seeds

DIGITS = {"dataset": "digits", "model": "smallcnn", "attack_epochs": 3, "attack_batch_size": 32,
          "epochs": 1, "batch_size": 32}


# -- the split --------------------------------------------------------------------------------------

def test_stratified_split_is_disjoint_seeded_and_keeps_class_mix():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    keep, held = stratified_split(labels, 0.1, seed=3)
    assert len(set(keep.tolist()) & set(held.tolist())) == 0 and len(keep) + len(held) == 100
    assert torch.bincount(labels[held], minlength=3).tolist() == [5, 3, 2]
    again, _ = stratified_split(labels, 0.1, seed=3)
    other, _ = stratified_split(labels, 0.1, seed=4)
    assert torch.equal(keep, again) and not torch.equal(keep, other)
    keep0, held0 = stratified_split(labels, 0.0, seed=0)
    assert len(held0) == 0 and len(keep0) == 100
    with pytest.raises(ValueError):
        stratified_split(labels, 1.0, seed=0)


def test_victim_never_trains_on_its_validation_split(tmp_path):
    victim = {k: v for k, v in DIGITS.items() if k not in ("epochs", "batch_size")}
    cfg = registry.get("badnets").build_config({**victim, "train_size": 1000})
    ctx = LocalContext(workdir=tmp_path)
    train, val = load_split(cfg, ctx, "train"), load_split(cfg, ctx, "val")
    assert len(train) + len(val) == 1000 and abs(len(val) - 100) <= 5
    # no validation image is among the (clean) training images
    t = {tuple(x.flatten().tolist()) for x in train.images}
    assert not any(tuple(x.flatten().tolist()) in t for x in val.images)
    pset = poisoned_train_set(cfg, ctx, registry.get("badnets").hooks["trigger"](cfg, None))
    assert len(pset) == len(train)
    # a defense of this victim holds the same split (seeded by the victim's seed, not its own)
    dcfg = registry.get("sft").build_config({**DIGITS, "train_size": 1000, "seed": 5})
    assert torch.equal(load_split(dcfg, ctx, "val").labels, val.labels)


@pytest.fixture(scope="module")
def sft_history(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sel")
    spec = registry.get("sft")
    ctx = LocalContext(workdir=root / "w", stage_root=root / "stages")
    ctx.objectives = ("val_asr", "val_clean_acc", "val_der")
    spec.fn(spec.build_config({**DIGITS, "attack_epochs": 4}), ctx)
    return ctx.history, root


def test_defense_reports_validation_and_test_metrics_and_der(sft_history):
    history, _ = sft_history
    for h in history:
        assert {"val_asr", "val_clean_acc", "asr", "clean_acc"} <= set(h)
    last = history[-1]
    assert {"val_asr_before", "val_clean_acc_before", "der", "val_der", "backdoor_implanted"} <= set(last)
    assert last["backdoor_implanted"] == 1.0
    assert 0.0 <= last["val_der"] <= 1.0 and last["val_der"] == pytest.approx(
        with_der({k: last[k] for k in ("val_asr_before", "val_asr", "val_clean_acc_before", "val_clean_acc")})["val_der"])


def test_a_backdoor_that_never_took_is_flagged_and_never_selected(sft_history):
    _, root = sft_history
    spec = registry.get("sft")
    ctx = LocalContext(workdir=root / "floor", stage_root=root / "stages")
    ctx.objectives = ("val_asr", "val_clean_acc", "val_der")
    spec.fn(spec.build_config({**DIGITS, "attack_epochs": 4, "min_asr_before": 1.0}), ctx)  # same cached victim
    last = ctx.history[-1]
    assert last["backdoor_implanted"] == 0.0
    assert all(math.isnan(last[k]) for k in ctx.objectives)   # no search can pick it
    assert not math.isnan(last["asr"]) and not math.isnan(last["clean_acc"])  # the test numbers stay
    frame = pd.DataFrame([
        {"trial_id": "a", "val_asr": 0.0, "val_clean_acc": 0.9, "backdoor_implanted": 0.0, "status": "TERMINATED"},
        {"trial_id": "b", "val_asr": 0.1, "val_clean_acc": 0.8, "backdoor_implanted": 1.0, "status": "TERMINATED"},
    ])
    assert pareto_front(frame, {"val_asr": "min", "val_clean_acc": "max"}).tolist() == [False, True]


def test_report_says_plainly_when_the_backdoor_did_not_take(tmp_path):
    frame = pd.DataFrame([{"trial_id": "a", "trainable": "sft", "attack": "badnets", "seed": 0, "asr": 0.01,
                           "clean_acc": 0.8, "asr_before": 0.2, "clean_acc_before": 0.8,
                           "backdoor_implanted": 0.0, "status": "TERMINATED"}])
    write_report(frame, tmp_path, title="t")
    assert "backdoor not implanted" in (tmp_path / "results.md").read_text()
    assert "backdoor not implanted" in (tmp_path / "per_defense.md").read_text()


# -- objectives ---------------------------------------------------------------------------------------

def args_for(sweep, *argv):
    return build_parser(sweep).parse_args(list(argv))


def test_objectives_and_asha_select_on_validation_never_on_asr_alone():
    sweep = Sweep(name="s", trainable="sft", fixed=DIGITS, grid=grid(lr_max1=[0.1]))
    assert set(sweep.objectives) == {"val_asr", "val_clean_acc"} and sweep.selection == ("val_der", "max")
    bad = Sweep(name="s", trainable="sft", fixed=DIGITS, grid=grid(lr_max1=[0.1]), objectives={"val_asr": "min"})
    with pytest.raises(ConfigError, match="collapsed"):
        plan(bad, args_for(bad))
    bad = Sweep(name="s", trainable="sft", fixed=DIGITS, grid=grid(lr_max1=[0.1]), selection=("asr", "min"))
    with pytest.raises(ConfigError, match="collapsed"):
        plan(bad, args_for(bad))


def test_asha_stops_on_the_declared_selection_metric():
    from secsweep.sweep import _build_tune_config

    sweep = Sweep(name="s", trainable="sft", fixed=DIGITS, grid=grid(lr_max1=[0.1]))
    args = args_for(sweep, "--asha")
    scheduler = _build_tune_config(plan(sweep, args), args).scheduler
    assert scheduler._metric == "val_der" and scheduler._mode == "max"


# -- seeds ----------------------------------------------------------------------------------------------

def test_seeds_repeat_every_grid_point_sharing_or_reseeding_the_victim():
    sweep = Sweep(name="s", trainable="sft", fixed=DIGITS, grid=grid(lr_max1=[0.1, 0.2]))
    trials = plan(sweep, args_for(sweep, "--seeds", "3")).trials
    assert len(trials) == 6
    assert sorted((t["lr_max1"], t["seed"]) for t in trials) == [(a, s) for a in (0.1, 0.2) for s in range(3)]
    assert all("victim_seed" not in t for t in trials)  # upstream shared: one backdoored model
    trials = plan(sweep, args_for(sweep, "--seeds", "2", "--reseed-upstream")).trials
    assert sorted((t["seed"], t["victim_seed"]) for t in trials) == [(0, 0), (0, 0), (1, 1), (1, 1)]
    cfgs = [registry.get("sft").build_config({k: v for k, v in t.items() if k != "trainable"}) for t in trials]
    assert {c.attack_config().seed for c in cfgs} == {0, 1}  # each repeat has its own victim
    assert with_seeds([{"trainable": "badnets", "seed": 7}], 2) == [
        {"trainable": "badnets", "seed": 7}, {"trainable": "badnets", "seed": 8}]


def test_defense_seed_is_separate_from_the_victims():
    cfg = registry.get("sft").build_config({**DIGITS, "seed": 4})
    assert cfg.seed == 4 and cfg.attack_config().seed == 0
    cfg = registry.get("sft").build_config({**DIGITS, "victim_seed": 2})
    assert cfg.seed == 0 and cfg.attack_config().seed == 2
    with pytest.raises(ConfigError, match="victim_seed"):
        registry.get("sft").build_config({**DIGITS, "attack_options": {"seed": 1}})


def test_num_samples_no_longer_repeats_a_grid():
    sweep = Sweep(name="s", trainable="sft", fixed=DIGITS, grid=grid(lr_max1=[0.1]))
    with pytest.raises(ConfigError, match="--seeds"):
        plan(sweep, args_for(sweep, "--num-samples", "3"))
    with pytest.raises(ConfigError, match="--reseed-upstream"):
        plan(sweep, args_for(sweep, "--reseed-upstream"))


def test_seed_summary_gives_mean_ci_and_n():
    rng = np.random.default_rng(0)
    rows = []
    for d, mu in (("sft", 0.1), ("ft", 0.5)):
        for seed in range(5):
            rows.append({"trial_id": f"{d}{seed}", "trainable": d, "attack": "badnets", "seed": seed,
                         "asr": mu + rng.normal(0, 0.05), "clean_acc": 0.8, "status": "TERMINATED"})
    rows.append({"trial_id": "x", "trainable": "ft", "attack": "badnets", "seed": 9, "asr": 9.0, "clean_acc": 0.0,
                 "status": "ERROR"})  # failed trials do not enter the mean
    frame = pd.DataFrame(rows)
    frame.attrs["params"] = ["trainable", "attack", "seed"]
    s = seed_summary(frame).set_index("trainable")
    assert s.loc["sft", "n"] == 5 and s.loc["ft", "n"] == 5
    v = frame[(frame.trainable == "sft") & (frame.status == "TERMINATED")]["asr"].to_numpy()
    from scipy import stats

    assert s.loc["sft", "asr"] == pytest.approx(v.mean())
    assert s.loc["sft", "asr_ci95"] == pytest.approx(stats.t.ppf(0.975, 4) * v.std(ddof=1) / 5 ** 0.5)
    text = summary_markdown(seed_summary(frame))
    assert "±" in text and "| n" in text.replace("|   n", "| n")


def test_summaries_follow_declared_metrics_not_only_backdoor_names(tmp_path):
    """An encoder sweep's table has no asr: its declared knn_acc is what the seed summary shows."""
    import pandas as pd

    from secsweep.report import write_report

    frame = pd.DataFrame({"trainable": ["simclr"] * 4, "temperature": [0.1, 0.1, 0.5, 0.5], "seed": [0, 1, 0, 1],
                          "knn_acc": [0.6, 0.62, 0.7, 0.74], "val_knn_acc": [0.61, 0.6, 0.72, 0.73],
                          "status": ["TERMINATED"] * 4})
    frame.attrs["params"] = ["trainable", "temperature", "seed"]
    write_report(frame, tmp_path, title="t", columns=("trainable", "temperature", "knn_acc"))
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("temperature")
    assert summary.loc[0.5, "knn_acc"] == pytest.approx(0.72) and summary.loc[0.1, "n"] == 2
    assert "val_knn_acc" in summary.columns and "knn_acc_ci95" in summary.columns  # declared by simclr
