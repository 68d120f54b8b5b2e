"""Backdoor triggers as pure functions on image batches.

Images are float tensors in [0, 1] shaped (N, C, H, W) or (C, H, W); every trigger returns a new
tensor of the same shape and never modifies its input.
"""

from __future__ import annotations

import torch

# BadNets: Gu et al., "BadNets" (2017). The FTP paper uses BackdoorBench's BadNets, a 3x3 white
# patch in the bottom-right corner of a 32x32 image; other sizes scale the patch.
BADNETS_REF_SIZE = 32  # pixels: image side the patch size refers to


def badnets_patch_size(height: int, width: int, patch: int = 3, ref_size: int = BADNETS_REF_SIZE) -> int:
    """Side of the square patch in pixels for an HxW image, scaled down by flooring (at least 1):
    3 on 32x32, 2 on 28x28, 9 on 96x96."""
    return max(1, patch * min(height, width) // ref_size)


def badnets(x: torch.Tensor, patch: int = 3, value: float = 1.0, margin: int = 0) -> torch.Tensor:
    """Stamp a `patch`x`patch` square (scaled from 32x32) of intensity `value` at the bottom right.

    `margin` is the distance in pixels from the bottom and right borders.
    """
    h, w = x.shape[-2:]
    s = badnets_patch_size(h, w, patch)
    out = x.clone()
    out[..., h - margin - s : h - margin, w - margin - s : w - margin] = value
    return out


def blend_pattern(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """A deterministic full-image pattern in [0, 1] for the Blended attack.

    Chen et al. blend a fixed image (BackdoorBench: Hello Kitty) into the input; no image can be
    shipped here, so the pattern is uniform noise from a seeded generator, which is the other
    pattern Chen et al. evaluate ("random noise" key pattern).
    """
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g)


def blended(x: torch.Tensor, pattern: torch.Tensor, alpha: float = 0.2) -> torch.Tensor:
    """Blended trigger: (1 - alpha) * x + alpha * pattern (Chen et al. 2017; alpha 0.2 as BackdoorBench)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: must be in (0, 1]")
    return (1.0 - alpha) * x + alpha * pattern.to(x.dtype).to(x.device)
