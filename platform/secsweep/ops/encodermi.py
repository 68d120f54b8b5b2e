"""EncoderMI: membership inference against a pre-trained encoder from its augmented views.

Liu et al., *EncoderMI: Membership Inference against Pre-trained Encoders in Contrastive Learning*
(CCS 2021); docs/methods.md (EncoderMI). An encoder pre-trained by contrastive learning maps
augmented views of its *training* images closer together than views of unseen images, so the
attacker queries the encoder with N augmented views of a sample, computes the pairwise similarities
of the N embeddings and feeds them to an inference classifier trained on a shadow encoder (pre-trained
on a shadow member half; the other half are the shadow non-members).

Pure tensor code: embeddings in, similarity features / membership scores out. Generating the views
(`secsweep.ops.ssl.augment`) and querying the encoders is the trainable's job.

* `similarity_features`: cosine similarity of every pair of the N views of a sample, N(N - 1)/2
  scores; N = 10 (`N_VIEWS`) is the talk's value (docs/methods.md). The talk does not name the
  similarity function; cosine is used here, the similarity the contrastive losses themselves train.
* Three inference classifiers, each trained on shadow features and applied to target features:
  - vector-based: an MLP on the similarity vector sorted in descending order (sorting makes the
    vector independent of the arbitrary order of the views): `secsweep.ops.mia.MIAttackNet`
    (64-32 ReLU MLP) trained by `secsweep.ops.mia.train_attack` (Adam, lr 0.01, `ATTACK_EPOCHS` passes);
  - set-based: a permutation-invariant DeepSets classifier (Zaheer et al. 2017),
    rho(mean_j phi(s_j)), over the set of similarity scores (`SetClassifier`);
  - threshold-based: "member iff the mean pairwise similarity >= t", with t chosen to maximise
    accuracy on the shadow data (balanced accuracy, `secsweep.ops.mia.fit_threshold`; the shadow
    halves are equal, where the two coincide).
  The talk leaves every classifier's internals open; the choices above are this platform's.
  Both trained classifiers stop early (`ATTACK_EPOCHS` = 5 passes over the shadow data): the
  shadow's member signal is weak and its set small (64 + 64 samples at the trainable's default;
  mean-similarity AUC 0.57 on the shadow itself), and at MIA's usual 50 passes both MLPs fit the
  shadow's noise and transfer at or below chance (measured on the EncoderMI trainable's default
  encoders, target AUC over 128 queries, mean of 3 classifier seeds: vector 0.50 / set 0.42 at 50
  passes, 0.60 / 0.59 at 5; control 0.48 / 0.43 at 50, 0.51 / 0.49 at 5; docs/methods.md, EncoderMI).

Every score follows the membership convention of `secsweep.ops.mia`: higher = more likely a member;
an `Inference` carries the scores and the threshold its hard predictions use, and
`secsweep.ops.mia.evaluate_attack(inf.scores, is_member, inf.threshold)` gives accuracy and AUC.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from secsweep.ops import mia

__all__ = [
    "N_VIEWS",
    "CLASSIFIERS",
    "similarity_features",
    "SetClassifier",
    "Inference",
    "vector_inference",
    "set_inference",
    "threshold_inference",
    "infer_membership",
    "evaluate",
]

N_VIEWS = 10  # augmented views per sample (EncoderMI talk, docs/methods.md)
CLASSIFIERS = ("vector", "set", "threshold")
SET_HIDDEN = 32   # width of phi and rho in the set classifier (chosen here; the talk is silent)
ATTACK_EPOCHS = 5  # passes of both trained classifiers over the shadow data: early stopping (module docstring)
SET_EPOCHS = ATTACK_EPOCHS   # the set classifier's recipe matches the vector one's
SET_LR = 0.01
BATCH_SIZE = 128


def similarity_features(embeddings: torch.Tensor, *, sort: bool = False) -> torch.Tensor:
    """Pairwise cosine similarities of the views of each sample.

    Args:
        embeddings: (N_samples, n_views, D) encoder outputs, n_views >= 2.
        sort: sort each row in descending order (the vector-based classifier's input).

    Returns:
        (N_samples, n_views (n_views - 1) / 2) float tensor; unsorted, column order is the pairs
        (i, j), i < j, in row-major order (0,1), (0,2), ..., (n-2, n-1).
    """
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 3 or embeddings.shape[1] < 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"embeddings shape={shape}: must be (N_samples, n_views >= 2, D)")
    z = F.normalize(embeddings.float(), dim=2)
    sim = z @ z.transpose(1, 2)                                   # (N, n, n) cosine similarities
    i, j = torch.triu_indices(z.shape[1], z.shape[1], offset=1, device=z.device)
    feats = sim[:, i, j]
    return feats.sort(dim=1, descending=True).values if sort else feats


class SetClassifier(nn.Module):
    """DeepSets membership classifier over a set of similarity scores: rho(mean_j phi(s_j)).

    phi: Linear(1, h)-ReLU-Linear(h, h)-ReLU per score; mean pooling (invariant to the order of the
    scores and independent of how many there are); rho: Linear(h, h)-ReLU-Linear(h, 1) -> one
    membership logit. h = 32 (chosen here).
    """

    def __init__(self, hidden: int = SET_HIDDEN) -> None:
        super().__init__()
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden={hidden!r}: must be an int >= 1")
        self.phi = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.rho = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """(N, P) similarity scores -> (N,) membership logits."""
        return self.rho(self.phi(scores.unsqueeze(-1)).mean(dim=1)).squeeze(-1)


@dataclass(frozen=True)
class Inference:
    """Membership scores of the target samples (higher = member) and the threshold of the hard
    predictions "member iff score >= threshold" (0.5 for the classifiers' probabilities)."""

    scores: torch.Tensor
    threshold: float

    @property
    def predictions(self) -> torch.Tensor:
        """(N,) bool hard membership predictions."""
        return self.scores >= self.threshold


def _check(shadow: torch.Tensor, shadow_is_member: torch.Tensor, target: torch.Tensor) -> None:
    for name, x in (("shadow", shadow), ("target", target)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} shape={shape}: must be non-empty (N, pairs) similarity features")
    if shadow.shape[1] != target.shape[1]:
        raise ValueError(f"target pairs={target.shape[1]}: must equal shadow pairs={shadow.shape[1]} "
                         "(the same number of views for both encoders)")
    if not isinstance(shadow_is_member, torch.Tensor) or shadow_is_member.shape != shadow.shape[:1] \
            or shadow_is_member.dtype != torch.bool:
        raise ValueError(f"shadow_is_member: must be a bool tensor of shape ({shadow.shape[0]},)")
    n_pos = int(shadow_is_member.sum())
    if n_pos == 0 or n_pos == shadow.shape[0]:
        raise ValueError(f"shadow_is_member has {n_pos} members of {shadow.shape[0]}: both groups must be non-empty")


def vector_inference(
    shadow: torch.Tensor,
    shadow_is_member: torch.Tensor,
    target: torch.Tensor,
    *,
    epochs: int = ATTACK_EPOCHS,
    lr: float = 0.01,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
) -> Inference:
    """Vector-based classifier: MLP on the descending-sorted similarity vector.

    Args:
        shadow: (M, P) similarity features (`similarity_features`, unsorted or sorted) of the
            shadow samples on the shadow encoder.
        shadow_is_member: (M,) bool, True for the shadow encoder's training samples.
        target: (N, P) similarity features of the query samples on the target encoder.
    """
    _check(shadow, shadow_is_member, target)
    s = shadow.float().sort(dim=1, descending=True).values
    t = target.float().sort(dim=1, descending=True).values
    m = shadow_is_member.to(s.device)
    net = mia.train_attack(s[m], s[~m], epochs=epochs, lr=lr,
                           batch_size=batch_size, seed=seed)
    return Inference(scores=mia.predict_membership(net, t.to(s.device)), threshold=0.5)


def set_inference(
    shadow: torch.Tensor,
    shadow_is_member: torch.Tensor,
    target: torch.Tensor,
    *,
    epochs: int = SET_EPOCHS,
    lr: float = SET_LR,
    batch_size: int = BATCH_SIZE,
    hidden: int = SET_HIDDEN,
    seed: int = 0,
) -> Inference:
    """Set-based classifier: `SetClassifier` trained with binary cross-entropy (Adam, seeded init
    and shuffling, the caller's RNG untouched) on the shadow features; arguments as
    `vector_inference`. The order of the scores within a row does not matter."""
    _check(shadow, shadow_is_member, target)
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r}: must be an int >= 1")
    if not lr > 0.0:
        raise ValueError(f"lr={lr}: must be > 0")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1")
    device = shadow.device
    x = shadow.detach().float()
    y = shadow_is_member.to(device).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SetClassifier(hidden)
    net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=gen).to(device)
            for start in range(0, x.shape[0], batch_size):
                idx = order[start : start + batch_size]
                loss = F.binary_cross_entropy_with_logits(net(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    net.eval()
    with torch.no_grad():
        scores = torch.sigmoid(net(target.detach().float().to(device)))
    return Inference(scores=scores, threshold=0.5)


def threshold_inference(shadow: torch.Tensor, shadow_is_member: torch.Tensor, target: torch.Tensor) -> Inference:
    """Threshold-based: score = mean pairwise similarity; the threshold maximises (balanced)
    accuracy on the shadow scores (`secsweep.ops.mia.fit_threshold`). Arguments as `vector_inference`."""
    _check(shadow, shadow_is_member, target)
    t = mia.fit_threshold(shadow.float().mean(dim=1), shadow_is_member.to(shadow.device))
    return Inference(scores=target.float().mean(dim=1), threshold=t)


def infer_membership(
    kind: str, shadow: torch.Tensor, shadow_is_member: torch.Tensor, target: torch.Tensor, *, seed: int = 0
) -> Inference:
    """Dispatch on `kind` in CLASSIFIERS with the default recipes (`seed` for the trained ones)."""
    if kind == "vector":
        return vector_inference(shadow, shadow_is_member, target, seed=seed)
    if kind == "set":
        return set_inference(shadow, shadow_is_member, target, seed=seed)
    if kind == "threshold":
        return threshold_inference(shadow, shadow_is_member, target)
    raise ValueError(f"kind={kind!r}: must be one of {', '.join(CLASSIFIERS)}")


def evaluate(inference: Inference, is_member: torch.Tensor) -> dict[str, float]:
    """Accuracy, balanced accuracy, AUC, TPR and FPR of an `Inference` on samples of known
    membership (`secsweep.ops.mia.evaluate_attack` at the inference's threshold)."""
    return mia.evaluate_attack(inference.scores, is_member.to(inference.scores.device), inference.threshold)
