"""CTRL's frequency-domain trigger (Li et al., "An Embarrassingly Simple Backdoor Attack on
Self-supervised Learning", ICCV 2023; docs/methods.md, "CTRL").

The trigger adds a fixed `magnitude` to a few mid/high-frequency coefficients of the 2-D DCT
(orthonormal DCT-II) of every `window` x `window` block of the image, then transforms back. The
change is spread over the whole block at a frequency the eye hardly sees, so the trigger is
invisible (its largest per-pixel change is small, its PSNR high) yet identical on every image.

* Colour images (C = 3) are perturbed in the YUV space (BT.601: Y = 0.299 R + 0.587 G + 0.114 B,
  U = 0.492 (B - Y), V = 0.877 (R - Y)), in the components `components` names ("uv" by default:
  the chroma, which the eye resolves least; "y" = luma), then converted back to RGB; grey images
  (C = 1) have one channel, perturbed directly; any other C perturbs every channel.
* The DCT is orthonormal: a coefficient is in image intensity units (images in [0, 1]); adding c to
  coefficient (u, v) of a w-block changes each pixel by c * a_u a_v cos(.) cos(.), at most
  c * 2 / w for u, v > 0. `magnitude` m is given on a 32-pixel window (the reference CIFAR-10
  side) and scaled with the window, c = m * w / 32, so the per-pixel amplitude (at most 4 m / 32
  per coefficient, RMS sqrt(2) m / 32) is the same at every image size. `max_change` gives the
  bound for a whole trigger.
* `positions` are (u, v) frequency indices on the 32-pixel window too, scaled to other windows as
  p' = round((p + 1) w / 32) - 1, so (31, 31) stays the highest frequency and (15, 15) mid-band.
* The result is clamped to [0, 1]: on black or white pixels part of the pattern is cut off (black
  backgrounds of MNIST-like data keep only its positive half there).

Pure tensor code: (N, C, H, W) or (C, H, W) float images in [0, 1] in, the same shape out.
"""

from __future__ import annotations

import math

import torch

__all__ = ["CTRL_POSITIONS", "CTRL_MAGNITUDE", "REF_WINDOW", "dct_matrix", "dct2", "idct2", "rgb_to_yuv",
           "yuv_to_rgb", "scaled_positions", "ctrl_pattern", "apply_ctrl", "max_change", "psnr"]

REF_WINDOW = 32                        # pixels: the window side `positions` refer to
CTRL_POSITIONS = ((15, 15), (31, 31))  # one mid-band, one highest-frequency coefficient on 32 (a choice)
CTRL_MAGNITUDE = 100.0 / 255.0         # added to each coefficient on a 32-pixel window, intensity units (a choice)
COMPONENTS = "yuv"

# BT.601 analogue YUV (rows: Y, U, V of R, G, B)
_RGB_TO_YUV = torch.tensor([[0.299, 0.587, 0.114],
                            [-0.14713, -0.28886, 0.436],
                            [0.615, -0.51499, -0.10001]], dtype=torch.float64)
_YUV_TO_RGB = torch.linalg.inv(_RGB_TO_YUV)


def dct_matrix(n: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The (n, n) orthonormal DCT-II matrix D: D[k, i] = a_k cos(pi (2 i + 1) k / (2 n)),
    a_0 = sqrt(1/n), a_k = sqrt(2/n); D @ D.T = I, so D^-1 = D.T (the DCT-III)."""
    if n < 1:
        raise ValueError(f"n={n}: must be >= 1")
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype=dtype, device=device)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DCT-II over the last two dims (..., H, W)."""
    dh = dct_matrix(x.shape[-2], dtype=x.dtype, device=x.device)
    dw = dct_matrix(x.shape[-1], dtype=x.dtype, device=x.device)
    return dh @ x @ dw.T


def idct2(c: torch.Tensor) -> torch.Tensor:
    """The inverse of `dct2`."""
    dh = dct_matrix(c.shape[-2], dtype=c.dtype, device=c.device)
    dw = dct_matrix(c.shape[-1], dtype=c.dtype, device=c.device)
    return dh.T @ c @ dw


def _colour_transform(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"x.shape={tuple(x.shape)}: needs 3 channels at dim -3")
    return torch.einsum("ij,...jhw->...ihw", m.to(dtype=x.dtype, device=x.device), x)


def rgb_to_yuv(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB -> YUV (BT.601, linear)."""
    return _colour_transform(x, _RGB_TO_YUV)


def yuv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """The exact inverse of `rgb_to_yuv`."""
    return _colour_transform(x, _YUV_TO_RGB)


def scaled_positions(positions, window: int, ref: int = REF_WINDOW) -> tuple[tuple[int, int], ...]:
    """(u, v) frequencies given on a `ref` window, on a `window` one (module docstring)."""
    if window < 1:
        raise ValueError(f"window={window}: must be >= 1 pixel")
    out = []
    for p in positions:
        if len(p) != 2 or not all(0 <= int(q) < ref for q in p):
            raise ValueError(f"position={tuple(p)}: must be (u, v) with 0 <= u, v < {ref}")
        out.append(tuple(min(window - 1, max(0, round((int(q) + 1) * window / ref) - 1)) for q in p))
    return tuple(out)


def _window_of(h: int, w: int, window: int) -> int:
    if h != w and window == 0:
        raise ValueError(f"image {h}x{w}: window=0 (the whole image) needs a square image; give a window")
    win = window or h
    if win < 1 or h % win or w % win:
        raise ValueError(f"window={window}: must divide the image sides {h}x{w} (0 = the whole image)")
    return win


def ctrl_pattern(shape, *, magnitude: float = CTRL_MAGNITUDE, positions=CTRL_POSITIONS, window: int = 0,
                 components: str = "uv", dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The additive (C, H, W) pattern of the trigger (before clamping): `magnitude` (on a 32-pixel
    window, scaled to the window) on the scaled `positions` of the DCT of every window block, in
    the YUV `components` for C = 3."""
    if len(shape) != 3:
        raise ValueError(f"shape={tuple(shape)}: must be (C, H, W)")
    c, h, w = (int(s) for s in shape)
    win = _window_of(h, w, window)
    if not components or any(k not in COMPONENTS for k in components) or len(set(components)) != len(components):
        raise ValueError(f"components={components!r}: must be distinct letters of {COMPONENTS!r}")
    spec = torch.zeros(win, win, dtype=torch.float64)
    for u, v in scaled_positions(positions, win):
        spec[u, v] += magnitude * win / REF_WINDOW  # the same per-pixel amplitude at every window
    block = idct2(spec)                               # (win, win): the same in every block
    plane = block.repeat(h // win, w // win)          # (H, W)
    if c == 3:
        yuv = torch.zeros(3, h, w, dtype=torch.float64)
        for k in components:
            yuv[COMPONENTS.index(k)] = plane
        pattern = yuv_to_rgb(yuv)
    else:
        pattern = plane.expand(c, h, w).clone()
    return pattern.to(dtype=dtype, device=device)


def apply_ctrl(x: torch.Tensor, *, magnitude: float = CTRL_MAGNITUDE, positions=CTRL_POSITIONS, window: int = 0,
               components: str = "uv") -> torch.Tensor:
    """Stamp the CTRL trigger on images in [0, 1] ((N, C, H, W) or (C, H, W)): a clamped copy."""
    if x.dim() not in (3, 4):
        raise ValueError(f"x.shape={tuple(x.shape)}: must be (N, C, H, W) or (C, H, W)")
    p = ctrl_pattern(x.shape[-3:], magnitude=magnitude, positions=positions, window=window,
                     components=components, dtype=x.dtype, device=x.device)
    return (x + p).clamp(0.0, 1.0)


def max_change(shape, **kw) -> float:
    """The largest per-pixel change the trigger can make on images of `shape` (C, H, W)."""
    return float(ctrl_pattern(shape, dtype=torch.float64, **kw).abs().max())


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB between images `a` and `b` (N, C, H, W) of peak value `peak`
    (inf where they are equal)."""
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"a shape={tuple(a.shape)}, b shape={tuple(b.shape)}: must be equal (N, C, H, W)")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(peak * peak / mse)
