"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020; docs/methods.md, "Self-supervised encoders").

Two augmented views of every image go through the backbone f and a projection head g; the NT-Xent
loss pulls z_i = g(f(x_i)) towards its other view and away from the 2N - 2 other views of the batch:
l(i, j) = -log exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau), averaged over both
orders of every pair (lightly's `NTXentLoss`, heads `SimCLRProjectionHead`). The head is dropped
after pre-training; the backbone is the `encoder` artifact.

Defaults: temperature 0.5 (lightly's and the SimCLR paper's CIFAR-10 setting; the documents do not
state tau), projection 2-layer MLP with BatchNorm, output 128 (SimCLR). Everything else:
`secsweep.ssl.SSLConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from secsweep import ssl
from secsweep.config import positive
from secsweep.registry import register


@dataclass(frozen=True)
class Config(ssl.SSLConfig):
    temperature: float = 0.5   # NT-Xent temperature tau (SimCLR / lightly CIFAR-10: 0.5; documents: not stated)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("temperature", self.temperature)


@dataclass(frozen=True)
class PoisonedConfig(Config):
    """A SimCLR recipe pre-trained on poisoned data (PoisonedEncoder, CTRL): its baseline is the clean
    twin, SimCLR with every field of this recipe on the clean data, a declared upstream stage."""

    def clean_encoder(self):
        from secsweep.refs import StageRef

        return StageRef("simclr", {f.name: getattr(self, f.name) for f in fields(Config)})

    def upstream_stages(self) -> list[tuple[str, Any]]:
        ref = self.clean_encoder()
        return [(ref.trainable, ref.config())]


class SimCLR(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: Config):
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__()
        self.backbone = backbone
        self.projection = SimCLRProjectionHead(backbone.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)

    def forward(self, x):
        return self.projection(self.backbone(x))


def ntxent_step(cfg: Config):
    """SimCLR's training step: NT-Xent (lightly's, temperature `cfg.temperature`) between the
    projections of two augmented views of each image. Shared by the poisoned pre-training attacks."""
    from lightly.loss import NTXentLoss

    criterion = NTXentLoss(temperature=cfg.temperature)

    def step(model, x, y, gen):
        v1, v2 = cfg.views(x, gen)
        return criterion(model(v1), model(v2))

    return step


@register("simclr", kind="encoder", config=Config, metrics=ssl.METRICS)
def run(cfg: Config, ctx) -> None:
    shape = ssl.load_splits(cfg, ctx).train.shape
    backbone, args = ssl.backbone(cfg, shape)
    ssl.pretrain(cfg, ctx, SimCLR(backbone, cfg), ntxent_step(cfg), arch_args=args)
