"""LF low-frequency trigger (secsweep.ops.frequency)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secsweep.ops.frequency import (
    LF_CUTOFF,
    apply_lf,
    compute_lf_trigger,
    lf_uap_step,
    low_pass,
    low_pass_mask,
    project_lf,
)




def _high_freq_fraction(x: torch.Tensor, cutoff: float = LF_CUTOFF) -> float:
    """Share of the spectral energy above `cutoff` (rfft2 bins outside the low-pass mask)."""
    spec = torch.fft.rfft2(x).abs() ** 2
    outside = ~low_pass_mask(*x.shape[-2:], cutoff)
    return (spec[..., outside].sum() / spec.sum().clamp_min(1e-30)).item()


def _checker(c: int, h: int, w: int) -> torch.Tensor:
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ((ii + jj) % 2).float().expand(c, h, w).clone()


def test_low_pass_removes_checkerboard_keeps_constant():
    checker = _checker(3, 16, 16) - 0.5  # zero-mean: pure Nyquist pattern
    assert low_pass(checker).abs().max().item() < 1e-5
    const = torch.full((2, 3, 16, 16), 0.7)
    assert torch.allclose(low_pass(const), const, atol=1e-6)
    mixed = const[0] + 0.2 * checker  # only the constant survives
    assert torch.allclose(low_pass(mixed), const[0], atol=1e-5)


def test_low_pass_is_real_projection_with_smooth_output():
    x = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    y = low_pass(x, 0.3)
    assert y.shape == x.shape and y.dtype == x.dtype and not y.is_complex()
    assert torch.allclose(low_pass(y, 0.3), y, atol=1e-5)  # idempotent (ideal filter)
    assert _high_freq_fraction(y, 0.3) < 1e-10
    assert torch.allclose(low_pass(x, 2.0), x, atol=1e-5)  # above sqrt(2) nothing is removed
    assert torch.allclose(low_pass(x, 0.0), x.mean(dim=(-2, -1), keepdim=True).expand_as(x), atol=1e-5)


def test_project_lf_meets_both_constraints():
    d = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    p = project_lf(d, eps=0.05)
    assert p.abs().max().item() <= 0.05 + 1e-7
    assert _high_freq_fraction(p) < 1e-10
    small = 1e-3 * low_pass(d)
    assert torch.allclose(project_lf(small, eps=0.05), small, atol=1e-8)  # never scaled up


def test_apply_lf_clamps():
    x = torch.tensor([[[[0.0, 0.5], [0.98, 1.0]]]])
    d = torch.full((1, 2, 2), 0.05)
    assert torch.allclose(apply_lf(x, d), torch.tensor([[[[0.05, 0.55], [1.0, 1.0]]]]))
    assert torch.allclose(apply_lf(x, -d), torch.tensor([[[[0.0, 0.45], [0.93, 0.95]]]]))


def _tiny_linear() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(128, 1, 16, 16, generator=g)
    y = torch.randint(0, 3, (128,), generator=g)
    return model, x, y


def test_compute_lf_trigger_constraints_and_target_probability():
    model, x, y = _tiny_linear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    eps = 0.1
    d = compute_lf_trigger(model, x[:64], y[:64], target=0, steps=10, batch_size=32, eps=eps, lr=0.03)
    assert d.shape == (1, 16, 16)
    assert d.abs().max().item() <= eps + 1e-6
    assert _high_freq_fraction(d) < 1e-10
    assert torch.allclose(low_pass(d), d, atol=1e-6)
    # the model is untouched: same weights, no grads, mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    # held-out inputs: the universal perturbation raises the target-class probability
    held = x[64:]
    with torch.no_grad():
        p_clean = model(held).softmax(1)[:, 0]
        p_trig = model(apply_lf(held, d)).softmax(1)[:, 0]
    assert p_trig.mean().item() > p_clean.mean().item() + 0.01
    assert (p_trig > p_clean).float().mean().item() > 0.9
    # deterministic by seed
    again = compute_lf_trigger(model, x[:64], y[:64], target=0, steps=10, batch_size=32, eps=eps, lr=0.03)
    assert torch.equal(d, again)


def test_step_ignores_target_class_images():
    model, x, _ = _tiny_linear()
    delta = torch.zeros(1, 16, 16)
    out = lf_uap_step(model, x[:8], torch.zeros(8, dtype=torch.long), delta, target=0)
    assert torch.equal(out, delta)  # nothing to flip: only the projection is applied


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"eps": 0.0}, "eps=0.0"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"cutoff": -0.1}, "cutoff=-0.1"),
        ({"steps": -1}, "steps=-1"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"target": 5}, "target=5"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    model, x, y = _tiny_linear()
    args = {"target": 0, "steps": 1, "batch_size": 4} | kwargs
    with pytest.raises(ValueError, match=name):
        compute_lf_trigger(model, x[:8], y[:8], **args)


def test_all_images_of_target_class_raises():
    model, x, _ = _tiny_linear()
    with pytest.raises(ValueError, match="target=0"):
        compute_lf_trigger(model, x[:4], torch.zeros(4, dtype=torch.long), target=0, steps=1)
