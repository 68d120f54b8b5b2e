"""BadNets (Gu et al., "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply
Chain", 2017), as used through BackdoorBench by the FTP paper (docs/methods.md §4.2).

A white square patch at the bottom-right corner, all-to-one to `target_label`. Patch size 3x3 on a
32x32 image (BackdoorBench's default; the paper shows the trigger only as a picture), scaled for
other sizes (2x2 on 28x28 Fashion-MNIST). Poison ratio 0.1 (docs/methods.md §4.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from secsweep.backdoor import VictimConfig, train_backdoored
from secsweep.config import require
from secsweep.ops.triggers import badnets
from secsweep.registry import register

VERSION = 2  # 2: the stage saves the `training_set` record (secsweep.trainset)


@dataclass(frozen=True)
class Config(VictimConfig):
    patch: int = 3          # patch side in pixels on a 32x32 image (scaled to the image size)
    value: float = 1.0      # patch intensity in [0, 1] (1 = white)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.patch >= 1, "patch", self.patch, "must be >= 1 pixel")
        require(0.0 <= self.value <= 1.0, "value", self.value, "must be in [0, 1]")


def trigger(cfg: Config, output=None):
    return partial(badnets, patch=cfg.patch, value=cfg.value)


@register("badnets", kind="attack", config=Config, trigger=trigger)
def run(cfg: Config, ctx) -> None:
    train_backdoored(cfg, ctx, trigger(cfg))
