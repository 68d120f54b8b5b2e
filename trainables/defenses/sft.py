"""Super-fine-tuning, SFT (Sha et al., "Fine-Tuning Is All You Need to Mitigate Backdoor Attacks",
FTP §3.2 and §4.4; thesis §3.2.2; docs/methods.md §5.3).

Whole-model fine-tuning on clean data with a two-phase cyclic learning rate: during the first
`phase1_epochs` the rate ramps linearly from LR_BASE to LR_MAX1 and back, afterwards between LR_BASE
and LR_MAX2 (secsweep.ops.schedules.sft_lr; fields in secsweep.backdoor.SFTSchedule). Values from
FTP §4.4: LR_BASE 3e-4, LR_MAX1 0.1 (0.3 with only ~10 % of the clean data, FTP §5.5), LR_MAX2 0.001,
phase 1 = 10 epochs, "500 iterations" (read as the ramp length in optimizer steps). Not stated in the
paper and therefore fields: the cycle shape (triangular or sawtooth), total epochs, optimizer
momentum, weight decay and batch size (SGD with the DefenseConfig defaults here).

The defaults are the CPU-sized offline recipe: a 2-epoch defense whose first epoch is phase 1 and
whose ramps are a quarter epoch long. `--preset paper` restores the paper's values.
"""

from __future__ import annotations

from dataclasses import dataclass

from secsweep.backdoor import DefenseConfig, SFTSchedule, finetune
from secsweep.registry import register


@dataclass(frozen=True)
class Config(DefenseConfig, SFTSchedule):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_schedule()


@register("sft", kind="defense", config=Config)
def run(cfg: Config, ctx) -> None:
    finetune(cfg, ctx, cfg.schedule)
