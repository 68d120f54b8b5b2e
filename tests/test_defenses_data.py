"""Data-based defenses (docs/methods.md §5.7-§5.9) on real data: sklearn digits, smallcnn, BadNets.

Spectral Signatures and Activation Clustering get the poisoned training set and the backdoored
model, rank the poisoned samples above the clean ones, drop the flagged ones and retrain; ABL trains
from scratch on the poisoned set, isolates its lowest-loss samples and unlearns them.

Poison ratio. Spectral and AC look for the poison inside the target label, and need it to be a
minority there: with all-to-one poisoning of a fraction r of the data over 10 labels the target
label is r / (r + (1 - r) / 10) poisoned, 0.53 at r = 0.1 (Tran et al. poison 5-10 % of a label).
Their tests therefore use r = 0.03 (39 of 1294 training samples, ~24 % of label 0; the backdoor still
reaches ASR ~0.98). ABL has no such limit and runs at the paper's r = 0.1 (docs/methods.md §4.1).

Numbers observed on one thread (seed 0; seeds 1 and 2 in brackets where measured):
* Spectral, last_block representation, eps 0.2: AUC 0.916 (0.920, 0.971), TPR 0.93; after 6
  retraining epochs ASR 0.984 -> 0.012 (0.009, 0.0), clean accuracy 0.983 -> 0.967.
* AC, PCA on last_block: AUC 0.914 (0.978, 0.982), TPR 0.93; ASR -> 0.009 (0.0, 0.0), clean
  accuracy 0.969.
  AC as Chen et al. (ICA, penultimate layer) is not reliable at ~150-200 samples per label: AUC 0.77
  (0.36, 0.60) — its test checks the mechanics only.
* ABL, 4 isolation epochs, batch 32: isolation precision 1.0 (1.0); ASR 1.0 before unlearning and
  0.13 (0.07) after 6 unlearning epochs at lr 5e-4, clean accuracy 0.98 -> 0.94 (0.89).
"""

from __future__ import annotations

import pytest
import torch

from secsweep import registry
from secsweep.context import LocalContext

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # FastICA on tiny labels

VICTIM = {"dataset": "digits", "model": "smallcnn", "attack": "badnets", "attack_epochs": 6, "attack_batch_size": 32}
SMALL_POISON = {**VICTIM, "poison_ratio": 0.03}  # the target label stays a clean majority (see module docstring)
RETRAIN = {"epochs": 6}                          # retraining from scratch with the victim's recipe
N_TRAIN = 1294                                   # digits training set less its stratified 10 % validation split
N_POISONED = round(0.03 * N_TRAIN)               # 39


@pytest.fixture(scope="module")
def stage_root(tmp_path_factory):
    """One cache of backdoored models for the module: each victim is trained once."""
    return tmp_path_factory.mktemp("stages")


def run(name, stage_root, tmp_path, values):
    spec = registry.get(name)
    ctx = LocalContext(workdir=tmp_path / name, stage_root=stage_root)
    spec.fn(spec.build_config(values), ctx)
    return ctx.history


def check_removal_defense(history, *, min_auc):
    """Shared checks for Spectral and AC: detection quality, backdoor gone, utility kept."""
    before, after = history[0], history[-1]
    assert before["epoch"] == 0 and after["epoch"] == RETRAIN["epochs"]
    assert before["asr"] >= 0.9, f"backdoor not implanted (ASR {before['asr']:.3f})"
    assert after["auc"] > min_auc, f"poisoned samples not ranked first (AUC {after['auc']:.3f})"
    assert after["tpr"] >= 0.8, f"only {after['tpr']:.2f} of the poisoned samples removed"
    assert after["asr"] < 0.1, f"ASR {after['asr']:.3f} after retraining without the flagged samples"
    assert after["clean_acc"] >= before["clean_acc"] - 0.05
    # detection metrics and the before-values travel with every report
    assert all(h["auc"] == after["auc"] and h["num_removed"] == after["num_removed"] for h in history)
    assert all(h["asr_before"] == before["asr"] for h in history[1:])


def test_spectral_ranks_poison_first_and_retraining_removes_backdoor(stage_root, tmp_path):
    # eps 0.2: the poison is ~24 % of the target label, so 1.5 * eps = 30 % per label is removed
    history = run("spectral", stage_root, tmp_path, {**SMALL_POISON, **RETRAIN, "eps": 0.2})
    check_removal_defense(history, min_auc=0.8)
    after = history[-1]
    # floor(0.3 * n_label) per label: about 30 % of the training set
    assert 0.25 * N_TRAIN <= after["num_removed"] <= 0.3 * N_TRAIN
    print(f"\nspectral: AUC {after['auc']:.3f} TPR {after['tpr']:.2f} FPR {after['fpr']:.2f} "
          f"removed {after['num_removed']:.0f} | ASR {history[0]['asr']:.3f} -> {after['asr']:.3f} "
          f"CA {history[0]['clean_acc']:.3f} -> {after['clean_acc']:.3f}")


def test_ac_with_pca_on_last_block_ranks_poison_first_and_retraining_removes_backdoor(stage_root, tmp_path):
    history = run("ac", stage_root, tmp_path,
                  {**SMALL_POISON, **RETRAIN, "reduce": "pca", "representation": "last_block"})
    check_removal_defense(history, min_auc=0.8)
    after = history[-1]
    assert after["fpr"] < 0.15, f"AC removed {after['fpr']:.2f} of the clean samples"
    print(f"\nac (pca, last_block): AUC {after['auc']:.3f} TPR {after['tpr']:.2f} FPR {after['fpr']:.2f} "
          f"removed {after['num_removed']:.0f} | ASR {history[0]['asr']:.3f} -> {after['asr']:.3f} "
          f"CA {history[0]['clean_acc']:.3f} -> {after['clean_acc']:.3f}")


def test_ac_paper_configuration_ica_runs_and_flags_only_small_clusters(stage_root, tmp_path):
    """Chen et al.'s ICA on the penultimate layer: unreliable at this size (module docstring), so
    only the mechanics are checked: consistent counts, only small clusters flagged, utility kept."""
    history = run("ac", stage_root, tmp_path, {**SMALL_POISON, "epochs": 3})
    before, after = history[0], history[-1]
    n_clean = N_TRAIN - N_POISONED
    removed = after["tpr"] * N_POISONED + after["fpr"] * n_clean
    assert removed == pytest.approx(after["num_removed"], abs=1e-6)
    assert 0 < after["num_removed"] <= 0.35 * N_TRAIN  # each flagged cluster holds <= 35 % of its label
    assert 0.0 <= after["auc"] <= 1.0
    assert after["clean_acc"] >= before["clean_acc"] - 0.1
    print(f"\nac (ica, penultimate): AUC {after['auc']:.3f} TPR {after['tpr']:.2f} FPR {after['fpr']:.2f} "
          f"| ASR {before['asr']:.3f} -> {after['asr']:.3f}")


def test_abl_isolates_mostly_poisoned_samples_and_unlearning_lowers_asr(stage_root, tmp_path):
    values = {**VICTIM, "poison_ratio": 0.1, "batch_size": 32, "isolation_epochs": 4, "epochs": 2,
              "unlearning_epochs": 6}
    history = run("abl", stage_root, tmp_path, values)
    stages = [h.get("abl_stage") for h in history]
    assert stages == [None] + [1.0] * 4 + [2.0] * 2 + [3.0] * 6
    trained, final = history[6], history[-1]  # end of stage 2 (before unlearning), end of stage 3
    assert final["num_isolated"] == float(int(0.01 * N_TRAIN))  # floor(0.01 * 1294) = 12
    assert final["isolation_precision"] >= 0.5, f"isolated set only {final['isolation_precision']:.2f} poisoned"
    assert trained["asr"] >= 0.9, "the poisoned samples left in stage 2 should carry the backdoor"
    assert final["asr"] <= trained["asr"] - 0.5, f"unlearning: ASR {trained['asr']:.3f} -> {final['asr']:.3f}"
    assert final["clean_acc"] >= 0.8
    print(f"\nabl: isolation precision {final['isolation_precision']:.2f} AUC {final['auc']:.3f} | "
          f"before unlearning ASR {trained['asr']:.3f} CA {trained['clean_acc']:.3f} -> "
          f"after ASR {final['asr']:.3f} CA {final['clean_acc']:.3f}")


def test_abl_resumes_from_its_last_report(stage_root, tmp_path):
    """A restart after the isolation stage continues with the same isolated set and metrics."""
    values = {**VICTIM, "poison_ratio": 0.1, "batch_size": 64, "isolation_epochs": 1, "epochs": 1,
              "unlearning_epochs": 1}
    spec = registry.get("abl")
    cfg = spec.build_config(values)
    full = LocalContext(workdir=tmp_path / "full", stage_root=stage_root)
    spec.fn(cfg, full)
    first = LocalContext(workdir=tmp_path / "first", stage_root=stage_root)
    spec.fn(spec.build_config({**values, "epochs": 1, "unlearning_epochs": 0}), first)  # stop after stage 2
    resumed = LocalContext(workdir=tmp_path / "resumed", stage_root=stage_root, state=first.last_state)
    spec.fn(cfg, resumed)
    assert [h["epoch"] for h in resumed.history] == [3]
    assert torch.equal(first.last_state["isolated"], full.last_state["isolated"])
    for key in ("asr", "clean_acc", "isolation_precision", "auc"):
        assert resumed.history[-1][key] == pytest.approx(full.history[-1][key], abs=1e-6)


@pytest.mark.parametrize("name, values, field", [
    ("spectral", {"eps": 0.0}, "eps"),
    ("spectral", {"eps": 0.5, "factor": 3.0}, "factor"),
    ("spectral", {"representation": "logits"}, "representation"),
    ("ac", {"reduce": "tsne"}, "reduce"),
    ("ac", {"size_threshold": 0.6}, "size_threshold"),
    ("ac", {"n_components": 0}, "n_components"),
    ("abl", {"isolation_ratio": 1.0}, "isolation_ratio"),
    ("abl", {"lga_reduction": "sum"}, "lga_reduction"),
    ("abl", {"isolation_epochs": 0}, "isolation_epochs"),
    ("abl", {"unlearning_lr": 0.0}, "unlearning_lr"),
])
def test_bad_config_values_name_the_field(name, values, field):
    from secsweep.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^{field}="):
        registry.get(name).build_config({"dataset": "digits", **values})
