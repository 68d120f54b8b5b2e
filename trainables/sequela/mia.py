"""Membership inference on a defended model (Sha et al., "Fine-Tuning Is All You Need to Mitigate
Backdoor Attacks", FTP §6.1 / thesis §3.5.1; docs/methods.md §6.1).

Backdoor sequela, part 1: does a defense change how much the model leaks about its training data?
The target is the output of any defense trainable (`defense`, default "sft", the paper's proposed
defense), or the backdoored model itself (`defense="none"`), or a clean model trained with the same
recipe (`defense="clean"`); see `SequelaConfig`. The defense runs as a cached stage, so a sweep of
this trainable over every defense pays for each backdoored and each defended model once.

Threat model and split (FTP §6.1 [S], docs/methods.md §6.1; ML-Doctor's strongest adversary): the adversary knows
part of the training set (members) and part of the test set (non-members). Attack training = a
random half of the test set + as many training samples; evaluation = the other half of the test
set + as many *different* training samples (`secsweep.ops.mia.split_member_nonmember`; CIFAR-10:
5,000 + 5,000 each). The member pool is the set of samples the attack recorded it trained on (its
stage output `training_set`: the training split without the validation part), not a re-derived
split. Members are queried as the clean training images with their true labels (FTP: not
stated; for `defense="none"` the poisoned 10 % were seen only triggered).

Attacks, each reported on the evaluation half:
* NN attack (§6.1): a three-layer network [S] on the posteriors, reported as `accuracy` (the paper's
  metric, on a balanced set), `auc`, `tpr`, `fpr`. Widths 64-32 with ReLU, Adam lr 0.01, 50 epochs are
  SecurityNet's MLP attack ([S] there; T ch.3 leaves them not stated); batch 128 is this
  platform's choice (not stated anywhere). Input `attack_input` (not stated in T ch.3, which says
  only "outputs"): "sorted" posteriors by default (one attack model for all classes, as in ML-Doctor),
  "full" (SecurityNet's default) or "top3" (SecurityNet's variant).
* Metric attacks (SecurityNet, Song & Mittal): `confidence` (p_y), `entropy` (-H(p)), `mentr` (modified
  entropy, docs/methods.md §6.1 [EXT]) and `correctness`; each thresholded at the value that maximises
  balanced accuracy on the attack-training half (`fit_threshold`), reported as `<kind>_auc` and
  `<kind>_accuracy`.

Also reported: `asr`, `clean_acc` of the attacked model, `train_acc` and `overfit_gap` (train minus
test accuracy, SecurityNet's "overfitting level"). One report (epoch 1). Saved output: the NN
attack model (`attack_model`).

`SequelaConfig` and `load_defended` (secsweep.sequela) are shared with reinjection.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from secsweep import data as data_mod
from secsweep.backdoor import load_split
from secsweep.config import one_of, positive, require
from secsweep.names import ACCURACY, ASR, AUC, CLEAN_ACC, DEVICE_HOURS, EPOCH, FPR, TPR
from secsweep.ops.mia import (
    FEATURE_KINDS,
    METRIC_KINDS,
    attack_features,
    evaluate_attack,
    fit_threshold,
    metric_scores,
    predict_membership,
    split_member_nonmember,
    train_attack,
)
from secsweep.registry import register
from secsweep.sequela import SequelaConfig, load_defended
from secsweep.training import probabilities

# -- membership inference -------------------------------------------------------------------------

@dataclass(frozen=True)
class Config(SequelaConfig):
    attack_input: str = "sorted"    # NN attack input: full | sorted | top3 posteriors (T ch.3: not stated)
    mia_epochs: int = 50            # NN attack training epochs (SecurityNet: 50)
    mia_lr: float = 0.01            # NN attack Adam learning rate per step (SecurityNet: 0.01)
    mia_batch_size: int = 128       # NN attack samples per step (not stated; platform choice)

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("attack_input", self.attack_input, FEATURE_KINDS)
        require(self.mia_epochs >= 1, "mia_epochs", self.mia_epochs, "must be >= 1")
        positive("mia_lr", self.mia_lr)
        positive("mia_batch_size", self.mia_batch_size)


def membership_attacks(
    model: nn.Module,
    members: data_mod.ImageSet,
    nonmembers: data_mod.ImageSet,
    device: torch.device,
    *,
    seed: int,
    attack_input: str = "sorted",
    epochs: int = 50,
    lr: float = 0.01,
    batch_size: int = 128,
) -> tuple[dict[str, float], nn.Module]:
    """The NN attack and the metric attacks on `model`, with the §6.1 split of the member pool
    `members` (the training set) and the non-member pool `nonmembers` (the test set).

    Returns (metrics, trained NN attack model). Metrics: accuracy, auc, tpr, fpr of the NN attack;
    <kind>_auc, <kind>_accuracy per metric attack; train_acc (accuracy on the whole member pool);
    mia_samples (evaluation samples per class of the balanced evaluation set).
    """
    split = split_member_nonmember(len(members), len(nonmembers), seed)
    p_mem = probabilities(model, members.images, device)
    p_non = probabilities(model, nonmembers.images, device)

    def part(kind: str):
        m, n = split[f"{kind}_members"], split[f"{kind}_nonmembers"]
        probs = torch.cat([p_mem[m], p_non[n]])
        labels = torch.cat([members.labels[m], nonmembers.labels[n]])
        is_member = torch.cat([torch.ones(len(m), dtype=torch.bool), torch.zeros(len(n), dtype=torch.bool)])
        return probs, labels, is_member

    train_probs, train_labels, train_is_member = part("train")
    eval_probs, eval_labels, eval_is_member = part("eval")

    net = train_attack(
        attack_features(p_mem[split["train_members"]], attack_input).to(device),
        attack_features(p_non[split["train_nonmembers"]], attack_input).to(device),
        epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
    )
    scores = predict_membership(net, attack_features(eval_probs, attack_input).to(device)).cpu()
    nn_result = evaluate_attack(scores, eval_is_member)
    out = {k: nn_result[k] for k in (ACCURACY, AUC, TPR, FPR)}

    for kind in METRIC_KINDS:
        threshold = fit_threshold(metric_scores(train_probs, train_labels, kind), train_is_member)
        result = evaluate_attack(metric_scores(eval_probs, eval_labels, kind), eval_is_member, threshold)
        out[f"{kind}_auc"] = result[AUC]
        out[f"{kind}_accuracy"] = result[ACCURACY]

    out["train_acc"] = (p_mem.argmax(1) == members.labels).float().mean().item()
    out["mia_samples"] = float(len(split["eval_members"]))
    return out, net


def member_pool(cfg: Config, victim) -> data_mod.ImageSet:
    """The member pool: the training samples the attack recorded it trained on (its stage output
    `training_set`, secsweep.trainset), queried clean with their true labels; for the "clean"
    baseline, that model's own training split (the victim's clean split, same data and seed)."""
    return victim.train if cfg.defense == "clean" else victim.members()


METRICS = (ACCURACY, AUC, *(f"{k}_{m}" for k in METRIC_KINDS for m in (AUC, ACCURACY)),
           "train_acc", "overfit_gap", ASR, CLEAN_ACC, DEVICE_HOURS)


@register("mia", kind="sequela", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    torch.manual_seed(cfg.seed)
    victim = load_defended(cfg, ctx)
    test = load_split(cfg, ctx, "test")
    metrics, net = membership_attacks(
        victim.model, member_pool(cfg, victim), test, ctx.device, seed=cfg.seed, attack_input=cfg.attack_input,
        epochs=cfg.mia_epochs, lr=cfg.mia_lr, batch_size=cfg.mia_batch_size,
    )
    backdoor = victim.evaluate(victim.model, ctx.device)
    metrics["overfit_gap"] = metrics["train_acc"] - backdoor[CLEAN_ACC]
    ctx.report({EPOCH: 1, **metrics, **backdoor})
    ctx.save_output("attack_model", net.state_dict())
