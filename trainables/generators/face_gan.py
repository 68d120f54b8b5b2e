"""The pre-trained face GAN of the PyPI package `gan-face-generate` (DE-FAKE's one real pre-trained
generator, docs/methods.md "DE-FAKE"): a DCGAN generator (Radford et al., ICLR 2016) that maps a
100-d standard normal z to a 64 x 64 RGB face, trained by the package's author on DigiFace1M
(rendered synthetic faces, not photographs).

The architecture is the model registry's port (`secsweep.zoo.DCGANGenerator`, card
"gan-face-dcgan-generator": five transposed 4 x 4 convolutions 100 -> 512 -> 256 -> 128 -> 64 -> 3
channels, 1 -> 4 -> 8 -> 16 -> 32 -> 64 pixels, BatchNorm + ReLU, tanh mapped to [0, 1]). The
package's own code is never imported (its loader unpickles): `secsweep.zoo.load` checks the sha256
of the package's `weights.tar` pinned in the card, reads it through `secsweep.safeload`
(torch.load(weights_only=True), converted once to safetensors) and loads it strictly, so a
weights file that does not fit the port raises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from secsweep import zoo

CARD = "gan-face-dcgan-generator"   # secsweep/zoo_cards.json
Z_DIM = 100                         # the card's latent_dim
# ITU-R BT.709 luma weights (what skimage.color.rgb2gray uses): RGB faces -> grey like lfw_subset
LUMA = (0.2125, 0.7154, 0.0721)


def load_face_gan(device: torch.device | str = "cpu", *, cache_dir=None) -> nn.Module:
    """The pre-trained generator in eval mode (BatchNorm on its running statistics), on `device`:
    z (N, 100) -> (N, 3, 64, 64) in [0, 1]."""
    model, _ = zoo.load(CARD, device, cache_dir=cache_dir)
    return model


@torch.no_grad()
def sample(model: nn.Module, n: int, g: torch.Generator) -> torch.Tensor:
    """n faces (n, 3, 64, 64) in [0, 1] from z ~ N(0, I) drawn with `g` (on its device)."""
    z = torch.randn((n, Z_DIM), generator=g, device=g.device).to(next(model.parameters()).device)
    return model(z).clamp(0, 1)


def to_grey(images: torch.Tensor, size: int) -> torch.Tensor:
    """RGB (N, 3, H, W) in [0, 1] -> grey (N, 1, size, size): luma, then bilinear antialiased resize
    (how the real 25 x 25 faces look: one channel, few pixels)."""
    w = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    grey = (images * w).sum(1, keepdim=True)
    return F.interpolate(grey, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
