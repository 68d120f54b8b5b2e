"""WaNet warping trigger as pure tensor functions.

Nguyen & Tran, "WaNet -- Imperceptible Warping-based Backdoor Attack" (ICLR 2021). The trigger is
a fixed, small and smooth elastic deformation of the image: a random k x k field of control
displacements is upsampled (bicubic) to the image size and added to the identity sampling grid;
the image is resampled through that grid. "Noise mode" cross samples use the same grid plus
per-sample random jitter and keep their true labels, so the model learns the exact warp rather
than "any warp".

FTP leaves the WaNet internals [NS] ("BackdoorBench defaults implied", docs/methods.md §4.4); the defaults
below are the WaNet paper's / BackdoorBench's published ones: k = 4, s = 0.5, grid rescale 1,
cross ratio 2 (the poison ratio itself, 0.1, is FTP's, docs/methods.md §4.1).

Grids follow `torch.nn.functional.grid_sample`: shape (N, H, W, 2), last dim (x, y) in normalised
coordinates [-1, 1] with `align_corners=True` (-1 = centre of the first pixel, 1 = centre of the
last one), so one pixel along an axis of size n is 2 / (n - 1) normalised units.
Images are float tensors in [0, 1] shaped (N, C, H, W) or (C, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WANET_K = 4  # control points per side of the random displacement field (WaNet/BackdoorBench default)
WANET_S = 0.5  # warping strength, dimensionless (WaNet/BackdoorBench default)
WANET_GRID_RESCALE = 1.0  # multiplier on the warped grid (WaNet/BackdoorBench default)
# Cross ("noise mode") samples per poisoned sample: WaNet trains on 2x as many noise-warped inputs
# with their true labels as poisoned inputs with the target label (WaNet/BackdoorBench default).
CROSS_RATIO = 2


def identity_grid(height: int, width: int) -> torch.Tensor:
    """The sampling grid that leaves an HxW image unchanged, shape (1, H, W, 2), (x, y) order."""
    _check_size(height, width)
    ys = torch.linspace(-1.0, 1.0, height)
    xs = torch.linspace(-1.0, 1.0, width)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1).unsqueeze(0)


def warp_control_points(k: int = WANET_K, seed: int = 0) -> torch.Tensor:
    """WaNet's random control displacements, shape (1, 2, k, k), channels (x, y).

    Uniform in [-1, 1], then divided by their mean absolute value (so the mean |value| is 1).
    """
    if k < 2:
        raise ValueError(f"k={k}: must be an integer >= 2 (control points per side)")
    g = torch.Generator().manual_seed(seed)
    ctrl = torch.rand((1, 2, k, k), generator=g) * 2.0 - 1.0
    return ctrl / ctrl.abs().mean()


def make_warp_field(
    height: int,
    width: int,
    k: int = WANET_K,
    s: float = WANET_S,
    grid_rescale: float = WANET_GRID_RESCALE,
    seed: int = 0,
) -> torch.Tensor:
    """The WaNet backdoor sampling grid for HxW images, shape (1, H, W, 2), deterministic in `seed`.

    grid = clamp((identity + s * upsample_bicubic(control) / size) * grid_rescale, -1, 1), where
    `size` is H for the y component and W for the x component (WaNet divides both by the image
    height and only uses square images; per-axis division keeps the displacement isotropic in
    pixels for non-square images and equals WaNet exactly when H == W). The displacement is about
    s / 2 pixels on average (mean |control| = 1, one pixel = 2 / (size - 1) normalised units).
    """
    _check_size(height, width)
    if s < 0.0:
        raise ValueError(f"s={s}: must be >= 0 (warping strength)")
    if grid_rescale <= 0.0:
        raise ValueError(f"grid_rescale={grid_rescale}: must be > 0")
    ctrl = warp_control_points(k, seed)
    field = F.interpolate(ctrl, size=(height, width), mode="bicubic", align_corners=True)
    field = field.permute(0, 2, 3, 1)  # (1, H, W, 2), (x, y)
    per_axis = torch.tensor([float(width), float(height)])  # normalisation of the x, y components
    grid = (identity_grid(height, width) + s * field / per_axis) * grid_rescale
    return grid.clamp(-1.0, 1.0)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample `x` through `grid` (bilinear, align_corners=True) and clamp to [0, 1].

    `x` is (N, C, H, W) or (C, H, W); `grid` is (1, H, W, 2) (broadcast over the batch) or
    (N, H, W, 2) (one grid per image, e.g. from `noise_grid`).
    """
    squeeze = x.dim() == 3
    xb = x.unsqueeze(0) if squeeze else x
    if xb.dim() != 4:
        raise ValueError(f"x.shape={tuple(x.shape)}: must be (N, C, H, W) or (C, H, W)")
    n, _, h, w = xb.shape
    if grid.dim() != 4 or grid.shape[1:] != (h, w, 2) or grid.shape[0] not in (1, n):
        raise ValueError(f"grid.shape={tuple(grid.shape)}: must be (1, {h}, {w}, 2) or ({n}, {h}, {w}, 2)")
    g = grid.to(dtype=xb.dtype, device=xb.device).expand(n, h, w, 2)
    out = F.grid_sample(xb, g, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = out.clamp(0.0, 1.0)
    return out.squeeze(0) if squeeze else out


def noise_grid(
    grid: torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """WaNet "noise mode" grids for `n` cross samples, shape (n, H, W, 2), clamped to [-1, 1].

    Each is `grid` plus independent uniform jitter in [-1, 1] / size * scale (size = H for y,
    W for x; WaNet: / H, square images), i.e. at most about half a pixel at scale 1. Inputs warped
    this way keep their true labels; use CROSS_RATIO cross samples per poisoned sample.
    `generator` (optional) must live on the CPU; the result is on `grid`'s device.
    """
    if n < 0:
        raise ValueError(f"n={n}: must be >= 0 (number of cross samples)")
    if scale < 0.0:
        raise ValueError(f"scale={scale}: must be >= 0 (jitter multiplier)")
    if grid.dim() != 4 or grid.shape[0] != 1 or grid.shape[-1] != 2:
        raise ValueError(f"grid.shape={tuple(grid.shape)}: must be (1, H, W, 2)")
    _, h, w, _ = grid.shape
    jitter = torch.rand((n, h, w, 2), generator=generator) * 2.0 - 1.0
    per_axis = torch.tensor([float(w), float(h)])
    jitter = (jitter * scale / per_axis).to(dtype=grid.dtype, device=grid.device)
    return (grid.expand(n, h, w, 2) + jitter).clamp(-1.0, 1.0)


def _check_size(height: int, width: int) -> None:
    if height < 2 or width < 2:
        raise ValueError(f"height, width=({height}, {width}): both must be >= 2 pixels")
