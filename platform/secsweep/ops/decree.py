"""DECREE: trigger inversion on a self-supervised encoder (docs/methods.md, "DECREE").

Feng et al., "Detecting Backdoors in Pre-trained Encoders" (CVPR 2023). No labels and no
downstream task: optimise a mask m (1, H, W) and a pattern p (C, H, W), both in [0, 1], such that
clean shadow images stamped with them, x' = (1 - m) x + m p, collapse to one embedding:

    loss(m, p) = - mean_{i != j} cos(E(x'_i), E(x'_j)) + lambda * mean(m)

(`collapse_similarity` is the first term's similarity; the L1 term is the mask's mean, i.e. its
L1 norm as a fraction of the image, so lambda means the same at every image size). lambda adapts
as in Neural Cleanse's search (secsweep.ops.neural_cleanse): after `patience` epochs in a row at or
above the target similarity it is multiplied by `lambda_multiplier`, after `patience` epochs below
it divided by `lambda_multiplier ** 1.5`; the returned trigger is the smallest mask among epochs
whose similarity reached the target. A backdoored encoder collapses for a small patch (its own
trigger); a clean one needs a large part of the image replaced.

Encoder-level decision: the inverted trigger's L1 norm relative to the image size,
`l1_fraction = sum(m) / (H W)`; the encoder is flagged when it is below a threshold (the trainable's
field; DECREE's paper calls the quantity the PL1-norm).

Per-sample score (the adaptation DeDe's paper uses to compare DECREE with sample detectors): a norm
between the optimised pattern and the image content inside the trigger region,
`region_distance(x) = (sum m |x - p|^q / sum m)^(1/q)` (mask-weighted, per channel-pixel of the
region; q = 1 or 2, the paper's norm is not legible). A stamped input carries the trigger where m
is large, so its distance is small.

Pure tensor code: a model and tensors in, tensors and numbers out; no data loading, no device
choice (everything runs on the images' device), no I/O.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .neural_cleanse import frozen, init_trigger, stamp

__all__ = ["Inversion", "collapse_similarity", "l1_fraction", "invert_trigger", "region_distance"]

# defaults (each a field of the DECREE trainable; why each value is in its docstring there)
TARGET_SIMILARITY = 0.95   # mean pairwise cosine counted as "collapsed"
LAMBDA_INIT = 1.0          # weight of mean(m) at the start (per unit of image fraction)
LAMBDA_MULTIPLIER = 1.5    # NC's factor (down-steps use its 1.5th power, as NC)
PATIENCE = 3               # epochs before lambda moves


class Inversion(NamedTuple):
    """The inverted trigger and what the search saw."""

    mask: torch.Tensor      # (1, H, W) in [0, 1]
    pattern: torch.Tensor   # (C, H, W) in [0, 1]
    similarity: float       # mean pairwise cosine of the stamped images' embeddings (all images)
    l1_fraction: float      # sum(mask) / (H W), in [0, 1]
    reached: bool           # some epoch reached the target similarity (else: the last trigger)
    history: list[dict[str, float]]  # per epoch: similarity, l1_fraction, lambda


def collapse_similarity(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over all ordered pairs i != j of the rows of (N, D) `embeddings`
    (N >= 2); 1 when every row points the same way. Differentiable."""
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or embeddings.shape[0] < 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"embeddings shape={shape}: must be (N, D) with N >= 2")
    z = F.normalize(embeddings, dim=1)
    n = z.shape[0]
    total = z.sum(dim=0)
    # sum_{i,j} cos = |sum z|^2; the diagonal contributes n
    return (total @ total - n) / (n * (n - 1))


def l1_fraction(mask: torch.Tensor) -> float:
    """sum(mask) / (H W): the trigger's L1 norm relative to the image size, in [0, 1]."""
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask shape={shape}: must be (1, H, W) or (H, W)")
    h, w = mask.shape[-2:]
    return float(mask.sum()) / (h * w)


def _to_unit(raw: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(raw) + 1.0) / 2.0


def _stamped_similarity(encoder: nn.Module, images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor,
                        batch_size: int) -> float:
    """collapse_similarity over all `images` stamped with (mask, pattern), batched, no gradient."""
    with torch.no_grad():
        z = torch.cat([F.normalize(encoder(stamp(images[i : i + batch_size], mask, pattern)), dim=1)
                       for i in range(0, images.shape[0], batch_size)])
    return float(collapse_similarity(z))


def invert_trigger(
    encoder: nn.Module,
    images: torch.Tensor,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 0.1,
    lambda_init: float = LAMBDA_INIT,
    target_similarity: float = TARGET_SIMILARITY,
    lambda_multiplier: float = LAMBDA_MULTIPLIER,
    patience: int = PATIENCE,
    seed: int = 0,
) -> Inversion:
    """Invert the smallest trigger that collapses `encoder`'s embeddings of stamped `images`.

    Minimises -collapse_similarity(E((1 - m) x + m p)) + lambda mean(m) over m = (tanh(a) + 1) / 2,
    p = (tanh(b) + 1) / 2 with Adam (betas 0.5, 0.9, as NC's search), adapting lambda (module
    docstring). An epoch is ceil(N / batch_size) steps over a fresh seeded permutation; its
    similarity is the mean of its batches' (before each update). Initial mask and pattern: seeded
    uniform draws in [0.01, 0.99].

    The encoder runs in eval mode with frozen parameters; its training flag and every parameter's
    requires_grad are restored afterwards. `images` (N >= 2, C, H, W) in [0, 1] on the encoder's
    device, at its input size.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 2:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images shape={shape}: must be (N, C, H, W) with N >= 2")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("patience", patience)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an int >= 1")
    if batch_size < 2:
        raise ValueError(f"batch_size={batch_size}: must be >= 2 (pairwise similarity)")
    if not lr > 0.0:
        raise ValueError(f"lr={lr}: must be > 0")
    if not lambda_init >= 0.0:
        raise ValueError(f"lambda_init={lambda_init}: must be >= 0")
    if not 0.0 < target_similarity <= 1.0:
        raise ValueError(f"target_similarity={target_similarity}: must be in (0, 1]")
    if not lambda_multiplier > 1.0:
        raise ValueError(f"lambda_multiplier={lambda_multiplier}: must be > 1")

    n, c, h, w = images.shape
    device = images.device
    images = images.detach()
    mask_raw, pattern_raw, opt, gen = init_trigger(c, h, w, seed=seed, lr=lr, device=device)
    up_step, down_step = lambda_multiplier, lambda_multiplier**1.5

    with frozen(encoder):
        lam = lambda_init
        up = down = 0
        best: tuple[float, torch.Tensor, torch.Tensor] | None = None  # (l1 fraction, mask, pattern)
        history: list[dict[str, float]] = []
        steps = math.ceil(n / batch_size)
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(device)
            sims = []
            for k in range(steps):
                idx = order[k * batch_size : (k + 1) * batch_size]
                if idx.numel() < 2:  # a last batch of one has no pair
                    continue
                mask, pattern = _to_unit(mask_raw), _to_unit(pattern_raw)
                sim = collapse_similarity(encoder(stamp(images[idx], mask, pattern)))
                loss = -sim + lam * mask.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sims.append(float(sim.detach()))
            epoch_sim = sum(sims) / len(sims)
            with torch.no_grad():
                mask_now, pattern_now = _to_unit(mask_raw), _to_unit(pattern_raw)
            frac = l1_fraction(mask_now)
            history.append({"similarity": epoch_sim, "l1_fraction": frac, "lambda": lam})
            if epoch_sim >= target_similarity:
                if best is None or frac < best[0]:
                    best = (frac, mask_now.clone(), pattern_now.clone())
                up, down = up + 1, 0
            else:
                up, down = 0, down + 1
            if up >= patience:
                up, lam = 0, lam * up_step
            elif down >= patience:
                down, lam = 0, lam / down_step
        reached = best is not None
        if best is None:
            with torch.no_grad():
                m, p = _to_unit(mask_raw).clone(), _to_unit(pattern_raw).clone()
            best = (l1_fraction(m), m, p)
        frac, mask_out, pattern_out = best
        similarity = _stamped_similarity(encoder, images, mask_out, pattern_out, max(batch_size, 2))
    return Inversion(mask_out.detach(), pattern_out.detach(), similarity, frac, reached, history)


def region_distance(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor, norm: int = 1) -> torch.Tensor:
    """Per-image distance between the pattern and the image inside the trigger region:
    (sum_{c,h,w} m |x - p|^q / (C sum m))^(1/q), q = `norm` (1 or 2), in [0, 1] for images and
    pattern in [0, 1]. Small for an image that carries the inverted trigger.

    Args:
        images: (N, C, H, W) in [0, 1].
        mask: (1, H, W) in [0, 1], not all zero.
        pattern: (C, H, W) or (1, H, W) in [0, 1].
    Returns:
        (N,) float distances.
    """
    if norm not in (1, 2):
        raise ValueError(f"norm={norm!r}: must be 1 or 2")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images shape={shape}: must be (N, C, H, W)")
    if mask.dim() != 3 or mask.shape[0] != 1 or tuple(mask.shape[-2:]) != tuple(images.shape[-2:]):
        raise ValueError(f"mask shape={tuple(mask.shape)}: must be (1, H, W) with (H, W)={tuple(images.shape[-2:])}")
    c = images.shape[1]
    if pattern.dim() != 3 or pattern.shape[0] not in (1, c) or tuple(pattern.shape[-2:]) != tuple(images.shape[-2:]):
        raise ValueError(f"pattern shape={tuple(pattern.shape)}: must be ({c}, H, W) or (1, H, W)")
    m = mask.to(images)
    total = float(m.sum())
    if not total > 0.0:
        raise ValueError("mask: must not be all zero (no trigger region)")
    diff = (images - pattern.to(images)).abs().pow(norm)
    per = (diff * m).sum(dim=(1, 2, 3)) / (c * total)
    return per.pow(1.0 / norm)
