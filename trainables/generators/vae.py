"""A conditional VAE (Sohn et al., "Learning Structured Output Representation using Deep
Conditional Generative Models", NeurIPS 2015): encoder q(z | x, y) and decoder p(x | z, y), both
given the label one-hot; a 16-d Gaussian latent.

Loss (the negative ELBO per image): sum over pixels of the Bernoulli cross-entropy of x under the
decoder's logits + KL(q(z | x, y) || N(0, I)). Samples are the decoder's mean sigmoid(logits) at
z ~ N(0, I): smooth and blurry, the family's known look (the detector may learn that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from secsweep.models import register_model
from secsweep.registry import register

from . import METRICS, LatentGeneratorConfig, noise, train_generator

ARCH = "gen_cvae"


class CVAE(nn.Module):
    def __init__(self, num_classes: int, channels: int, image_size: int, z_dim: int = 16, width: int = 32):
        super().__init__()
        self.num_classes, self.z_dim, self.s = num_classes, z_dim, image_size // 4
        flat = 2 * width * self.s * self.s
        self.enc = nn.Sequential(nn.Conv2d(channels, width, 4, 2, 1), nn.ReLU(),
                                 nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(), nn.Flatten())
        self.to_stats = nn.Linear(flat + num_classes, 2 * z_dim)
        self.dec_fc = nn.Sequential(nn.Linear(z_dim + num_classes, flat), nn.ReLU())
        self.dec = nn.Sequential(nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(width, channels, 4, 2, 1))
        self.width = width

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.dec_fc(torch.cat([z, F.one_hot(y, self.num_classes).float()], 1))
        return self.dec(h.view(len(z), 2 * self.width, self.s, self.s))  # logits

    def loss(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator):
        mu, logvar = self.to_stats(torch.cat([self.enc(x), F.one_hot(y, self.num_classes).float()], 1)).chunk(2, 1)
        z = mu + (0.5 * logvar).exp() * noise(tuple(mu.shape), g, x.device)
        recon = F.binary_cross_entropy_with_logits(self.decode(z, y), x, reduction="sum") / len(x)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum() / len(x)
        return recon + kl, {"recon": recon.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.decode(noise((len(labels), self.z_dim), g, labels.device), labels).sigmoid()

    def forward(self, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.sample(labels, g)


@register_model(ARCH, image=False)
def gen_cvae(num_classes: int, channels: int, image_size: int, z_dim: int = 16, width: int = 32) -> nn.Module:
    return CVAE(num_classes, channels, image_size, z_dim, width)


@dataclass(frozen=True)
class Config(LatentGeneratorConfig):
    epochs: int = 8
    lr: float = 1e-3                 # Adam
    z_dim: int = 16                  # latent dimensions
    width: int = 32                  # channels of the first conv layer


@register("vae", kind="generator", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    args = cfg.model_args()
    torch.manual_seed(cfg.seed)
    model = gen_cvae(**args)
    train_generator(cfg, ctx, model, arch=ARCH, args=args, opt="adam")
