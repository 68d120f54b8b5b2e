"""Blended (Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning",
2017), as used through BackdoorBench by the FTP paper (docs/methods.md §4.3).

The trigger is a full-image pattern blended into the input, x' = (1 - alpha) x + alpha p, so its
position does not matter. alpha = 0.2 (BackdoorBench's training blend ratio). BackdoorBench blends a
Hello Kitty photo; no image ships here, so p is a fixed seeded noise image (`pattern_seed`), the
random-noise key pattern Chen et al. also evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from secsweep import data
from secsweep.backdoor import VictimConfig, train_backdoored
from secsweep.config import require
from secsweep.ops.triggers import blend_pattern, blended
from secsweep.registry import register

VERSION = 2  # 2: the stage saves the `training_set` record (secsweep.trainset)


@dataclass(frozen=True)
class Config(VictimConfig):
    alpha: float = 0.2      # blend weight of the pattern, in (0, 1]
    pattern_seed: int = 0   # seed of the noise pattern

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0.0 < self.alpha <= 1.0, "alpha", self.alpha, "must be in (0, 1]")


def trigger(cfg: Config, output=None):
    c, h, w = data.native_shape(cfg.dataset)
    shape = (cfg.channels or c, cfg.image_size or h, cfg.image_size or w)
    return partial(blended, pattern=blend_pattern(shape, cfg.pattern_seed), alpha=cfg.alpha)


@register("blended", kind="attack", config=Config, trigger=trigger)
def run(cfg: Config, ctx) -> None:
    train_backdoored(cfg, ctx, trigger(cfg))
