"""Cont-Steal (Sha et al., "Can't Steal? Cont-Steal! Contrastive Stealing Attacks Against Image
Encoders", CVPR 2023; thesis §4.3, T-Eq 4.3-4.7; docs/methods.md, "Model stealing").

For every batch of N surrogate images the attacker makes two augmented views, queries the deployed
encoder with one (t_i = E_T(x~_{i,t}), through the oracle, a constant) and embeds the other with
its surrogate (s_i = E_S(x~_{i,s})); the loss pulls s_i towards t_i and pushes it away from the
target's embeddings of the other images (D-_encoder, k = i included as written) and from the
surrogate's own embeddings of the other images (D-_self), at temperature tau
(`secsweep.ops.contsteal.cont_steal_loss`):

    l(i) = -log( exp(sim(s_i, t_i)/tau) / (sum_k exp(sim(s_i, t_k)/tau) + sum_{k!=i} exp(sim(s_i, s_k)/tau)) )

`use_encoder_negatives` / `use_self_negatives` switch the two negative terms off (T-Tab 4.3's
ablation); `loss="symmetric"` is the released code's NT-Xent over [target; surrogate]
(`symmetric_ntxent`). tau: 0.5 by default (the released code's; the thesis never states it, which
is why it is the sweep's headline dimension).

Views: `augment="randaugment"` is the thesis's (torchvision's RandAugment, n = 2, m = 14, one call
per image: ~12 ms per 28x28 image on a loaded CPU core, so 2,000 images x 2 views cost ~50 s per
epoch); `augment="two_views"` (the default) is the batched SimCLR recipe of the SSL encoders
(`secsweep.ops.ssl.two_views`: random resized crop, flip, colour jitter; ~0.3 ms per image), which
keeps the offline sweeps and tests within minutes on two CPU cores. `--preset paper` and
`--set augment=randaugment` give the thesis's views.

Everything else (oracle, surrogate data, evaluation, queries, the cost model, the artifact) is the
conventional encoder stealing's (`encoder_steal`); at equal epochs and data both use the same
queries (every epoch queries one view of every image).
"""

from __future__ import annotations

from dataclasses import dataclass

from secsweep.config import in_half_open_unit, one_of, positive, require
from secsweep.ops import contsteal
from secsweep.ops import ssl as ssl_ops
from secsweep.oracle import Oracle
from secsweep.presets import PAPER_SSL
from secsweep.registry import register
from trainables import stealing as common
from trainables.stealing.encoder_steal import EncoderStealConfig, run_encoder_steal

LOSSES = ("thesis", "symmetric")

# `--preset paper` of the stealing sweeps (thesis §4.4): a SimCLR ResNet-18 on CIFAR-10 as the target
# (secsweep.presets.PAPER_SSL), STL-10 as the surrogate data, ResNet-18 surrogates, 100 epochs,
# RandAugment(2, 14) views, CIFAR-10 as the downstream task of both heads
PAPER_STEAL = {
    "target": {"trainable": "simclr", **PAPER_SSL},
    "surrogate_model": PAPER_SSL["model"],
    "surrogate_dataset": "stl10",
    "surrogate_size": 0,
    "epochs": 100,
    "augment": "randaugment",
    "downstream_dataset": "cifar10",
    "probe_train_size": 0,
    "probe_test_size": 0,
}
AUGMENTS = ("two_views", "randaugment")


@dataclass(frozen=True)
class Config(EncoderStealConfig):
    temperature: float = contsteal.TEMPERATURE   # tau (released code: 0.5; thesis: not stated)
    loss: str = "thesis"                         # thesis (T-Eq 4.3-4.7) or symmetric (released code's NT-Xent)
    use_encoder_negatives: bool = True           # D-_encoder (T-Tab 4.3)
    use_self_negatives: bool = True              # D-_self (T-Tab 4.3)
    augment: str = "two_views"                   # two_views (batched, CPU-feasible) or randaugment (thesis)
    randaugment_ops: int = ssl_ops.RAND_AUGMENT_OPS              # RandAugment n (thesis: 2)
    randaugment_magnitude: int = ssl_ops.RAND_AUGMENT_MAGNITUDE  # RandAugment m (thesis: 14)
    crop_min: float = 0.2                        # two_views: smallest crop area fraction (as the SSL encoders)
    jitter: float = 0.4                          # two_views: colour-jitter strength (as the SSL encoders)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("temperature", self.temperature)
        one_of("loss", self.loss, LOSSES)
        require(self.use_encoder_negatives or self.use_self_negatives, "use_self_negatives", self.use_self_negatives,
                "must be true when use_encoder_negatives is false (with no negative term the loss is 0)")
        require(self.loss == "thesis" or (self.use_encoder_negatives and self.use_self_negatives), "loss", self.loss,
                "the negative switches belong to the thesis loss; use loss=thesis")
        one_of("augment", self.augment, AUGMENTS)
        require(self.randaugment_ops >= 0, "randaugment_ops", self.randaugment_ops, "must be >= 0")
        require(0 <= self.randaugment_magnitude <= 30, "randaugment_magnitude", self.randaugment_magnitude,
                "must be in [0, 30] (torchvision's 31 bins)")
        in_half_open_unit("crop_min", self.crop_min)
        require(0.0 <= self.jitter <= 1.0, "jitter", self.jitter, "must be in [0, 1]")

    def views(self, x, gen):
        """(surrogate view, target view) of a batch."""
        if self.augment == "randaugment":
            kw = dict(num_ops=self.randaugment_ops, magnitude=self.randaugment_magnitude)
            return ssl_ops.rand_augment(x, gen, **kw), ssl_ops.rand_augment(x, gen, **kw)
        return ssl_ops.two_views(x, gen, crop_scale=(self.crop_min, 1.0), jitter=self.jitter)


def step_of(cfg: Config):
    def make(oracle: Oracle) -> common.Step:
        def step(model, x, y, gen):
            view_s, view_t = cfg.views(x, gen)
            t = oracle.query(view_t)          # the target's answers: constants, no gradient
            s = model(view_s)
            if cfg.loss == "symmetric":
                return contsteal.symmetric_ntxent(s, t, cfg.temperature)
            return contsteal.cont_steal_loss(s, t, cfg.temperature, use_encoder_negatives=cfg.use_encoder_negatives,
                                             use_self_negatives=cfg.use_self_negatives)
        return step
    return make


@register("cont_steal", kind="stealing", config=Config, metrics=common.METRICS)
def run(cfg: Config, ctx) -> None:
    run_encoder_steal(cfg, ctx, step_of(cfg))
