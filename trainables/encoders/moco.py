"""MoCo v2 (He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR
2020; Chen et al., "Improved Baselines with Momentum Contrastive Learning", 2020; docs/methods.md,
"Self-supervised encoders").

A query encoder (backbone f_q + projection head g_q, trained) and a key encoder (f_k, g_k: a
momentum copy, no gradient, theta_k <- m theta_k + (1 - m) theta_q after every step). The queries
q = g_q(f_q(v1)) are contrasted with the key of their other view k+ = g_k(f_k(v2)) and with a queue
of K keys of earlier batches (all L2-normalised):

    l(q) = -log exp(q.k+ / tau) / (exp(q.k+ / tau) + sum_{k in queue} exp(q.k / tau))

symmetrised over the two views (as lightly's benchmarks do; the MoCo v2 paper uses one direction),
and the keys of the second view are enqueued after the step (first in, first out).

The queue is a persistent buffer of the model (lightly's `NTXentLoss(memory_bank_size=...)` keeps
its bank as a non-persistent buffer, absent from `state_dict()`, so a resumed run would restart
from a random bank; hence the queue is held here), and the key encoder is a submodule: both are in
every checkpoint.

Defaults (the documents do not state MoCo's settings):
* temperature 0.2 — MoCo v2 (Chen et al. 2020, Table 1: tau 0.2 with the MLP head);
* momentum 0.99 — lightly's CIFAR-10 benchmark (MoCo v2's 0.999 is tuned for ImageNet's 5,000
  steps per epoch; at a few hundred steps a 0.999 key encoder barely moves from its initialisation);
* queue 4096 — lightly's CIFAR-10 benchmark memory bank (MoCo v2: 65,536 on ImageNet's 1.28 M
  images; the queue must stay well below the pre-training set so its keys are not stale copies
  of the current batch: 4096 is 41 % of the 10,000-image default);
* projection: lightly's `MoCoProjectionHead` (2-layer MLP, MoCo v2), widths of `SSLConfig`.
Everything else: `secsweep.ssl.SSLConfig`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from secsweep import ssl
from secsweep.config import positive, require
from secsweep.registry import register


@dataclass(frozen=True)
class Config(ssl.SSLConfig):
    temperature: float = 0.2    # InfoNCE temperature tau (MoCo v2: 0.2; documents: not stated)
    momentum_ema: float = 0.99  # key-encoder momentum m per step (lightly CIFAR-10: 0.99; MoCo v2 ImageNet: 0.999)
    queue_size: int = 4096      # negatives kept from earlier batches (lightly CIFAR-10: 4096; MoCo v2: 65536)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("temperature", self.temperature)
        require(0.0 <= self.momentum_ema < 1.0, "momentum_ema", self.momentum_ema, "must be in [0, 1)")
        require(self.queue_size >= 1, "queue_size", self.queue_size, "must be >= 1")


class MoCo(nn.Module):
    """Query backbone + head (trained), key backbone + head (momentum copies), the key queue."""

    def __init__(self, backbone: nn.Module, cfg: Config):
        from lightly.models.modules import MoCoProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone = backbone
        self.projection = MoCoProjectionHead(backbone.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_momentum = copy.deepcopy(self.projection)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_momentum)
        # (K, D) unit keys, random until the first K keys have been enqueued (as MoCo initialises
        # it); persistent buffers, so in state_dict() and in every checkpoint
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return F.normalize(self.projection(self.backbone(x)), dim=1)

    @torch.no_grad()
    def keys(self, x):
        return F.normalize(self.projection_momentum(self.backbone_momentum(x)), dim=1)

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor) -> None:
        """Replace the oldest len(k) keys by `k` (ring buffer; a batch larger than the queue keeps
        its last K keys)."""
        k = k.detach().to(self.queue.dtype)[-len(self.queue):]
        n, size = len(k), len(self.queue)
        idx = (int(self.queue_ptr) + torch.arange(n, device=k.device)) % size
        self.queue[idx] = k
        self.queue_ptr.fill_((int(self.queue_ptr) + n) % size)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's loss: cross-entropy of the positive (column 0) among [q.k+, q.queue] / tau."""
    q = q.float()
    pos = (q * k.float()).sum(1, keepdim=True)
    neg = q @ queue.float().T
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


@register("moco", kind="encoder", config=Config, metrics=ssl.METRICS)
def run(cfg: Config, ctx) -> None:
    from lightly.models.utils import update_momentum

    shape = ssl.load_splits(cfg, ctx).train.shape
    backbone, args = ssl.backbone(cfg, shape)
    model = MoCo(backbone, cfg)

    def step(model, x, y, gen):
        bare = getattr(model, "module", model)
        v1, v2 = cfg.views(x, gen)
        q1, q2 = model(v1), model(v2)
        k1, k2 = bare.keys(v1), bare.keys(v2)
        queue = bare.queue.clone()  # the negatives of this step, before the new keys go in
        loss = 0.5 * (info_nce(q1, k2, queue, cfg.temperature) + info_nce(q2, k1, queue, cfg.temperature))
        bare.enqueue(k2)
        return loss

    def after_step_of(m):
        def after(_step: int) -> None:
            update_momentum(m.backbone, m.backbone_momentum, cfg.momentum_ema)
            update_momentum(m.projection, m.projection_momentum, cfg.momentum_ema)
        return after

    ssl.pretrain(cfg, ctx, model, step, after_step_of=after_step_of, arch_args=args)
