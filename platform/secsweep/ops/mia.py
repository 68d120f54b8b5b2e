"""Membership inference: metric scores, the NN attack, the member/non-member split, evaluation.

docs/methods.md §6.1 (T ch.3 / FTP §6.1: NN-based attack on backdoored and defended models, ML-Doctor
threat model, and SecurityNet: metric-based attacks of Song & Mittal and an MLP attack).
Pure tensor code: posteriors in, scores / models / numbers out. Every score follows one
convention: higher = more likely a member.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from secsweep import names

__all__ = [
    "mentr",
    "metric_scores",
    "split_member_nonmember",
    "attack_features",
    "MIAttackNet",
    "train_attack",
    "predict_membership",
    "roc_auc",
    "evaluate_attack",
    "fit_threshold",
    "threshold_accuracy",
    "best_threshold_accuracy",
]

METRIC_KINDS = ("confidence", "entropy", "mentr", "correctness")
FEATURE_KINDS = ("full", "sorted", "top3")
_TINY = 1e-30  # probability floor before log; Song & Mittal's code uses the same 1e-30


def _check_probs(probs: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or probs.shape[1] < 2:
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"probs shape={shape}: must be (N, K) posteriors with K >= 2 classes")
    if probs.numel() and (float(probs.min()) < 0.0 or float(probs.max()) > 1.0 + 1e-6):
        lo, hi = float(probs.min()), float(probs.max())
        raise ValueError(f"probs range=[{lo:.3g}, {hi:.3g}]: must be probabilities in [0, 1]; softmax logits first")
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != probs.shape[0]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels shape={shape}: must be a 1-D tensor of length N={probs.shape[0]}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels dtype={labels.dtype}: must be an integer tensor")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= probs.shape[1]):
        lo, hi = int(labels.min()), int(labels.max())
        raise ValueError(f"labels range=[{lo}, {hi}]: must be class indices in [0, {probs.shape[1] - 1}]")


def mentr(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Modified prediction entropy of Song & Mittal ("Systematic Evaluation of Privacy Risks of
    Machine Learning Models", USENIX Security 2021); formula in docs/methods.md §6.1 [EXT]:

        Mentr(p, y) = -(1 - p_y) log(p_y) - sum_{i != y} p_i log(1 - p_i)

    Lower values indicate members (confident and correct). Probabilities and their complements
    are floored at 1e-30 before the log, so one-hot posteriors give finite values.

    Args:
        probs: (N, K) posteriors (softmax outputs).
        labels: (N,) true labels.

    Returns:
        (N,) modified entropy in nats, >= 0.
    """
    _check_probs(probs, labels)
    p = probs.to(torch.promote_types(probs.dtype, torch.float32))
    log_p = torch.log(p.clamp_min(_TINY))
    log_not_p = torch.log((1.0 - p).clamp_min(_TINY))
    onehot = F.one_hot(labels, p.shape[1]).to(torch.bool)
    # true class: (1 - p_y) * -log p_y ; other classes: p_i * -log(1 - p_i)
    terms = torch.where(onehot, -(1.0 - p) * log_p, -p * log_not_p)
    return terms.sum(dim=1)


def metric_scores(probs: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Metric-based membership scores, higher = more likely a member (SecurityNet; docs/methods.md §6.1).

    kind:
        "confidence": p_y, the posterior of the true class (Song & Mittal).
        "entropy": negative prediction entropy, -H(p) (members have sharper posteriors).
        "mentr": negative modified entropy, -Mentr(p, y) (Song & Mittal; SN §3.2).
        "correctness": 1.0 if argmax p == y else 0.0 (Song & Mittal's prediction correctness;
            with `fit_threshold` it becomes "member iff correctly classified").

    Returns:
        (N,) float scores.
    """
    _check_probs(probs, labels)
    if kind not in METRIC_KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {', '.join(METRIC_KINDS)}")
    p = probs.to(torch.promote_types(probs.dtype, torch.float32))
    if kind == "confidence":
        return p.gather(1, labels[:, None]).squeeze(1)
    if kind == "entropy":
        return (p * torch.log(p.clamp_min(_TINY))).sum(dim=1)  # = -H(p)
    if kind == "mentr":
        return -mentr(p, labels)
    return (p.argmax(dim=1) == labels).to(p.dtype)


def split_member_nonmember(n_train: int, n_test: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Member / non-member index split of docs/methods.md §6.1 (ML-Doctor protocol, T§3.5.1).

    Attack training = a random half of the test set (non-members) + as many training samples
    (members); attack evaluation = the other half of the test set + as many *different* training
    samples. E.g. CIFAR-10 (50,000 / 10,000): 5,000 + 5,000 for training, 5,000 + 5,000 for
    evaluation.

    If the training set is too small (n_train < 2 * (n_test // 2)), each of the four parts gets
    n_train // 2 samples, so both halves stay balanced and disjoint.

    Args:
        n_train: size of the target model's training set (members).
        n_test: size of the test set (non-members).
        seed: seed of the random permutations.

    Returns:
        dict with int64 index tensors "train_members", "eval_members" (indices into the
        training set) and "train_nonmembers", "eval_nonmembers" (indices into the test set);
        all four have the same length and the two member (and non-member) parts are disjoint.
    """
    if not isinstance(n_train, int) or n_train < 2:
        raise ValueError(f"n_train={n_train!r}: must be an int >= 2 (training-set size)")
    if not isinstance(n_test, int) or n_test < 2:
        raise ValueError(f"n_test={n_test!r}: must be an int >= 2 (test-set size)")
    gen = torch.Generator().manual_seed(seed)
    per_part = min(n_test // 2, n_train // 2)  # samples in each of the four parts
    test_perm = torch.randperm(n_test, generator=gen)
    train_perm = torch.randperm(n_train, generator=gen)
    return {
        "train_nonmembers": test_perm[:per_part],
        "eval_nonmembers": test_perm[per_part : 2 * per_part],
        "train_members": train_perm[:per_part],
        "eval_members": train_perm[per_part : 2 * per_part],
    }


def attack_features(probs: torch.Tensor, kind: str = "sorted") -> torch.Tensor:
    """Input representation of the NN attack.

    kind:
        "full": the posterior as is (SN §3.2's default input).
        "sorted": the posterior sorted in descending order. Invariant to which class is the true
            one, so one attack model serves all classes (as in ML-Doctor / Salem et al.). T ch.3
            says only "outputs" (docs/methods.md §6.1: input representation [NS]); "sorted" is this
            module's choice.
        "top3": the three largest posteriors, descending (SN's top-3 variant, docs/methods.md §6.1).

    Returns:
        (N, K) for "full"/"sorted", (N, 3) for "top3".
    """
    _check_probs(probs)
    if kind not in FEATURE_KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {', '.join(FEATURE_KINDS)}")
    if kind == "full":
        return probs.clone()
    if kind == "top3" and probs.shape[1] < 3:
        raise ValueError(f"kind='top3' with K={probs.shape[1]} classes: needs K >= 3")
    ordered = probs.sort(dim=1, descending=True).values
    return ordered[:, :3] if kind == "top3" else ordered


class MIAttackNet(nn.Module):
    """Three-layer MLP attack model: Linear(in, 64)-ReLU-Linear(64, 32)-ReLU-Linear(32, 1).

    FTP §6.1 states "three-layer neural network" [S] with widths [NS]; the widths 64/32
    with ReLU are SecurityNet's MLP attack (docs/methods.md §6.1). Outputs one membership logit per sample.
    """

    def __init__(self, in_features: int, hidden: tuple[int, int] = (64, 32)) -> None:
        super().__init__()
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features={in_features!r}: must be an int >= 1")
        if len(hidden) != 2 or any(not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden={hidden!r}: must be two positive ints (widths of the hidden layers)")
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden[0]),
            nn.ReLU(),
            nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(),
            nn.Linear(hidden[1], 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_features) attack features -> (N,) membership logits."""
        return self.net(x).squeeze(-1)


def train_attack(
    x_member: torch.Tensor,
    x_nonmember: torch.Tensor,
    *,
    epochs: int = 50,
    lr: float = 0.01,
    batch_size: int = 128,
    seed: int = 0,
) -> MIAttackNet:
    """Train an `MIAttackNet` on attack features of known members (label 1) and non-members (0).

    Adam, lr 0.01, 50 epochs: SecurityNet's MLP attack ([S] there; docs/methods.md §6.1); T ch.3 leaves them
    [NS]. Loss: binary cross-entropy on the logit ([NS] in both). Mini-batches of 128 shuffled
    samples ([NS]; 128 chosen here). Weight init and shuffling are seeded without touching the
    global RNG. The model is trained on the inputs' device and returned in eval mode.

    Args:
        x_member: (M, F) attack features of members.
        x_nonmember: (M', F) attack features of non-members.
        epochs: passes over the attack-training set.
        lr: Adam learning rate per step.
        batch_size: samples per step.
        seed: seed of initialisation and shuffling.
    """
    for name, x in (("x_member", x_member), ("x_nonmember", x_nonmember)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] == 0:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} shape={shape}: must be a non-empty 2-D tensor (n, features)")
    if x_member.shape[1] != x_nonmember.shape[1]:
        raise ValueError(
            f"x_nonmember features={x_nonmember.shape[1]}: must equal x_member features={x_member.shape[1]}"
        )
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r}: must be an int >= 1")
    if not lr > 0.0:
        raise ValueError(f"lr={lr}: must be > 0")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1")

    device = x_member.device
    x = torch.cat([x_member, x_nonmember.to(device)]).detach().float()
    y = torch.cat([torch.ones(x_member.shape[0]), torch.zeros(x_nonmember.shape[0])]).to(device)
    with torch.random.fork_rng(devices=[]):  # seeded init without changing the caller's RNG
        torch.manual_seed(seed)
        net = MIAttackNet(x.shape[1])
    net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = F.binary_cross_entropy_with_logits(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def predict_membership(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N,) membership probabilities sigmoid(net(x)) of a trained attack model."""
    return torch.sigmoid(net(x.float()))


def _check_scores(scores: torch.Tensor, is_member: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.numel() == 0:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores shape={shape}: must be a non-empty 1-D tensor (N,)")
    if not isinstance(is_member, torch.Tensor) or is_member.shape != scores.shape:
        shape = tuple(is_member.shape) if isinstance(is_member, torch.Tensor) else type(is_member).__name__
        raise ValueError(f"is_member shape={shape}: must be a 1-D bool tensor of length N={scores.numel()}")
    if is_member.dtype != torch.bool:
        raise ValueError(f"is_member dtype={is_member.dtype}: must be torch.bool")


def roc_auc(scores: torch.Tensor, is_member: torch.Tensor) -> float:
    """Area under the ROC curve = P(score of a random member > that of a random non-member), ties
    counted one half: scikit-learn's `roc_auc_score`. NaN if one group is empty (scikit-learn raises
    there; an undefined AUC is reported as NaN, never as a number)."""
    _check_scores(scores, is_member)
    n_pos = int(is_member.sum())
    if n_pos == 0 or n_pos == is_member.numel():
        return math.nan
    from sklearn.metrics import roc_auc_score  # lazy: importing scikit-learn costs 1-3 s per process

    return float(roc_auc_score(is_member.cpu().numpy(), scores.detach().to("cpu", torch.float64).numpy()))


def threshold_accuracy(scores: torch.Tensor, is_member: torch.Tensor, threshold: float) -> float:
    """Accuracy of the rule "member iff score >= threshold"."""
    _check_scores(scores, is_member)
    return ((scores >= threshold) == is_member).float().mean().item()


def evaluate_attack(
    scores: torch.Tensor, is_member: torch.Tensor, threshold: float = 0.5
) -> dict[str, float]:
    """Attack accuracy and AUC on an evaluation set.

    For the NN attack, `scores` are `predict_membership` probabilities and the threshold is 0.5;
    for a metric attack pass the threshold from `fit_threshold` on the attack-training set.

    Returns:
        {"accuracy", "balanced_accuracy", "auc", "tpr", "fpr"} — accuracy of "member iff
        score >= threshold" (FTP's metric, docs/methods.md §6.1; on that balanced split it equals the
        balanced accuracy, the mean of TPR and TNR), ROC-AUC (SN's metric), and the
        true/false positive rates at the threshold (NaN when a group is empty).
    """
    _check_scores(scores, is_member)
    pred = scores >= threshold
    n_pos = int(is_member.sum())
    n_neg = is_member.numel() - n_pos
    tpr = float((pred & is_member).sum()) / n_pos if n_pos else math.nan
    fpr = float((pred & ~is_member).sum()) / n_neg if n_neg else math.nan
    return {
        names.ACCURACY: (pred == is_member).float().mean().item(),
        "balanced_accuracy": (tpr + 1.0 - fpr) / 2.0,
        names.AUC: roc_auc(scores, is_member),
        names.TPR: tpr,
        names.FPR: fpr,
    }


def fit_threshold(scores: torch.Tensor, is_member: torch.Tensor) -> float:
    """Threshold t for "member iff score >= t" that maximises balanced accuracy on this set.

    Meant for the attack-training set; apply the result to the evaluation set with
    `threshold_accuracy` or `evaluate_attack` (Song & Mittal choose metric thresholds on the
    adversary's known members / non-members the same way). The returned t lies halfway between the
    two neighbouring distinct scores, or is +inf when flagging nobody is best. Ties between equally
    good thresholds go to the largest t.
    """
    _check_scores(scores, is_member)
    n_pos = int(is_member.sum())
    n_neg = is_member.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"is_member has {n_pos} members and {n_neg} non-members: both must be > 0")
    # roc_curve without dropping points: thresholds[i] runs over +inf and every distinct score, in
    # descending order, and tpr[i] / fpr[i] are the rates of "member iff score >= thresholds[i]".
    s = scores.detach().to("cpu", torch.float64).numpy()
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(is_member.cpu().numpy(), s, drop_intermediate=False)
    # balanced accuracy (tp / n_pos + tn / n_neg) / 2 ranks like the integer tp * n_neg - fp * n_pos,
    # which compares ties exactly
    tp, fp = np.rint(tpr * n_pos).astype(np.int64), np.rint(fpr * n_neg).astype(np.int64)
    gain = tp * n_neg - fp * n_pos
    best = int(np.flatnonzero(gain == gain.max())[0])  # first = largest threshold among ties
    if math.isinf(thresholds[best]):
        return math.inf
    if best == len(thresholds) - 1:
        return float(thresholds[best])  # the smallest score: flag everyone
    return float((thresholds[best] + thresholds[best + 1]) / 2.0)


def best_threshold_accuracy(scores: torch.Tensor, is_member: torch.Tensor) -> float:
    """Accuracy at the threshold fitted on the same set (an optimistic upper bound; for reported
    numbers fit on the attack-training set and evaluate on the evaluation set)."""
    return threshold_accuracy(scores, is_member, fit_threshold(scores, is_member))
