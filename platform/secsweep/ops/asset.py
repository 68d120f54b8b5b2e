"""ASSET's offset for encoders: two opposite optimisations that leave poisoned samples a high loss
(docs/methods.md, "ASSET").

Pan et al., "ASSET: Robust Backdoor Data Detection Across a Multiplicity of Deep Learning Paradigms"
(USENIX Security 2023). A model is trained to *minimise* a per-sample loss on a small clean base set
B and to *maximise* it on the suspect set S at the same time:

    objective = mean_{x in B} l(x) - w mean_{x in S} l(x)          (minimised; w = `offset_weight`)

The clean samples of S look like B, so the minimisation cancels what the maximisation does to them;
the poisoned samples of S have no counterpart in B and keep a high loss. The score of a suspect
sample is its remaining loss l(x).

The per-sample loss here is a feature loss on the frozen encoder's embeddings (the form is this
package's choice; the documents state only the offset): a learnable projection W (k unit-norm
directions) of the embedding's direction away from the base set's mean embedding mu_B,

    u(x) = (E(x) - mu_B) / |E(x) - mu_B|,      l(x) = mean_k (W_k . u(x))^2   in [0, 1].

It is bounded (unit-norm rows, unit inputs), so the maximisation cannot run away by scaling W,
and the optimum puts W on the directions in which S spreads more than B: those of the poisoned
samples' common displacement (a backdoored encoder maps triggered inputs near one target
embedding). The search is still stochastic (minibatches, Adam), and a trainable selects the epoch
on validation data.

Pure tensor code: features in, per-epoch scores out; everything on the features' device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OffsetProjection", "OffsetRun", "offset_objective", "fit_offset"]


class OffsetProjection(nn.Module):
    """l(x) = mean_k (W_k . u(x))^2 with unit-norm rows W_k and u(x) the unit direction of
    E(x) - centre (module docstring); `centre` is a buffer (the base set's mean embedding)."""

    def __init__(self, centre: torch.Tensor, out_dim: int, generator: torch.Generator | None = None):
        super().__init__()
        if centre.dim() != 1 or centre.numel() == 0:
            raise ValueError(f"centre shape={tuple(centre.shape)}: must be a non-empty (D,) vector")
        if not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"out_dim={out_dim!r}: must be an int >= 1")
        self.register_buffer("centre", centre.detach().clone())
        w = torch.randn(out_dim, centre.numel(), generator=generator, dtype=centre.dtype)
        self.weight = nn.Parameter(w.to(centre.device))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        u = F.normalize(features - self.centre, dim=1)
        w = F.normalize(self.weight, dim=1)
        return (u @ w.T).pow(2).mean(dim=1)


def offset_objective(base_loss: torch.Tensor, suspect_loss: torch.Tensor, offset_weight: float = 1.0) -> torch.Tensor:
    """mean(base_loss) - offset_weight * mean(suspect_loss): minimised (module docstring)."""
    if base_loss.dim() != 1 or suspect_loss.dim() != 1 or base_loss.numel() == 0 or suspect_loss.numel() == 0:
        raise ValueError(f"base_loss shape={tuple(base_loss.shape)}, suspect_loss shape={tuple(suspect_loss.shape)}: "
                         "must be non-empty per-sample (N,) losses")
    if not offset_weight > 0.0:
        raise ValueError(f"offset_weight={offset_weight}: must be > 0")
    return base_loss.mean() - offset_weight * suspect_loss.mean()


class OffsetRun(NamedTuple):
    """Per epoch (index 0 = after the first epoch): the scores of every set given to `fit_offset`
    ("suspect", "base" and the extra sets), and the epoch's mean objective."""

    scores: list[dict[str, torch.Tensor]]
    objective: list[float]


def _check_features(name: str, x: torch.Tensor, dim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} shape={shape}: must be non-empty (N, D) features")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} dim={x.shape[1]}: must equal the base features' dim={dim}")


def fit_offset(
    base: torch.Tensor,
    suspect: torch.Tensor,
    *,
    epochs: int = 10,
    lr: float = 0.01,
    batch_size: int = 128,
    out_dim: int = 4,
    offset_weight: float = 1.0,
    seed: int = 0,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> OffsetRun:
    """Train an `OffsetProjection` with the offset objective and score every set after each epoch.

    An epoch is ceil(|S| / batch_size) Adam steps; each pairs the next suspect batch (a fresh seeded
    permutation per epoch) with a base batch of the same size drawn with replacement (B is small).

    Args:
        base: (N_B, D) embeddings of the clean base set.
        suspect: (N_S, D) embeddings of the suspect set (the set being screened).
        epochs, lr, batch_size, out_dim: the optimisation (>= 1, > 0, >= 1, >= 1).
        offset_weight: w of the objective (> 0).
        seed: initial projection, batch order and base draws.
        extra: further (N, D) embeddings scored every epoch (held-out clean data for a threshold).
    """
    _check_features("base", base)
    d = base.shape[1]
    _check_features("suspect", suspect, d)
    extra = dict(extra or {})
    for name, x in extra.items():
        if name in ("base", "suspect"):
            raise ValueError(f"extra={name!r}: the names 'base' and 'suspect' are taken")
        _check_features(f"extra[{name!r}]", x, d)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an int >= 1")
    if not lr > 0.0:
        raise ValueError(f"lr={lr}: must be > 0")

    base, suspect = base.detach().float(), suspect.detach().float()
    gen = torch.Generator().manual_seed(seed)
    head = OffsetProjection(base.mean(dim=0), out_dim, generator=gen)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    sets = {"suspect": suspect, "base": base, **{k: v.detach().float() for k, v in extra.items()}}
    n_s, n_b = suspect.shape[0], base.shape[0]
    steps = math.ceil(n_s / batch_size)
    run = OffsetRun([], [])
    for _ in range(epochs):
        order = torch.randperm(n_s, generator=gen).to(suspect.device)
        total = 0.0
        for k in range(steps):
            s_idx = order[k * batch_size : (k + 1) * batch_size]
            b_idx = torch.randint(n_b, (s_idx.numel(),), generator=gen).to(base.device)
            loss = offset_objective(head(base[b_idx]), head(suspect[s_idx]), offset_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        with torch.no_grad():
            run.scores.append({name: head(x) for name, x in sets.items()})
        run.objective.append(total / steps)
    return run
