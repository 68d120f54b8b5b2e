"""Learning-rate schedules as pure functions of the optimizer step.

SFT (super-fine-tuning, FTP §3.2 / thesis §3.2.2; docs/methods.md §5.3): a two-phase cyclic schedule.
Phase 1 (the first `phase1_epochs` epochs) oscillates between LR_BASE and LR_MAX1, phase 2 between
LR_BASE and LR_MAX2. The ramp length `ramp_steps` is FTP's "number of iterations" (500), read as the
number of optimizer steps of one linear ramp from LR_BASE to the peak. Whether the peak is followed
by a linear ramp back down (triangular) or an instant drop (sawtooth) is only visible in a figure of
the paper, so both shapes are offered.

Why the SFT schedule stays a closed-form function here instead of `torch.optim.lr_scheduler`: the
triangular shape is `CyclicLR(mode="triangular")` and the sawtooth `CyclicLR(step_size_down=0)`, but
the switch from LR_MAX1 to LR_MAX2 at the end of phase 1 has no torch scheduler; it needs a custom
`scale_fn` (a hand-written closure again) and CyclicLR's step arithmetic rounds differently in the
last bits. The closed form below is three lines, and tests/test_schedules.py checks it step by step
against CyclicLR, both shapes and both phases.

Every schedule is a function `step -> learning rate` because that is what the training loop
consumes: it sets the rate before each optimizer step, a run resumed from a checkpoint at any step
needs no scheduler state, and the `lr_schedule.png` artifact plots the same function. Schedules that
torch does provide (cosine annealing) are taken from torch through `from_torch`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

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


def from_torch(make_scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler],
               lr: float, total_steps: int) -> Callable[[int], float]:
    """A `torch.optim.lr_scheduler` schedule as a function of the optimizer step.

    `make_scheduler(optimizer)` builds the scheduler on a one-parameter SGD optimizer whose initial
    rate is `lr`; it is stepped `total_steps` times once, here, and the rates are kept. The returned
    function gives the rate used at step 0 ... total_steps, and the last one after that.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}: must be >= 1")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = make_scheduler(opt)
    rates = [sched.get_last_lr()[0]]
    with warnings.catch_warnings():
        # no training happens here, so optimizer.step() is skipped (it would cost 10x the time);
        # torch warns about exactly that order
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        for _ in range(total_steps):
            sched.step()
            rates.append(sched.get_last_lr()[0])
    return lambda step: rates[min(max(step, 0), total_steps)]


def cosine(lr: float, total_steps: int) -> Callable[[int], float]:
    """`lr` annealed to 0 over `total_steps` optimizer steps, then held at 0: torch's
    `CosineAnnealingLR(T_max=total_steps, eta_min=0)`, i.e. lr * (1 + cos(pi * step / total_steps)) / 2."""
    def make(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=0.0)

    return from_torch(make, lr, total_steps)
