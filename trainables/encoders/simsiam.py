"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021;
docs/methods.md, "Self-supervised encoders").

One network: backbone f, projector g (3 layers, BN on the output), predictor h (a bottleneck
MLP). With z = g(f(v)) and p = h(z), the loss is the symmetrised negative cosine similarity with a
stop-gradient on the projection of the other view:

    L = -1/2 cos(p1, stopgrad(z2)) - 1/2 cos(p2, stopgrad(z1))

(lightly's `NegativeCosineSimilarity`); without the stop-gradient the solution collapses (SimSiam
§4.1). No momentum target, no negatives.

Defaults (the documents do not state SimSiam's settings):
* projector lightly's `SimSiamProjectionHead`, predictor `SimSiamPredictionHead`; widths: hidden
  512, output `proj_dim` 512 and predictor bottleneck 128 = proj_dim / 4 (SimSiam: 2048 / 2048 /
  512, the same 4:1 bottleneck, §4.4 "the bottleneck structure"; scaled to the small CNN's 64
  features). SimSiam's output is wider than SimCLR's 128: its loss has no negatives, and a narrow
  BN-ended projection collapses more easily (§4.2);
* optimizer SGD, lr 0.06, momentum 0.9, weight decay 5e-4, cosine schedule: lightly's CIFAR-10
  benchmark's SGD recipe (SimSiam §4: SGD, lr 0.05 x batch / 256, weight decay 1e-4; the paper
  finds SimSiam needs no large batches or LARS). At the test's scale Adam (lr 3e-3 or 1e-2) and
  SGD (0.06 or 0.1) gave linear probes within 0.02 of each other and neither collapsed, so the
  paper's optimizer is the default (docs/methods.md).
Everything else: `secsweep.ssl.SSLConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from secsweep import ssl
from secsweep.config import require
from secsweep.registry import register


@dataclass(frozen=True)
class Config(ssl.SSLConfig):
    optimizer: str = "sgd"         # SimSiam §4 and lightly's CIFAR-10 benchmark train with SGD
    lr: float = 0.06               # lightly CIFAR-10 base rate (scaled there by batch/128; SimSiam: 0.05 x batch/256)
    weight_decay: float = 5e-4     # lightly CIFAR-10 benchmark (SimSiam ImageNet: 1e-4)
    proj_dim: int = 512            # projector output (SimSiam: 2048 = its hidden width; scaled)
    pred_hidden_dim: int = 128     # predictor bottleneck, proj_dim / 4 (SimSiam §4.4: 512 of 2048)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.pred_hidden_dim >= 1, "pred_hidden_dim", self.pred_hidden_dim, "must be >= 1")


class SimSiam(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: Config):
        from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead

        super().__init__()
        self.backbone = backbone
        self.projection = SimSiamProjectionHead(backbone.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.prediction = SimSiamPredictionHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)

    def forward(self, x):
        z = self.projection(self.backbone(x))
        return z, self.prediction(z)


@register("simsiam", kind="encoder", config=Config, metrics=ssl.METRICS)
def run(cfg: Config, ctx) -> None:
    from lightly.loss import NegativeCosineSimilarity

    shape = ssl.load_splits(cfg, ctx).train.shape
    backbone, args = ssl.backbone(cfg, shape)
    criterion = NegativeCosineSimilarity()

    def step(model, x, y, gen):
        v1, v2 = cfg.views(x, gen)
        (z1, p1), (z2, p2) = model(v1), model(v2)
        return 0.5 * (criterion(p1, z2.detach()) + criterion(p2, z1.detach()))  # stop-gradient on z

    ssl.pretrain(cfg, ctx, SimSiam(backbone, cfg), step, arch_args=args)
