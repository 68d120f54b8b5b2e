"""Membership inference on a public model (SecurityNet §3.2; docs/methods.md, "Audits of public models").

Threat model (SecurityNet's worst case): black-box, full posteriors; the adversary holds a subset of
the target's training data (members) and the dataset's test set as non-members. Members here are the
model stage's training split, non-members its test split (`secsweep.audit.Target`), each capped at
`max_samples` seeded images. They are split as `secsweep.ops.mia.split_member_nonmember` splits them:
an attack-training half (members and as many non-members) and a disjoint evaluation half of the same
size. Every AUC is measured on the evaluation half:

* `mia_auc_correctness`: prediction correctness (Song & Mittal; member iff the target classifies the
  sample correctly), a 0/1 score, so its AUC is (TPR + TNR) / 2 of that rule;
* `mia_auc_mentr`: the negative modified entropy -Mentr(p, y) (Song & Mittal; higher = member);
* `mia_auc_mlp`: the MLP attack, Linear-64-ReLU-32-ReLU-1 (`secsweep.ops.mia.MIAttackNet`) trained with
  Adam at lr 0.01 for 50 epochs (SecurityNet) on the attack-training half, input `mlp_input`: the
  full posterior (SecurityNet's default) or its top-3 sorted entries ("top3"). Batch 128 and the
  binary cross-entropy loss are not stated there (`train_attack`'s choices).

Also reported: the accuracy of each metric attack at the threshold fitted on the attack-training half
(`fit_threshold`) and of the MLP at 0.5, on the evaluation half (`mia_acc_*`), the sizes of the two
halves, and the target's `secsweep.audit.model_facts` (train/test accuracy, overfit gap, ...). One
report (epoch 1). Output: the MLP attack model (`attack_model` tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from secsweep import audit
from secsweep.config import one_of, positive, require
from secsweep.names import DEVICE_HOURS
from secsweep.ops.mia import (
    attack_features,
    fit_threshold,
    metric_scores,
    predict_membership,
    roc_auc,
    split_member_nonmember,
    threshold_accuracy,
    train_attack,
)
from secsweep.registry import register

MLP_INPUTS = ("full", "top3")
AUC_CORRECTNESS, AUC_MENTR, AUC_MLP = "mia_auc_correctness", "mia_auc_mentr", "mia_auc_mlp"
ACC_CORRECTNESS, ACC_MENTR, ACC_MLP = "mia_acc_correctness", "mia_acc_mentr", "mia_acc_mlp"
ATTACK_TRAIN_SIZE, ATTACK_EVAL_SIZE = "mia_attack_train_size", "mia_eval_size"
METRICS = (AUC_CORRECTNESS, AUC_MENTR, AUC_MLP, ACC_CORRECTNESS, ACC_MENTR, ACC_MLP, ATTACK_TRAIN_SIZE,
           ATTACK_EVAL_SIZE, *audit.FACT_METRICS, DEVICE_HOURS)


@dataclass(frozen=True)
class Config(audit.AuditConfig):
    mlp_input: str = "full"   # MLP attack input: full posterior or top3 sorted (SecurityNet: both)
    mlp_epochs: int = 50      # MLP attack epochs (SecurityNet: 50)
    mlp_lr: float = 0.01      # MLP attack Adam learning rate (SecurityNet: 0.01)
    mlp_batch_size: int = 128  # MLP attack samples per step (not stated)

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("mlp_input", self.mlp_input, MLP_INPUTS)
        require(self.mlp_epochs >= 1, "mlp_epochs", self.mlp_epochs, "must be >= 1")
        positive("mlp_lr", self.mlp_lr)
        require(self.mlp_batch_size >= 1, "mlp_batch_size", self.mlp_batch_size, "must be >= 1")


@register("audit_mia", kind="audit", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    target = audit.load_target(cfg, ctx)
    members = audit.cap(target.members, cfg.max_samples, cfg.seed, salt=21)
    nonmembers = audit.cap(target.nonmembers, cfg.max_samples, cfg.seed, salt=22)
    split = split_member_nonmember(len(members), len(nonmembers), seed=cfg.seed)
    p_mem, p_non = target.probabilities(members.images), target.probabilities(nonmembers.images)

    def part(which: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(posteriors, labels, is_member) of the attack-training ("train") or evaluation ("eval") half."""
        im, inn = split[f"{which}_members"], split[f"{which}_nonmembers"]
        probs = torch.cat([p_mem[im], p_non[inn]])
        labels = torch.cat([members.labels[im], nonmembers.labels[inn]])
        is_member = torch.cat([torch.ones(len(im), dtype=torch.bool), torch.zeros(len(inn), dtype=torch.bool)])
        return probs, labels, is_member

    (p_tr, y_tr, m_tr), (p_ev, y_ev, m_ev) = part("train"), part("eval")
    out: dict[str, float] = {}
    for kind, auc_name, acc_name in (("correctness", AUC_CORRECTNESS, ACC_CORRECTNESS), ("mentr", AUC_MENTR, ACC_MENTR)):
        s_tr, s_ev = metric_scores(p_tr, y_tr, kind), metric_scores(p_ev, y_ev, kind)
        out[auc_name] = roc_auc(s_ev, m_ev)
        out[acc_name] = threshold_accuracy(s_ev, m_ev, fit_threshold(s_tr, m_tr))
    f_tr, f_ev = attack_features(p_tr, cfg.mlp_input), attack_features(p_ev, cfg.mlp_input)
    net = train_attack(f_tr[m_tr], f_tr[~m_tr], epochs=cfg.mlp_epochs, lr=cfg.mlp_lr,
                       batch_size=cfg.mlp_batch_size, seed=cfg.seed)
    scores = predict_membership(net, f_ev)
    out[AUC_MLP] = roc_auc(scores, m_ev)
    out[ACC_MLP] = threshold_accuracy(scores, m_ev, 0.5)
    out[ATTACK_TRAIN_SIZE], out[ATTACK_EVAL_SIZE] = float(len(m_tr)), float(len(m_ev))
    ctx.save_output("attack_model", net.state_dict())
    audit.report(ctx, target, out)
