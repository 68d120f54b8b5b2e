"""secsweep.ops.schedules (SFT's two-phase cyclic learning rate) and the SFT Config's schedule."""

from __future__ import annotations

import math

import pytest
import torch

from secsweep.ops.schedules import SHAPES, cosine, cycle_fraction, sft_lr

torch.set_num_threads(1)

BASE, MAX1, MAX2 = 3e-4, 0.1, 0.001
R = 10          # ramp steps
SPE = 100       # steps per epoch
PHASE1 = 2      # epochs -> phase 1 is steps [0, 200)


def lr(step, shape="triangular", **kw):
    args = dict(steps_per_epoch=SPE, lr_base=BASE, lr_max1=MAX1, lr_max2=MAX2, phase1_epochs=PHASE1,
                ramp_steps=R, shape=shape)
    args.update(kw)
    return sft_lr(step, **args)


@pytest.mark.parametrize("shape", SHAPES)
def test_starts_at_lr_base(shape):
    assert lr(0, shape) == pytest.approx(BASE, abs=1e-15)
    assert cycle_fraction(0, R, shape) == 0.0


def test_triangular_peaks_at_R_and_returns_at_2R():
    assert lr(R) == pytest.approx(MAX1)
    assert lr(2 * R) == pytest.approx(BASE)
    assert lr(3 * R) == pytest.approx(MAX1)
    assert cycle_fraction(R, R) == 1.0
    assert cycle_fraction(2 * R, R) == 0.0
    # symmetric about the peak
    for k in range(R + 1):
        assert lr(R - k) == pytest.approx(lr(R + k))


def test_triangular_period_is_2R():
    for step in range(0, 4 * R):
        assert cycle_fraction(step, R) == cycle_fraction(step + 2 * R, R)
    assert cycle_fraction(3, R) != cycle_fraction(3 + R, R)  # R alone is not a period


def test_sawtooth_rises_for_R_steps_then_drops_instantly():
    rising = [lr(s, "sawtooth") for s in range(R)]
    assert all(b > a for a, b in zip(rising, rising[1:]))
    assert rising[-1] == pytest.approx(BASE + (R - 1) / R * (MAX1 - BASE))
    assert lr(R, "sawtooth") == pytest.approx(BASE)  # instant drop, no ramp down
    for step in range(3 * R):
        assert cycle_fraction(step, R, "sawtooth") == cycle_fraction(step + R, R, "sawtooth")


@pytest.mark.parametrize("shape", SHAPES)
def test_ramp_is_linear(shape):
    up = [lr(s, shape) for s in range(R)]
    diffs = [b - a for a, b in zip(up, up[1:])]
    assert all(d == pytest.approx((MAX1 - BASE) / R) for d in diffs)
    assert cycle_fraction(R // 2, R, shape) == pytest.approx(0.5)


def test_triangular_ramp_down_is_linear():
    down = [lr(s) for s in range(R, 2 * R + 1)]
    diffs = [b - a for a, b in zip(down, down[1:])]
    assert all(d == pytest.approx(-(MAX1 - BASE) / R) for d in diffs)


@pytest.mark.parametrize("shape", SHAPES)
def test_phase1_peak_is_max1_then_max2(shape):
    boundary = PHASE1 * SPE
    phase1 = [lr(s, shape) for s in range(boundary)]
    phase2 = [lr(s, shape) for s in range(boundary, boundary + 4 * R)]
    top = 1.0 if shape == "triangular" else (R - 1) / R
    assert max(phase1) == pytest.approx(BASE + top * (MAX1 - BASE))
    assert max(phase2) == pytest.approx(BASE + top * (MAX2 - BASE))
    assert all(BASE - 1e-12 <= v <= MAX1 + 1e-12 for v in phase1)
    assert all(BASE - 1e-12 <= v <= MAX2 + 1e-12 for v in phase2)
    # the same cycle position, one step either side of the boundary, uses the two different peaks
    f = cycle_fraction(boundary - 1, R, shape)
    assert lr(boundary - 1, shape) == pytest.approx(BASE + f * (MAX1 - BASE))
    f = cycle_fraction(boundary, R, shape)
    assert lr(boundary, shape) == pytest.approx(BASE + f * (MAX2 - BASE))


def test_fractional_phase1_epochs():
    # 0.5 epochs of 100 steps -> phase 1 ends before step 50
    assert lr(R, phase1_epochs=0.5) == pytest.approx(MAX1)
    assert lr(49, phase1_epochs=0.5, ramp_steps=49) == pytest.approx(MAX1)  # peak at step 49: phase 1
    assert lr(50, phase1_epochs=0.5, ramp_steps=50) == pytest.approx(MAX2)  # peak at step 50: phase 2


def test_phase1_zero_is_all_phase2():
    assert lr(R, phase1_epochs=0) == pytest.approx(MAX2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ramp", [1, 3, 7])
def test_fraction_always_in_unit_interval(shape, ramp):
    for step in range(50):
        assert 0.0 <= cycle_fraction(step, ramp, shape) <= 1.0


def test_ramp_of_one_step():
    assert [cycle_fraction(s, 1) for s in range(4)] == [0.0, 1.0, 0.0, 1.0]
    assert [cycle_fraction(s, 1, "sawtooth") for s in range(3)] == [0.0, 0.0, 0.0]


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="shape"):
        cycle_fraction(0, R, "cosine")
    with pytest.raises(ValueError, match="shape"):
        lr(0, "cosine")
    with pytest.raises(ValueError, match="ramp_steps"):
        cycle_fraction(0, 0)
    with pytest.raises(ValueError, match="ramp_steps"):
        lr(0, ramp_steps=0)
    with pytest.raises(ValueError, match="ramp_steps"):
        lr(0, ramp_steps=-3)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr(0, steps_per_epoch=0)


# ----------------------------------------------------------------------------- SFT Config.schedule


def test_sft_config_ramp_zero_means_a_quarter_epoch():
    from trainables.defenses.sft import Config

    cfg = Config()
    assert cfg.ramp_steps == 0
    sched = cfg.schedule(steps_per_epoch=40)  # quarter epoch = 10 steps
    assert sched(0) == pytest.approx(cfg.lr_base)
    assert sched(10) == pytest.approx(cfg.lr_max1)
    assert sched(5) == pytest.approx(cfg.lr_base + 0.5 * (cfg.lr_max1 - cfg.lr_base))
    assert sched(20) == pytest.approx(cfg.lr_base)
    # phase 1 = 1 epoch = 40 steps; the peak at step 50 is phase 2's
    assert sched(50) == pytest.approx(cfg.lr_max2)


def test_sft_config_explicit_ramp_and_shape_pass_through():
    from trainables.defenses.sft import Config

    cfg = Config(ramp_steps=4, shape="sawtooth", lr_base=0.01, lr_max1=0.2, lr_max2=0.05, phase1_epochs=2)
    sched = cfg.schedule(steps_per_epoch=10)
    assert sched(0) == pytest.approx(0.01)
    assert sched(3) == pytest.approx(0.01 + 0.75 * 0.19)
    assert sched(4) == pytest.approx(0.01)
    assert sched(23) == pytest.approx(0.01 + 0.75 * 0.04)


def test_sft_config_quarter_epoch_is_at_least_one_step():
    from trainables.defenses.sft import Config

    sched = Config().schedule(steps_per_epoch=3)  # 3 // 4 = 0 -> clamped to 1
    assert sched(1) == pytest.approx(Config().lr_max1)
    assert sched(2) == pytest.approx(Config().lr_base)


# -- torch.optim.lr_scheduler as the reference ------------------------------------------------------

def _cyclic_lr_rates(shape: str, n_steps: int) -> list[float]:
    """The SFT schedule built from torch's CyclicLR, stepped alongside a real SGD optimizer: the
    phase switch is CyclicLR's per-iteration scale_fn (peak MAX1, then MAX2)."""
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=BASE)
    phase2_scale = (MAX2 - BASE) / (MAX1 - BASE)
    sched = torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=BASE, max_lr=MAX1, step_size_up=R, step_size_down=R if shape == "triangular" else 0,
        mode="triangular", scale_fn=lambda it: 1.0 if it < PHASE1 * SPE else phase2_scale,
        scale_mode="iterations", cycle_momentum=False)
    rates = []
    for _ in range(n_steps):
        rates.append(opt.param_groups[0]["lr"])  # the rate this step trains with
        param.grad = torch.ones(1)
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("shape", SHAPES)
def test_sft_lr_equals_torch_cyclic_lr_step_by_step(shape):
    n = PHASE1 * SPE + 10 * R + 3  # all of phase 1 and several cycles of phase 2
    ours = [lr(step, shape) for step in range(n)]
    assert ours == pytest.approx(_cyclic_lr_rates(shape, n), rel=1e-12, abs=1e-15)
    top = 1.0 if shape == "triangular" else (R - 1) / R  # a sawtooth drops before it reaches its peak
    assert max(ours[: PHASE1 * SPE]) == pytest.approx(BASE + top * (MAX1 - BASE))  # both phases compared
    assert max(ours[PHASE1 * SPE :]) == pytest.approx(BASE + top * (MAX2 - BASE))


def test_cosine_equals_torch_cosine_annealing_in_a_training_loop():
    total, base = 37, 0.05
    schedule = cosine(base, total)
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=base)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    for step in range(total + 1):
        assert schedule(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        assert schedule(step) == pytest.approx(base * (1 + math.cos(math.pi * step / total)) / 2, abs=1e-15)
        param.grad = torch.ones(1)
        opt.step()
        sched.step()
    assert schedule(0) == base and schedule(total) == 0.0
    assert schedule(total + 5) == 0.0  # held at 0 after the end (torch's own would rise again)


def test_from_torch_rejects_empty_schedule():
    with pytest.raises(ValueError, match="total_steps=0"):
        cosine(0.1, 0)
