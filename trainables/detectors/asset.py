"""ASSET (Pan et al., "ASSET: Robust Backdoor Data Detection Across a Multiplicity of Deep Learning
Paradigms", USENIX Security 2023) as the baseline sample detector of DeDe's comparison
(docs/methods.md, "ASSET").

Offset: a learnable projection of the frozen victim's embeddings is trained to minimise a
per-sample feature loss on a small clean base set and to maximise it on the suspect set — the set
being screened — at once (`secsweep.ops.asset`); clean suspect samples look like the base set and
are cancelled, poisoned ones keep a high loss. The score of a sample is its remaining loss. ASSET
screens a whole set: every detection test set (and, in the downstream-defense protocol, the
poisoned downstream training set and each screened test set) is a suspect set of its own run, so
ASSET is "trained at the same poisoning rate" as the set it screens, as DeDe's paper runs it.

Choices (each a field):

* base set: `base_size` clean images of the downstream training split (the documents' size is not
  legible: "[.]k for CL"); the remaining clean images of that split are never in a detection test
  set (those come from the validation hold-out and the test split);
* the per-sample loss: the unit-norm projection's energy of the embedding's direction away from the
  base set's mean embedding (`secsweep.ops.asset`; the documents state only the offset);
* epochs: 10, the public run script's (30 for CTRL there: give `epochs=30` for a CTRL victim, as
  sweeps/detector_comparison.py does); lr, batch size and projection width are this package's;
* "unstable, best epoch reported": the offset runs `epochs` epochs on every validation detection
  set and the epoch with the best mean validation AUC over the poison rates is the one every set
  is scored at (`asset_epoch`; never chosen on the test sets);
* threshold: the core's rule (`threshold`, default `train_mean`), where ASSET's "training scores"
  are the base set's remaining losses in the same run (the data it minimised on), the analogue of
  DeDe's average training loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from secsweep import sample_detection as sd
from secsweep.config import positive, require
from secsweep.ops.asset import fit_offset
from secsweep.registry import register

log = logging.getLogger(__name__)

ASSET_EPOCH = "asset_epoch"  # the epoch (1-based) selected on the validation sets
METRICS = sd.METRICS + (ASSET_EPOCH,)


@dataclass(frozen=True)
class Config(sd.DetectorConfig):
    base_size: int = 200          # clean base-set images from the downstream training split (DD: not legible)
    epochs: int = 10              # offset epochs (public run script: 10; 30 for CTRL)
    lr: float = 0.05              # Adam learning rate of the projection (a choice, measured in docs/methods.md)
    batch_size: int = 128         # suspect images per step (each paired with as many base images)
    proj_dim: int = 4             # directions of the projection (a choice)
    offset_weight: float = 1.0    # w: weight of the maximised suspect term (1 = the plain offset)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.base_size >= 2, "base_size", self.base_size, "must be >= 2 images")
        require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        positive("lr", self.lr)
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(self.proj_dim >= 1, "proj_dim", self.proj_dim, "must be >= 1")
        positive("offset_weight", self.offset_weight)


def base_set(cfg: Config, train) -> torch.Tensor:
    """`base_size` seeded clean images of the downstream training split."""
    if cfg.base_size > len(train):
        from secsweep.config import fail

        fail("base_size", cfg.base_size, f"must be <= the {len(train)} images of the downstream training split")
    g = torch.Generator().manual_seed(cfg.seed + 29)
    return train.images[torch.randperm(len(train), generator=g)[: cfg.base_size]]


def select_epoch(per_rate_aucs: list[list[float]]) -> int:
    """The 0-based epoch with the best mean AUC over the rates (the first on ties)."""
    n = len(per_rate_aucs[0])
    means = [sum(a[e] for a in per_rate_aucs) / len(per_rate_aucs) for e in range(n)]
    return max(range(n), key=lambda e: (means[e], -e))


@register("asset", kind="sample_detector", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    def fit(victim: sd.Victim, ev: sd.Evaluation) -> sd.Scorer:
        base = victim.embed(base_set(cfg, ev.train))
        kw = dict(lr=cfg.lr, batch_size=cfg.batch_size, out_dim=cfg.proj_dim, offset_weight=cfg.offset_weight,
                  seed=cfg.seed)

        # "best epoch": choose on the validation detection sets only
        curves = []
        for rate in cfg.poison_rates:
            x, y = ev.sets[("val_", rate)]
            offset = fit_offset(base, victim.embed(x), epochs=cfg.epochs, **kw)
            curves.append([sd.evaluate_detection(s["suspect"], y, 0.0).auc for s in offset.scores])
        best = select_epoch(curves)
        log.info("ASSET: epoch %d of %d selected (validation AUC per rate at it: %s)", best + 1, cfg.epochs,
                 ", ".join(f"{c[best]:.3f}" for c in curves))

        def score(images: torch.Tensor) -> torch.Tensor:
            offset = fit_offset(base, victim.embed(images), epochs=best + 1, **kw)
            # the threshold rules' "training scores": the base set's losses in this same run
            scorer.train_scores = offset.scores[-1]["base"].cpu()
            return offset.scores[-1]["suspect"]

        scorer = sd.Scorer(score, train_scores=None, metrics={ASSET_EPOCH: best + 1})
        return scorer

    sd.run_detector(cfg, ctx, fit)
