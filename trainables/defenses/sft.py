"""Super-fine-tuning, SFT (Sha et al., "Fine-Tuning Is All You Need to Mitigate Backdoor Attacks",
FTP §3.2 and §4.4; thesis §3.2.2; METHODS.md §5.2).

Whole-model fine-tuning on clean data with a two-phase cyclic learning rate: during the first
`phase1_epochs` the rate ramps linearly from LR_BASE to LR_MAX1 and back, afterwards between LR_BASE
and LR_MAX2 (secsweep.ops.schedules.sft_lr). Values from FTP §4.4: LR_BASE 3e-4, LR_MAX1 0.1 (0.3
with only ~10 % of the clean data, FTP §5.5), LR_MAX2 0.001, phase 1 = 10 epochs, "500 iterations"
(read as the ramp length in optimizer steps). Not stated in the paper and therefore fields: the
cycle shape (triangular or sawtooth), total epochs, optimizer momentum, weight decay and batch size
(SGD with the DefenseConfig defaults here).

The defaults below are the CPU-sized offline recipe: a 2-epoch defense whose first epoch is phase 1
and whose ramps are a quarter epoch long. `--preset paper` restores the paper's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from secsweep.backdoor import DefenseConfig, finetune
from secsweep.config import one_of, positive, require
from secsweep.ops.schedules import SHAPES, sft_lr
from secsweep.registry import register


@dataclass(frozen=True)
class Config(DefenseConfig):
    lr_base: float = 3e-4        # LR_BASE, learning rate per step at the bottom of every cycle (FTP: 3e-4)
    lr_max1: float = 0.1         # LR_MAX1, peak learning rate in phase 1 (FTP: 0.1)
    lr_max2: float = 0.001       # LR_MAX2, peak learning rate in phase 2 (FTP: 0.001)
    phase1_epochs: float = 1.0   # epochs of phase 1 (FTP: 10)
    ramp_steps: int = 0          # optimizer steps of one ramp LR_BASE -> peak (FTP: 500); 0 = a quarter epoch
    shape: str = "triangular"    # cycle shape: triangular (ramp down) or sawtooth (instant drop)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lr_base", "lr_max1", "lr_max2"):
            positive(name, getattr(self, name))
        require(self.lr_max1 > self.lr_max2, "lr_max1", self.lr_max1, f"must be greater than lr_max2={self.lr_max2}")
        require(self.lr_max2 >= self.lr_base, "lr_max2", self.lr_max2, f"must be >= lr_base={self.lr_base}")
        require(self.phase1_epochs >= 0, "phase1_epochs", self.phase1_epochs, "must be >= 0")
        require(self.ramp_steps >= 0, "ramp_steps", self.ramp_steps, "must be >= 1, or 0 for a quarter epoch")
        one_of("shape", self.shape, SHAPES)

    def schedule(self, steps_per_epoch: int):
        """The learning rate as a function of the optimizer step."""
        ramp = self.ramp_steps or max(1, steps_per_epoch // 4)
        return partial(sft_lr, steps_per_epoch=steps_per_epoch, lr_base=self.lr_base, lr_max1=self.lr_max1,
                       lr_max2=self.lr_max2, phase1_epochs=self.phase1_epochs, ramp_steps=ramp, shape=self.shape)


@register("sft", kind="defense", config=Config)
def run(cfg: Config, ctx) -> None:
    finetune(cfg, ctx, cfg.schedule)
