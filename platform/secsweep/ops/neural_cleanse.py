"""Neural Cleanse trigger reverse-engineering and MAD outlier test (docs/methods.md §5.6).

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks"
(IEEE S&P 2019). For every label, optimise the smallest mask m and pattern p such that
(1 - m) * x + m * p is classified as that label; a label whose mask L1 norm is an outlier on the
small side (anomaly index > 2) is the backdoor target. FTP gives no NC setting; SecurityNet gives two
(docs/methods.md §5.6: 50 epochs, "their default threshold"); everything else is NC's default as
released by the authors, named in each docstring.

Pure functions of a model and a tensor batch: no data loading, no device selection (everything runs
on the images' device), no I/O.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["stamp", "reverse_engineer_trigger", "anomaly_index", "flagged_classes", "MAD_CONSISTENCY"]

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of a normal's standard deviation (NC)


def stamp(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Apply a (mask, pattern) trigger: (1 - mask) * images + mask * pattern (NC's injection function).

    Args:
        images: (N, C, H, W) or (C, H, W) inputs in [0, 1].
        mask: (1, H, W) or (H, W) blending weights in [0, 1], shared by all channels.
        pattern: (C, H, W) trigger pattern in [0, 1] (or (1, H, W), broadcast over channels).

    Returns:
        a new tensor shaped like `images`.
    """
    if images.dim() not in (3, 4):
        raise ValueError(f"images shape={tuple(images.shape)}: must be (N, C, H, W) or (C, H, W)")
    hw = tuple(images.shape[-2:])
    bad_mask = mask.dim() not in (2, 3) or (mask.dim() == 3 and mask.shape[0] != 1)
    if bad_mask or tuple(mask.shape[-2:]) != hw:
        raise ValueError(f"mask shape={tuple(mask.shape)}: must be (1, H, W) or (H, W) with (H, W)={hw}")
    c = images.shape[-3]
    if pattern.dim() != 3 or tuple(pattern.shape[-2:]) != hw or pattern.shape[0] not in (1, c):
        raise ValueError(
            f"pattern shape={tuple(pattern.shape)}: must be ({c}, H, W) or (1, H, W) with (H, W)={hw}"
        )
    m = mask.to(images.dtype).to(images.device)
    return (1.0 - m) * images + m * pattern.to(images.dtype).to(images.device)


def _to_unit(raw: torch.Tensor) -> torch.Tensor:
    """tanh parameterisation of NC: unconstrained raw -> (0, 1)."""
    return (torch.tanh(raw) + 1.0) / 2.0


@torch.no_grad()
def _success_rate(
    model: nn.Module,
    images: torch.Tensor,
    mask: torch.Tensor,
    pattern: torch.Tensor,
    target: int,
    batch_size: int,
) -> float:
    """Fraction of stamped `images` classified as `target`."""
    hits = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(stamp(images[start : start + batch_size], mask, pattern))
        hits += int((logits.argmax(dim=1) == target).sum())
    return hits / images.shape[0]


def init_trigger(channels: int, height: int, width: int, *, seed: int, lr: float, device: torch.device | str):
    """A trigger's raw mask (1, H, W) and pattern (C, H, W), tanh-parametrised (`_to_unit` maps them
    into (0, 1)) and drawn uniformly in (0.01, 0.99) by `seed`, with their Adam optimiser (betas 0.5,
    0.9: Neural Cleanse's public setting), and the generator, which the caller goes on drawing from
    (batch orders). Shared by Neural Cleanse and DECREE's inversion."""
    gen = torch.Generator().manual_seed(seed)
    mask_raw = torch.atanh(2.0 * (0.01 + 0.98 * torch.rand((1, height, width), generator=gen)) - 1.0).to(device)
    pattern_raw = torch.atanh(2.0 * (0.01 + 0.98 * torch.rand((channels, height, width), generator=gen)) - 1.0).to(device)
    mask_raw.requires_grad_(True)
    pattern_raw.requires_grad_(True)
    return mask_raw, pattern_raw, torch.optim.Adam([mask_raw, pattern_raw], lr=lr, betas=(0.5, 0.9)), gen


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode with no parameter gradients while a trigger is optimised through it;
    every parameter's requires_grad and the model's training flag are restored on exit."""
    was_training = model.training
    grad_flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)


def reverse_engineer_trigger(
    model: nn.Module,
    images: torch.Tensor,
    target: int,
    *,
    steps: int = 200,
    lr: float = 0.1,
    init_cost: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    asr_threshold: float = 0.99,
    patience: int = 5,
    cost_multiplier: float = 1.5,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Reverse-engineer the minimal trigger that sends `images` to label `target` (NC's reverse engineering).

    Minimises CE(model((1 - m) * x + m * p), target) + cost * |m|_1 over m = (tanh(a) + 1) / 2 and
    p = (tanh(b) + 1) / 2 with Adam (betas 0.5, 0.9 as NC's code), and adapts `cost` as NC does:
    once the attack success rate (ASR) of an epoch has reached `asr_threshold` for `patience`
    consecutive epochs, cost *= cost_multiplier; after `patience` consecutive epochs below it,
    cost /= cost_multiplier ** 1.5 (NC's asymmetric down-step). init_cost = 0 disables the L1
    term for good (NC's extra "start the cost once the attack works" branch is left out). The
    returned trigger is the one with the smallest mask L1 among epochs whose ASR reached the
    threshold (the last one if none did).

    An "epoch" here is ceil(N / batch_size) optimisation steps over a fresh permutation of
    `images`, and ASR is measured on the epoch's stamped batches before each update, as in NC.

    Defaults: lr 0.1, init_cost 1e-3, asr_threshold 0.99, patience 5, cost multiplier 1.5,
    batch 32 — NC's released defaults. `steps` counts optimisation steps (mini-batches) and its
    default 200 is a CPU-sized smoke value, NOT a paper value: NC runs up to 1000 epochs of
    ~31 mini-batches with early stopping, SecurityNet 50 epochs (docs/methods.md §5.6); set it from
    the trainable's config. Simplifications: no early stopping (the full `steps` always run);
    the initial mask and pattern are seeded uniform draws in [0.01, 0.99].

    `images` must already be in the model's input space in [0, 1] (wrap normalisation into the
    model). The model runs in eval mode with frozen parameters; its training flag and every
    parameter's requires_grad are restored afterwards. Images of the target class itself may
    be included or not — that is the caller's choice (NC uses clean samples of all classes).

    Args:
        model: classifier mapping (n, C, H, W) -> (n, K) logits.
        images: (N, C, H, W) clean images in [0, 1].
        target: label to reverse-engineer a trigger for, in [0, K).
        steps: optimisation steps (mini-batches), >= 1.
        lr: Adam learning rate per step, > 0.
        init_cost: initial weight of the mask L1 term (per pixel of mask), >= 0.
        batch_size: images per step, >= 1.
        seed: seed of the initial mask/pattern and the batch order.
        asr_threshold: ASR in (0, 1] counted as "attack succeeds".
        patience: epochs before the cost is raised or lowered, >= 1.
        cost_multiplier: factor > 1 for raising the cost (lowering uses its 1.5th power).

    Returns:
        (mask (1, H, W) in [0, 1], pattern (C, H, W) in [0, 1], mask L1 norm in pixels,
        attack success rate of the returned trigger on all `images`, fraction in [0, 1]).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images shape={shape}: must be a non-empty (N, C, H, W) tensor")
    if not isinstance(target, int) or isinstance(target, bool) or target < 0:
        raise ValueError(f"target={target!r}: must be a non-negative int class index")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: must be an int >= 1")
    if not lr > 0.0:
        raise ValueError(f"lr={lr}: must be > 0")
    if not init_cost >= 0.0:
        raise ValueError(f"init_cost={init_cost}: must be >= 0")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1")
    if not 0.0 < asr_threshold <= 1.0:
        raise ValueError(f"asr_threshold={asr_threshold}: must be in (0, 1]")
    if not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience={patience!r}: must be an int >= 1")
    if not cost_multiplier > 1.0:
        raise ValueError(f"cost_multiplier={cost_multiplier}: must be > 1")

    n, c, h, w = images.shape
    device = images.device
    images = images.detach()
    mask_raw, pattern_raw, opt, gen = init_trigger(c, h, w, seed=seed, lr=lr, device=device)
    cost_up, cost_down = cost_multiplier, cost_multiplier**1.5

    with frozen(model):
        with torch.no_grad():
            n_classes = model(images[:1]).shape[1]
        if target >= n_classes:
            raise ValueError(f"target={target}: must be < number of classes {n_classes}")
        labels = torch.full((n,), target, dtype=torch.long, device=device)
        cost = init_cost  # weight of the L1 term
        up_count = down_count = 0  # epochs in a row at-or-above / below the ASR threshold
        best_l1 = math.inf
        best: tuple[torch.Tensor, torch.Tensor] | None = None
        steps_per_epoch = math.ceil(n / batch_size)
        hits = seen = 0
        order = torch.randperm(n, generator=gen).to(device)
        for step in range(steps):
            pos = step % steps_per_epoch
            if pos == 0 and step > 0:
                order = torch.randperm(n, generator=gen).to(device)
            idx = order[pos * batch_size : (pos + 1) * batch_size]
            mask, pattern = _to_unit(mask_raw), _to_unit(pattern_raw)
            logits = model(stamp(images[idx], mask, pattern))
            loss = F.cross_entropy(logits, labels[idx]) + cost * mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hits += int((logits.detach().argmax(dim=1) == target).sum())
            seen += idx.numel()
            if pos != steps_per_epoch - 1 and step != steps - 1:
                continue
            # end of an epoch: NC's bookkeeping on the epoch's ASR
            epoch_asr = hits / seen
            hits = seen = 0
            with torch.no_grad():
                mask_now, pattern_now = _to_unit(mask_raw), _to_unit(pattern_raw)
                l1_now = float(mask_now.sum())
            if epoch_asr >= asr_threshold and l1_now < best_l1:
                best_l1, best = l1_now, (mask_now.clone(), pattern_now.clone())
            if epoch_asr >= asr_threshold:
                up_count, down_count = up_count + 1, 0
            else:
                up_count, down_count = 0, down_count + 1
            if up_count >= patience:
                up_count, cost = 0, cost * cost_up
            elif down_count >= patience:
                down_count, cost = 0, cost / cost_down
        if best is None:
            with torch.no_grad():
                best = (_to_unit(mask_raw).clone(), _to_unit(pattern_raw).clone())
        mask_out, pattern_out = best
        asr = _success_rate(model, images, mask_out, pattern_out, target, batch_size)
    return mask_out.detach(), pattern_out.detach(), float(mask_out.sum()), asr


def _median(x: torch.Tensor) -> torch.Tensor:
    """Median averaging the two middle values for even lengths (as numpy; torch.median does not)."""
    s = x.sort().values
    mid = s.numel() // 2
    return s[mid] if s.numel() % 2 else (s[mid - 1] + s[mid]) / 2.0


def anomaly_index(norms: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """NC's MAD-based anomaly index per class: |x - median| / (1.4826 * MAD).

    MAD = median(|x - median|). When MAD is 0 (at least half of the norms equal the median), the
    index is 0 for norms at the median and +inf for the others.

    Args:
        norms: per-class mask L1 norms, at least 2, finite.

    Returns:
        (K,) float64 anomaly indices >= 0.
    """
    x = torch.as_tensor(norms, dtype=torch.float64).flatten().cpu()
    if x.numel() < 2 or not torch.isfinite(x).all():
        raise ValueError(f"norms={x.tolist()}: must be at least 2 finite per-class mask norms")
    med = _median(x)
    dev = (x - med).abs()
    mad = _median(dev)
    if mad == 0:
        return torch.where(dev == 0, torch.zeros_like(dev), torch.full_like(dev, math.inf))
    return dev / (MAD_CONSISTENCY * mad)


def flagged_classes(norms: Sequence[float] | torch.Tensor, threshold: float = 2.0) -> list[int]:
    """Classes NC flags as backdoor targets: norm below the median and anomaly index > threshold.

    threshold 2 is NC's (a normal's two-sigma rule, ~95 % confidence); SecurityNet uses "their
    default threshold" (docs/methods.md §5.6). Only small norms count: a target needs an abnormally
    small trigger.
    """
    if not threshold > 0.0:
        raise ValueError(f"threshold={threshold}: must be > 0 (anomaly index)")
    x = torch.as_tensor(norms, dtype=torch.float64).flatten().cpu()
    index = anomaly_index(x)
    below = x < _median(x)
    return [int(i) for i in torch.nonzero(below & (index > threshold)).flatten()]
