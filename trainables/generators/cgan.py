"""A conditional GAN (Mirza & Osindero 2014) in the DCGAN style (Radford et al. 2016): the
generator maps noise z (64-d) and a learned label embedding to an image through two stride-2
transposed convolutions with BatchNorm; the discriminator is a two-layer stride-2 conv net with a
projection head for the label (Miyato & Koyama, "cGANs with Projection Discriminator", 2018):
D(x, y) = w . h(x) + e_y . h(x).

Loss: the non-saturating GAN loss, L_D = softplus(-D(x, y)) + softplus(D(G(z, y), y)),
L_G = softplus(-D(G(z, y), y)). Both players update simultaneously from one optimizer: the fake
enters L_D detached, and L_G is computed through a copy of D's parameters without gradient
(`torch.func.functional_call`), so each loss only moves its own player. Adam lr 2e-4, betas
(0.5, 0.999) (DCGAN paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from secsweep.models import register_model
from secsweep.registry import register

from . import METRICS, LatentGeneratorConfig, noise, train_generator

ARCH = "gen_cgan"


class Generator(nn.Module):
    def __init__(self, num_classes: int, channels: int, image_size: int, z_dim: int, width: int):
        super().__init__()
        self.z_dim, self.s = z_dim, image_size // 4
        self.embed = nn.Embedding(num_classes, 16)
        self.fc = nn.Sequential(nn.Linear(z_dim + 16, 2 * width * self.s * self.s), nn.BatchNorm1d(2 * width * self.s * self.s), nn.ReLU())
        self.net = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Tanh())

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(y)], 1))
        return self.net(h.view(len(z), -1, self.s, self.s))


class Discriminator(nn.Module):
    def __init__(self, num_classes: int, channels: int, image_size: int, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(2 * width * (image_size // 4) ** 2, 256), nn.LeakyReLU(0.2))
        self.out = nn.Linear(256, 1)
        self.embed = nn.Embedding(num_classes, 256)  # the projection of the label

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.net(x)
        return self.out(h).squeeze(1) + (self.embed(y) * h).sum(1)


class CGAN(nn.Module):
    def __init__(self, num_classes: int, channels: int, image_size: int, z_dim: int = 64, width: int = 64):
        super().__init__()
        self.generator = Generator(num_classes, channels, image_size, z_dim, width)
        self.discriminator = Discriminator(num_classes, channels, image_size, width)
        self.z_dim = z_dim

    def loss(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator):
        real = x * 2 - 1
        fake = self.generator(noise((len(x), self.z_dim), g, x.device), y)
        d_loss = F.softplus(-self.discriminator(real, y)).mean() + F.softplus(self.discriminator(fake.detach(), y)).mean()
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        g_loss = F.softplus(-functional_call(self.discriminator, frozen, (fake, y))).mean()
        return d_loss + g_loss, {"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        z = noise((len(labels), self.z_dim), g, labels.device)
        return ((self.generator(z, labels) + 1) / 2).clamp(0, 1)

    def forward(self, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.sample(labels, g)


@register_model(ARCH, image=False)
def gen_cgan(num_classes: int, channels: int, image_size: int, z_dim: int = 64, width: int = 64) -> nn.Module:
    return CGAN(num_classes, channels, image_size, z_dim, width)


@dataclass(frozen=True)
class Config(LatentGeneratorConfig):
    epochs: int = 10
    lr: float = 2e-4                 # Adam, betas (0.5, 0.999) (DCGAN paper)
    batch_size: int = 64             # DCGAN paper: 128; more steps per epoch here
    z_dim: int = 64                  # noise dimensions
    width: int = 64                  # channels of the generator's last hidden layer / D's first


@register("cgan", kind="generator", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    args = cfg.model_args()
    torch.manual_seed(cfg.seed)
    model = gen_cgan(**args)
    train_generator(cfg, ctx, model, arch=ARCH, args=args,
                    opt=lambda params: torch.optim.Adam(params, lr=cfg.lr, betas=(0.5, 0.999)))
