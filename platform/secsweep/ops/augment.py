"""Training-time data augmentation as batched tensor operations.

BackdoorBench, through which the FTP paper trains its models, augments every training batch with a
random crop after zero padding (4 pixels a side) and, for CIFAR-10, a random horizontal flip
(torchvision's RandomCrop(padding=4) and RandomHorizontalFlip on each PIL image). Here the same two
operations act on a whole (B, C, H, W) batch at once, on whatever device the batch is on, so the
in-memory training loop (`secsweep.training.train_epoch`) can apply them after moving a batch to the
GPU without DataLoader workers.

Randomness comes only from the `torch.Generator` passed in (a CPU generator in the training loop):
the offsets and flip decisions are drawn there and moved to the batch's device, so a given
(generator state, batch) gives bitwise the same result on CPU and GPU and on a resumed run.
Images are float tensors with values in [0, 1]; padding is with zeros (black), as torchvision's
default `fill=0`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "crop", "crop_flip")
PADDING = 4  # pixels of zero padding a side before the random crop (BackdoorBench: RandomCrop(padding=4))

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Pad every image of `x` (B, C, H, W) with `padding` zero pixels a side and crop it back to
    H x W at an offset drawn uniformly from {0, ..., 2 * padding} per axis and per image."""
    if x.ndim != 4:
        raise ValueError(f"x.shape={tuple(x.shape)}: must be (B, C, H, W)")
    if padding < 0:
        raise ValueError(f"padding={padding}: must be >= 0 pixels")
    if padding == 0 or len(x) == 0:
        return x.clone()
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=generator.device).to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)          # (B, H)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)          # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image of `x` (B, C, H, W) left-right with probability `p`."""
    if x.ndim != 4:
        raise ValueError(f"x.shape={tuple(x.shape)}: must be (B, C, H, W)")
    flip = (torch.rand(len(x), generator=generator, device=generator.device) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augmentation(kind: str, padding: int = PADDING) -> Transform | None:
    """The batch transform `(x, generator) -> x` of `kind` ("none" gives None): "crop" = random
    crop after `padding` pixels of zero padding; "crop_flip" = that, then a random horizontal flip."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augment={kind!r}: must be one of {', '.join(AUGMENTATIONS)}")
    if kind == "none":
        return None
    if kind == "crop":
        return lambda x, g: random_crop(x, padding, g)
    return lambda x, g: random_hflip(random_crop(x, padding, g), g)
