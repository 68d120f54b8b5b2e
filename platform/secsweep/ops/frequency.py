"""LF (low-frequency) trigger: a targeted universal perturbation restricted to low spatial frequencies.

Zeng, Park, Mao & Jia, "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective"
(ICCV 2021). Patch and blend triggers carry strong high-frequency artifacts that a simple
frequency-domain detector finds; the paper's smooth trigger is instead a universal adversarial
perturbation (UAP) towards the target class, computed on a clean model, whose spectrum is passed
through a low-pass filter during the optimisation so that it has no high-frequency content.
BackdoorBench's "LF" attack poisons 10 % of the training set (docs/methods.md §4.6) with such a
precomputed trigger added to the image.

FTP leaves the LF internals [NS] ("BackdoorBench defaults implied", docs/methods.md §4.6). The paper's UAP
inner solver, filter window and budget are not reproduced here; this module makes its own [NS]
choices, all exposed as arguments:
* filter: an ideal (hard, circular) low-pass mask in the 2-D FFT domain, `cutoff` = normalised
  radius (1 = Nyquist along one axis). Ideal rather than Gaussian because it is an exact projection:
  low_pass(low_pass(x)) == low_pass(x), so "no energy above the cutoff" can be checked exactly.
* optimiser: signed-gradient (PGD-style) descent on the cross-entropy towards the target class,
  each step followed by `project_lf` (low-pass, then rescale into the L_inf ball). Rescaling rather
  than clamping keeps the band limit exact: clamping a band-limited signal adds high frequencies.
* budget: eps = 0.05 (about 13/255, intensity units), lr = 0.01 per step, 200 steps of 128 images.

Images are float tensors in [0, 1] shaped (N, C, H, W); the trigger is (C, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LF_CUTOFF = 0.25  # normalised frequency radius kept by the low-pass (1 = Nyquist) [NS]
LF_EPS = 0.05  # L_inf budget of the trigger, intensity units in [0, 1] [NS]
LF_LR = 0.01  # signed-gradient step, intensity units per step [NS]
LF_STEPS = 200  # optimisation steps [NS]
LF_BATCH_SIZE = 128  # images per step [NS]


def low_pass_mask(height: int, width: int, cutoff: float = LF_CUTOFF) -> torch.Tensor:
    """Boolean (H, W // 2 + 1) mask over `torch.fft.rfft2` bins with normalised radius <= cutoff.

    Radius r = sqrt((2 f_y)^2 + (2 f_x)^2) with f in cycles per pixel, so r = 1 is the Nyquist
    frequency along one axis and the checkerboard (f_y = f_x = 1/2) sits at r = sqrt(2).
    """
    if cutoff < 0.0:
        raise ValueError(f"cutoff={cutoff}: must be >= 0 (normalised radius, 1 = Nyquist)")
    if height < 1 or width < 1:
        raise ValueError(f"height, width=({height}, {width}): both must be >= 1 pixel")
    fy = torch.fft.fftfreq(height).abs() * 2.0
    fx = torch.fft.rfftfreq(width) * 2.0
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    return radius <= cutoff + 1e-9


def low_pass(x: torch.Tensor, cutoff: float = LF_CUTOFF) -> torch.Tensor:
    """Keep only spatial frequencies with normalised radius <= `cutoff` (ideal filter, per channel).

    Works on any tensor whose last two dims are (H, W); returns a real tensor of the same shape
    and dtype. cutoff 0 keeps only the per-channel mean; cutoff >= sqrt(2) keeps everything.
    """
    if x.dim() < 2:
        raise ValueError(f"x.shape={tuple(x.shape)}: needs at least 2 dims (..., H, W)")
    h, w = x.shape[-2:]
    mask = low_pass_mask(h, w, cutoff).to(x.device)
    # FFT in float32 or float64; half precision is upcast (torch's half FFTs need power-of-2 sizes)
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    spec = torch.fft.rfft2(xf)
    out = torch.fft.irfft2(spec * mask, s=(h, w))
    return out.to(x.dtype)


def project_lf(delta: torch.Tensor, eps: float = LF_EPS, cutoff: float = LF_CUTOFF) -> torch.Tensor:
    """Low-pass `delta`, then scale it down (never up) so that max |delta| <= eps."""
    if eps <= 0.0:
        raise ValueError(f"eps={eps}: must be > 0 (L_inf budget, intensity units)")
    d = low_pass(delta, cutoff)
    peak = d.abs().max()
    if peak > eps:
        d = d * (eps / peak)
    return d


def apply_lf(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Add the LF trigger: clamp(x + delta, 0, 1); `delta` (C, H, W) broadcasts over the batch."""
    return (x + delta.to(dtype=x.dtype, device=x.device)).clamp(0.0, 1.0)


def lf_uap_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    delta: torch.Tensor,
    *,
    target: int,
    eps: float = LF_EPS,
    lr: float = LF_LR,
    cutoff: float = LF_CUTOFF,
) -> torch.Tensor:
    """One step of the targeted universal perturbation; returns the new (C, H, W) delta.

    Minimises the cross-entropy of model(clamp(images + delta, 0, 1)) towards `target` over the
    images whose label is not `target` (they are the ones the trigger must flip), moves delta by
    -lr * sign(gradient), then `project_lf`. Only delta is differentiated: the model's parameters
    and their .grad are left untouched, and its train/eval mode is the caller's business.
    """
    if lr <= 0.0:
        raise ValueError(f"lr={lr}: must be > 0 (intensity units per step)")
    if target < 0:
        raise ValueError(f"target={target}: must be a class index >= 0")
    if images.dim() != 4 or delta.shape != images.shape[1:]:
        raise ValueError(
            f"images.shape={tuple(images.shape)}, delta.shape={tuple(delta.shape)}: need (N, C, H, W) and (C, H, W)"
        )
    keep = labels.to(images.device) != target
    d = delta.detach().to(images.device).clone()
    if bool(keep.any()):
        d.requires_grad_(True)
        logits = model((images[keep] + d).clamp(0.0, 1.0))
        if target >= logits.shape[1]:
            raise ValueError(f"target={target}: must be < the model's {logits.shape[1]} classes")
        goal = torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, goal)
        (grad,) = torch.autograd.grad(loss, d)
        d = d.detach() - lr * grad.sign()
    return project_lf(d, eps, cutoff)


def compute_lf_trigger(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    target: int,
    steps: int = LF_STEPS,
    batch_size: int = LF_BATCH_SIZE,
    eps: float = LF_EPS,
    lr: float = LF_LR,
    cutoff: float = LF_CUTOFF,
    seed: int = 0,
) -> torch.Tensor:
    """Optimise an LF trigger (C, H, W) on a (clean) `model` with `steps` calls of `lf_uap_step`.

    Each step uses `batch_size` images drawn without replacement (seeded by `seed`) from those not
    labelled `target`. The model runs in eval mode (its previous mode is restored afterwards) and
    its parameters are not modified. The result satisfies max |delta| <= eps and has no energy
    above `cutoff`.
    """
    if steps < 0:
        raise ValueError(f"steps={steps}: must be >= 0")
    if eps <= 0.0:
        raise ValueError(f"eps={eps}: must be > 0 (L_inf budget, intensity units)")
    if lr <= 0.0:
        raise ValueError(f"lr={lr}: must be > 0 (intensity units per step)")
    if cutoff < 0.0:
        raise ValueError(f"cutoff={cutoff}: must be >= 0 (normalised radius, 1 = Nyquist)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if images.dim() != 4 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"images.shape={tuple(images.shape)}, labels.shape={tuple(labels.shape)}: need (N, C, H, W) and (N,)"
        )
    pool = torch.nonzero(labels != target).flatten().cpu()
    if pool.numel() == 0:
        raise ValueError(f"target={target}: every image has this label; need images of other classes")
    g = torch.Generator().manual_seed(seed)
    delta = torch.zeros(images.shape[1:], dtype=images.dtype, device=images.device)
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            idx = pool[torch.randperm(pool.numel(), generator=g)[:batch_size]].to(images.device)
            delta = lf_uap_step(model, images[idx], labels[idx], delta, target=target, eps=eps, lr=lr, cutoff=cutoff)
    finally:
        model.train(was_training)
    return delta.detach()
