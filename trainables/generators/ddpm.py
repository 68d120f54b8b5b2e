"""A class-conditional DDPM (Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020)
built from diffusers' `UNet2DModel` (class conditioning through `num_class_embeds`: a learned class
embedding added to the timestep embedding) and `DDPMScheduler` (linear betas 1e-4..0.02 over
`train_timesteps`).

Loss: E_{x, y, t, eps} || eps - eps_theta(sqrt(abar_t) x + sqrt(1 - abar_t) eps, t, y) ||^2 with
images scaled to [-1, 1]. Sampling: ancestral DDPM steps on `sample_steps` evenly spaced timesteps
(diffusers' `set_timesteps`), from Gaussian noise, conditioned on the prompt's class.

Sized for a CPU: two resolution levels of 32 / 64 channels, one ResNet block each (~0.5 M
parameters at 28 px), a few epochs on 4,000 images. Its samples are blurry and only partly
class-faithful (see `conditioned_acc`); Stable Diffusion and Latent Diffusion, the thesis's
generators, are latent text-to-image models at 512 px (online only, `sweeps/defake_detect.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from secsweep.config import require
from secsweep.models import register_model
from secsweep.registry import register

from . import METRICS, GeneratorConfig, noise, train_generator

ARCH = "gen_ddpm"


def _diffusers():
    try:
        import diffusers
    except ImportError:  # pragma: no cover - a declared dependency
        from secsweep.errors import ConfigError

        raise ConfigError("generator=ddpm: needs the diffusers package (pip install diffusers)") from None
    return diffusers


class DDPM(nn.Module):
    def __init__(self, num_classes: int, channels: int, image_size: int, widths: list | tuple = (32, 64),
                 train_timesteps: int = 1000, sample_steps: int = 50):
        super().__init__()
        d = _diffusers()
        self.num_classes, self.channels, self.image_size = int(num_classes), int(channels), int(image_size)
        self.sample_steps = int(sample_steps)
        n = len(widths)
        self.unet = d.UNet2DModel(
            sample_size=image_size, in_channels=channels, out_channels=channels,
            block_out_channels=tuple(int(w) for w in widths), layers_per_block=1,
            down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
            num_class_embeds=num_classes, norm_num_groups=8)
        self.scheduler = d.DDPMScheduler(num_train_timesteps=int(train_timesteps))

    def loss(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x0 = x * 2 - 1
        eps = noise(tuple(x0.shape), g, x0.device)
        t = torch.randint(self.scheduler.config.num_train_timesteps, (len(x0),), generator=g, device=g.device).to(x0.device)
        noisy = self.scheduler.add_noise(x0, eps, t)
        return F.mse_loss(self.unet(noisy, t, class_labels=y).sample, eps)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        sched = type(self.scheduler).from_config(self.scheduler.config)  # set_timesteps mutates it
        sched.set_timesteps(self.sample_steps)
        x = noise((len(labels), self.channels, self.image_size, self.image_size), g, labels.device)
        for t in sched.timesteps:
            eps = self.unet(x, t.to(x.device), class_labels=labels).sample
            x = sched.step(eps, t, x, generator=g).prev_sample
        return ((x + 1) / 2).clamp(0, 1)

    def forward(self, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.sample(labels, g)


@register_model(ARCH, image=False)
def gen_ddpm(num_classes: int, channels: int, image_size: int, widths: list | tuple = (32, 64),
             train_timesteps: int = 1000, sample_steps: int = 50) -> nn.Module:
    return DDPM(num_classes, channels, image_size, widths, train_timesteps, sample_steps)


@dataclass(frozen=True)
class Config(GeneratorConfig):
    epochs: int = 8
    lr: float = 2e-3                 # Adam (DDPM paper: 2e-4 at batch 128 for 800k steps; a few hundred steps here)
    width: int = 32                  # channels of the first level; the second has twice as many
    train_timesteps: int = 1000      # diffusion steps T (DDPM paper: 1000)
    sample_steps: int = 50           # ancestral steps at sampling (evenly spaced subset of T)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.width >= 8 and self.width % 8 == 0, "width", self.width, "must be a multiple of 8 (GroupNorm groups)")
        require(self.train_timesteps >= 2, "train_timesteps", self.train_timesteps, "must be >= 2")
        require(1 <= self.sample_steps <= self.train_timesteps, "sample_steps", self.sample_steps,
                f"must be in [1, train_timesteps={self.train_timesteps}]")
        require(self.shape[1] % 2 == 0, "image_size", self.shape[1], "must be even (one 2x downsampling)")


@register("ddpm", kind="generator", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    c, h = cfg.shape
    args = {"num_classes": cfg.num_classes, "channels": c, "image_size": h, "widths": [cfg.width, 2 * cfg.width],
            "train_timesteps": cfg.train_timesteps, "sample_steps": cfg.sample_steps}
    torch.manual_seed(cfg.seed)
    model = gen_ddpm(**args)
    train_generator(cfg, ctx, model, arch=ARCH, args=args, opt="adam")
