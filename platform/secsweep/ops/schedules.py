"""Learning-rate schedules as pure functions of the optimizer step.

SFT (super-fine-tuning, FTP §3.2 / thesis §3.2.2; METHODS.md §5.2): a two-phase cyclic schedule.
Phase 1 (the first `phase1_epochs` epochs) oscillates between LR_BASE and LR_MAX1, phase 2 between
LR_BASE and LR_MAX2. The ramp length `ramp_steps` is FTP's "number of iterations" (500), read as the
number of optimizer steps of one linear ramp from LR_BASE to the peak. Whether the peak is followed
by a linear ramp back down (triangular) or an instant drop (sawtooth) is only visible in a figure of
the paper, so both shapes are offered.
"""

from __future__ import annotations

SHAPES = ("triangular", "sawtooth")


def cycle_fraction(step: int, ramp_steps: int, shape: str = "triangular") -> float:
    """Position in the current cycle as a fraction of the peak, in [0, 1]."""
    if ramp_steps < 1:
        raise ValueError(f"ramp_steps={ramp_steps}: must be >= 1")
    if shape == "triangular":  # period 2R: R steps up, R steps down
        u = step % (2 * ramp_steps)
        return u / ramp_steps if u < ramp_steps else (2 * ramp_steps - u) / ramp_steps
    if shape == "sawtooth":  # period R: R steps up, then an instant drop back to the base
        return (step % ramp_steps) / ramp_steps
    raise ValueError(f"shape={shape!r}: must be one of {', '.join(SHAPES)}")


def sft_lr(
    step: int,
    *,
    steps_per_epoch: int,
    lr_base: float = 3e-4,
    lr_max1: float = 0.1,
    lr_max2: float = 0.001,
    phase1_epochs: float = 10,
    ramp_steps: int = 500,
    shape: str = "triangular",
) -> float:
    """Learning rate at optimizer step `step` (0-based) of super-fine-tuning."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch}: must be >= 1")
    peak = lr_max1 if step < phase1_epochs * steps_per_epoch else lr_max2
    return lr_base + cycle_fraction(step, ramp_steps, shape) * (peak - lr_base)
