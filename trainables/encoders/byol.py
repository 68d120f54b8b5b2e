"""BYOL (Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020; docs/methods.md, "Self-supervised encoders").

An online network (backbone f_theta, projector g_theta, predictor q_theta; trained) and a target
network (f_xi, g_xi: an exponential moving average of the online one, no gradient). The online
prediction of one view regresses the target projection of the other view:

    L = || q(g(f(v1)))/|.| - g_xi(f_xi(v2))/|.| ||^2 = 2 - 2 cos(q(g(f(v1))), g_xi(f_xi(v2)))

symmetrised over the two views (the paper's L + L~). Here the loss is lightly's
`NegativeCosineSimilarity` (-cos), i.e. the paper's loss up to the constant 2 and a factor 2, which
only rescales the learning rate. After every step xi <- tau xi + (1 - tau) theta with
tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 over the K steps of training (the paper's
schedule, increasing tau from tau_base to 1; `momentum_cosine=False` keeps tau = tau_base).

The target network is a submodule of the model, so it is in every checkpoint.

Defaults (the documents do not state BYOL's settings):
* tau_base 0.99 — lightly's CIFAR-10 benchmark (BYOL on ImageNet: 0.996 over 5,000 steps an
  epoch; at a few hundred steps 0.996 leaves the target almost at its initialisation);
* cosine increase of tau to 1 — BYOL §3.2;
* projector and predictor: lightly's `BYOLProjectionHead` / `BYOLPredictionHead` (Linear-BN-ReLU-
  Linear, BYOL §3.3) with `SSLConfig`'s widths (hidden 512, output 128; BYOL: 4096 and 256 for a
  2048-dimensional ResNet-50 feature, the widths are scaled to the 64-dimensional small CNN);
* optimizer Adam (SSLConfig's): BYOL trains with LARS at batch 4096, which needs large batches;
  at batch 64-256 on a few thousand images Adam at 1e-3 .. 3e-3 with the cosine schedule trains
  without collapsing (tests/test_ssl_behaviour.py); `--set optimizer=lars lr=...` gives the paper's.
Everything else: `secsweep.ssl.SSLConfig`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from secsweep import ssl
from secsweep.config import require
from secsweep.registry import register
from secsweep.training import steps_per_epoch


@dataclass(frozen=True)
class Config(ssl.SSLConfig):
    momentum_ema: float = 0.99     # target EMA tau_base (lightly CIFAR-10: 0.99; BYOL ImageNet: 0.996)
    momentum_cosine: bool = True   # raise tau from tau_base to 1 on a cosine over training (BYOL §3.2)
    pred_hidden_dim: int = 512     # predictor's hidden width (BYOL: 4096; scaled as proj_hidden_dim)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0.0 <= self.momentum_ema < 1.0, "momentum_ema", self.momentum_ema, "must be in [0, 1)")
        require(self.pred_hidden_dim >= 1, "pred_hidden_dim", self.pred_hidden_dim, "must be >= 1")


class BYOL(nn.Module):
    """Online backbone + projector + predictor (trained); target backbone + projector (EMA)."""

    def __init__(self, backbone: nn.Module, cfg: Config):
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone = backbone
        self.projection = BYOLProjectionHead(backbone.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.prediction = BYOLPredictionHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_momentum = copy.deepcopy(self.projection)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_momentum)

    def forward(self, x):
        return self.prediction(self.projection(self.backbone(x)))

    def target(self, x):
        return self.projection_momentum(self.backbone_momentum(x)).detach()


def target_momentum(cfg: Config, step: int, total_steps: int) -> float:
    """tau after optimizer step `step` (1-based) of `total_steps` (BYOL §3.2)."""
    if not cfg.momentum_cosine:
        return cfg.momentum_ema
    from lightly.utils.scheduler import cosine_schedule

    return cosine_schedule(min(step - 1, total_steps), total_steps, cfg.momentum_ema, 1.0)


@register("byol", kind="encoder", config=Config, metrics=ssl.METRICS)
def run(cfg: Config, ctx) -> None:
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.utils import update_momentum

    splits = ssl.load_splits(cfg, ctx)
    backbone, args = ssl.backbone(cfg, splits.train.shape)
    model = BYOL(backbone, cfg)
    criterion = NegativeCosineSimilarity()
    total = cfg.epochs * steps_per_epoch(len(splits.train), cfg.batch_size, ctx.world_size)

    def step(model, x, y, gen):
        bare = getattr(model, "module", model)
        v1, v2 = cfg.views(x, gen)
        return 0.5 * (criterion(model(v1), bare.target(v2)) + criterion(model(v2), bare.target(v1)))

    def after_step_of(m):
        def after(k: int) -> None:
            tau = target_momentum(cfg, k, total)
            update_momentum(m.backbone, m.backbone_momentum, tau)
            update_momentum(m.projection, m.projection_momentum, tau)
        return after

    ssl.pretrain(cfg, ctx, model, step, after_step_of=after_step_of, arch_args=args)
