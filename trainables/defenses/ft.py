"""Conventional fine-tuning (FTP §3.2 / thesis §3.2.2; docs/methods.md §5.2).

Whole-model fine-tuning on clean data at a constant learning rate. The paper's rule is "the same
learning rate as in the pre-training process", so `lr` defaults to 0 meaning "use the backdoor
training's attack_lr"; sweeps/ft_lr.py-style ablations set it (the paper names 1e-4, 1e-3, 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass

from secsweep.backdoor import DefenseConfig, finetune
from secsweep.config import require
from secsweep.registry import register


@dataclass(frozen=True)
class Config(DefenseConfig):
    lr: float = 0.0   # learning rate per step; 0 = the attack's (pre-training) learning rate

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.lr >= 0, "lr", self.lr, "must be > 0, or 0 for the pre-training learning rate")

    @property
    def effective_lr(self) -> float:
        return self.lr or self.attack_lr


@register("ft", kind="defense", config=Config)
def run(cfg: Config, ctx) -> None:
    finetune(cfg, ctx, lambda steps_per_epoch: (lambda step: cfg.effective_lr))
