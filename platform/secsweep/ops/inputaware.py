"""Input-Aware Dynamic Backdoor: trigger/mask generators and their losses as pure tensor code.

Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack" (NeurIPS 2020). A generator network g maps
each input x to its own trigger pattern g(x), and a mask generator m maps it to a blending mask
m(x); the poisoned input is x * (1 - m(x)) + g(x) * m(x). A diversity loss
L_div = ||x - x'|| / ||g(x) - g(x')|| keeps triggers input-specific, and a norm loss keeps the
masks sparse. During training, "cross" samples x * (1 - m(x')) + g(x') * m(x') (a trigger made
for another input) keep their true labels, so a trigger only works on the input it was made for.

FTP leaves the Inputaware internals [NS] ("BackdoorBench defaults implied", docs/methods.md §4.5); the
constants below are the paper's / BackdoorBench's published defaults. The optimisation loop
(mask pre-training, then joint generator + classifier training) belongs in the trainable.
Images are float tensors in [0, 1] shaped (N, C, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LAMBDA_DIV = 1.0  # weight of the diversity loss (paper / BackdoorBench default)
LAMBDA_NORM = 100.0  # weight of the mask norm loss (paper / BackdoorBench default)
MASK_DENSITY = 0.032  # target fraction of the mask's mass, dimensionless (paper / BackdoorBench)
P_ATTACK = 0.1  # fraction of each batch poisoned with its own trigger (paper; docs/methods.md §4.1: 0.1)
P_CROSS = 0.1  # fraction of each batch given another input's trigger, true label kept (paper)
# Cross samples per poisoned sample, BackdoorBench's parametrisation of p_cross = p_attack = 0.1.
CROSS_RATIO = 1
MASK_PRETRAIN_EPOCHS = 25  # epochs the mask generator is trained alone before the main stage (paper)
GENERATOR_LR = 1e-2  # learning rate of both generators, per step (authors' code, Adam)
DIV_EPS = 1e-6  # added to the pattern distance in L_div (the authors' code uses 1e-7)
# Encoder widths: start at 32 channels and double per stage as in the authors' CIFAR-10/GTSRB
# generator; they use 16 for MNIST. Each stage after the first halves the spatial size.
DEFAULT_WIDTHS = (32, 64, 128)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution (padding 1, size kept) + batch norm + ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class _EncoderDecoder(nn.Module):
    """Conv encoder (max-pool down) and decoder (interpolate back to each encoder size), output in [0, 1].

    Upsampling goes to the exact size recorded on the way down, so any H, W >= 1 is kept (28x28
    F-MNIST, 32x32 CIFAR-10, 48x48 GTSRB, odd sizes).
    """

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels={in_channels}: must be >= 1")
        widths = tuple(widths)
        if not widths or any(int(w) != w or w < 1 for w in widths):
            raise ValueError(f"widths={widths}: must be a non-empty sequence of positive ints")
        self.in_channels = in_channels
        self.encoder = nn.ModuleList()
        prev = in_channels
        for w in widths:
            self.encoder.append(nn.Sequential(_conv_block(prev, w), _conv_block(w, w)))
            prev = w
        self.decoder = nn.ModuleList(
            nn.Sequential(_conv_block(widths[i], widths[i - 1]), _conv_block(widths[i - 1], widths[i - 1]))
            for i in range(len(widths) - 1, 0, -1)
        )
        self.head = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x.shape={tuple(x.shape)}: must be (N, {self.in_channels}, H, W)")
        sizes = []
        h = x
        for i, stage in enumerate(self.encoder):
            if i > 0:
                sizes.append(h.shape[-2:])
                h = F.max_pool2d(h, 2, ceil_mode=True)
            h = stage(h)
        for stage in self.decoder:
            h = F.interpolate(h, size=sizes.pop(), mode="bilinear", align_corners=False)
            h = stage(h)
        # tanh / 2 + 0.5 maps to [0, 1] (the authors' generators also end in a tanh)
        return torch.tanh(self.head(h)) / 2.0 + 0.5


class TriggerGenerator(_EncoderDecoder):
    """Input-Aware pattern generator g: (N, C, H, W) -> per-input pattern (N, C, H, W) in [0, 1]."""

    def __init__(self, in_channels: int, widths: Sequence[int] = DEFAULT_WIDTHS) -> None:
        super().__init__(in_channels, in_channels, widths)


class MaskGenerator(_EncoderDecoder):
    """Input-Aware mask generator m: (N, C, H, W) -> per-input mask (N, 1, H, W) in [0, 1]."""

    def __init__(self, in_channels: int, widths: Sequence[int] = DEFAULT_WIDTHS) -> None:
        super().__init__(in_channels, 1, widths)


def apply_inputaware(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Poison x with its pattern: x * (1 - mask) + pattern * mask (mask (N, 1, H, W) broadcasts over C)."""
    return x * (1.0 - mask) + pattern * mask


def diversity_loss(
    x1: torch.Tensor,
    x2: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    eps: float = DIV_EPS,
) -> torch.Tensor:
    """Paper's L_div: batch mean of ||x1 - x2|| / (||p1 - p2|| + eps), L2 norms per sample.

    Small when different inputs get different patterns (p may be patterns or masks). Multiply by
    LAMBDA_DIV (1) in the total loss.
    """
    if eps < 0.0:
        raise ValueError(f"eps={eps}: must be >= 0")
    if x1.shape != x2.shape or p1.shape != p2.shape or x1.shape[0] != p1.shape[0]:
        raise ValueError(
            f"shapes x1={tuple(x1.shape)}, x2={tuple(x2.shape)}, p1={tuple(p1.shape)}, p2={tuple(p2.shape)}: "
            "x1/x2 and p1/p2 must match, with the same batch size"
        )
    dist_x = (x1 - x2).flatten(1).norm(dim=1)
    dist_p = (p1 - p2).flatten(1).norm(dim=1)
    return (dist_x / (dist_p + eps)).mean()


def mask_norm_loss(mask: torch.Tensor, density: float = MASK_DENSITY, per_pixel: bool = True) -> torch.Tensor:
    """Mask sparsity penalty; multiply by LAMBDA_NORM (100) in the total loss.

    per_pixel=True (default, as in the authors' released code): mean(relu(mask - density)), each
    mask value above `density` is penalised. per_pixel=False: relu(mean(mask) - density), only the
    mask's average is held at or below `density`.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density={density}: must be in [0, 1] (fraction of the mask)")
    if per_pixel:
        return F.relu(mask - density).mean()
    return F.relu(mask.mean() - density)
