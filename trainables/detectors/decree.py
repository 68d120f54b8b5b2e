"""DECREE (Feng et al., "Detecting Backdoors in Pre-trained Encoders", CVPR 2023) as the baseline of
DeDe's comparison: an encoder-level decision, and the per-sample score DeDe's paper derives from it
(docs/methods.md, "DECREE").

Trigger inversion (`secsweep.ops.decree.invert_trigger`): a mask m and pattern p such that clean
shadow images stamped with them, (1 - m) x + m p, collapse to one embedding of the frozen victim
(maximal mean pairwise cosine similarity) with the smallest mask (an adaptive L1 penalty).

* Encoder level: `decree_l1_fraction` = |m|_1 / (H W), the inverted trigger's L1 norm relative to the
  image; `decree_flagged` = 1 when it is below `decree_threshold` and the search reached its
  target similarity (an encoder that never collapses is not flagged).
* Sample level (DeDe's adaptation): the distance between the inverted pattern and the image inside
  the trigger region (`region_distance`, norm `score_norm`); a triggered input carries the trigger
  there. `score_direction="near"` (default) scores -distance (close to the inverted trigger =
  suspicious); `"far"` scores +distance, the literal reading of "the error" as a score that grows
  with suspicion, which puts a correctly inverted trigger below chance (DD-Tab 1/3's DECREE AUCs
  0.34-0.37 are what this reading gives; the paper does not say which it used).
* Threshold: the core's rule (`threshold`); the "training scores" are the shadow images' scores.

Choices (each a field; the documents give no DECREE parameters): `shadow_size` clean images from
the victim's pre-training training split (DECREE's shadow data; the detection sets never use
them); `epochs`, `lr`, `batch_size`, `lambda_init`, `target_similarity`, `patience` of the search;
`decree_threshold` 0.1 (DECREE's paper flags an encoder whose inverted trigger covers under a tenth
of the image, as recalled here: not checked against the paper). DECREE addresses patch triggers only
(DD: "–" for CTRL and BadCLIP); it runs on every victim here and the numbers say what it finds.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from secsweep import sample_detection as sd
from secsweep.backdoor import load_split
from secsweep.config import fail, one_of, positive, require
from secsweep.ops import decree as dec
from secsweep.registry import register

FLAGGED, L1_FRACTION = "decree_flagged", "decree_l1_fraction"
SIMILARITY, REACHED = "decree_similarity", "decree_reached"
METRICS = sd.METRICS + (FLAGGED, L1_FRACTION, SIMILARITY, REACHED)
DIRECTIONS = ("near", "far")


@dataclass(frozen=True)
class Config(sd.DetectorConfig):
    shadow_size: int = 500          # clean shadow images from the victim's pre-training split (a choice)
    epochs: int = 30                # inversion epochs over the shadow images (a choice)
    lr: float = 0.1                 # Adam learning rate of the mask / pattern (NC's search's)
    batch_size: int = 64            # shadow images per step (pairs: batch_size * (batch_size - 1))
    lambda_init: float = dec.LAMBDA_INIT  # initial weight of the mask's mean (image fraction)
    target_similarity: float = dec.TARGET_SIMILARITY  # mean pairwise cosine counted as collapsed
    lambda_multiplier: float = dec.LAMBDA_MULTIPLIER
    patience: int = dec.PATIENCE    # epochs at/below the target before lambda moves
    decree_threshold: float = 0.1   # flag the encoder when the L1 fraction is below this
    score_norm: int = 1             # the norm of the region distance (1 or 2; DD: not legible)
    score_direction: str = "near"   # near: -distance is the score; far: +distance (module docstring)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.shadow_size >= 2, "shadow_size", self.shadow_size, "must be >= 2 images")
        require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        positive("lr", self.lr)
        require(self.batch_size >= 2, "batch_size", self.batch_size, "must be >= 2 (pairwise similarity)")
        require(self.lambda_init >= 0, "lambda_init", self.lambda_init, "must be >= 0")
        require(0.0 < self.target_similarity <= 1.0, "target_similarity", self.target_similarity, "must be in (0, 1]")
        require(self.lambda_multiplier > 1.0, "lambda_multiplier", self.lambda_multiplier, "must be > 1")
        require(self.patience >= 1, "patience", self.patience, "must be >= 1")
        require(0.0 < self.decree_threshold < 1.0, "decree_threshold", self.decree_threshold, "must be in (0, 1)")
        require(self.score_norm in (1, 2), "score_norm", self.score_norm, "must be 1 or 2")
        one_of("score_direction", self.score_direction, DIRECTIONS)


def shadow_images(cfg: Config, ctx, shape: tuple[int, int]) -> torch.Tensor:
    """`shadow_size` seeded images of the victim's pre-training training split, at the victim's input
    (channels, size) = `shape` (a CLIP's grey pre-training images repeated to its 3 input channels)."""
    pre = sd.pretraining_config(cfg.victim)
    c, h = shape
    view = SimpleNamespace(dataset=pre.dataset, train_size=pre.train_size, image_size=h, channels=c,
                           val_fraction=pre.val_fraction, seed=pre.seed)
    if hasattr(pre, "data_seed"):
        view.data_seed = pre.data_seed
    pool = load_split(view, ctx, "train")
    if cfg.shadow_size > len(pool):
        fail("shadow_size", cfg.shadow_size, f"must be <= the {len(pool)} pre-training images of the victim")
    g = torch.Generator().manual_seed(cfg.seed + 31)
    return pool.images[torch.randperm(len(pool), generator=g)[: cfg.shadow_size]]


def sample_score(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor, norm: int = 1,
                 direction: str = "near") -> torch.Tensor:
    """The per-sample score (higher = more suspicious): -region distance ("near") or +distance ("far")."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: must be one of {', '.join(DIRECTIONS)}")
    sign = -1.0 if direction == "near" else 1.0
    return sign * dec.region_distance(images, mask, pattern, norm)


@register("decree", kind="sample_detector", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    def fit(victim: sd.Victim, ev: sd.Evaluation) -> sd.Scorer:
        shadow = shadow_images(cfg, ctx, victim.shape)
        inv = dec.invert_trigger(victim.encoder, shadow.to(victim.device), epochs=cfg.epochs,
                                 batch_size=cfg.batch_size, lr=cfg.lr, lambda_init=cfg.lambda_init,
                                 target_similarity=cfg.target_similarity, lambda_multiplier=cfg.lambda_multiplier,
                                 patience=cfg.patience, seed=cfg.seed)
        mask, pattern = inv.mask.cpu(), inv.pattern.cpu()

        def score(images: torch.Tensor) -> torch.Tensor:
            return sample_score(images, mask, pattern, cfg.score_norm, cfg.score_direction)

        with ctx.uncharged():
            ctx.save_output("trigger", {"mask": mask, "pattern": pattern})
        flagged = inv.reached and inv.l1_fraction < cfg.decree_threshold
        return sd.Scorer(score, train_scores=score(shadow),
                         metrics={FLAGGED: float(flagged), L1_FRACTION: inv.l1_fraction,
                                  SIMILARITY: inv.similarity, REACHED: float(inv.reached)})

    sd.run_detector(cfg, ctx, fit)
