"""secsweep.ops.triggers: BadNets patch and Blended pattern, as pure tensor functions."""

from __future__ import annotations

import pytest
import torch

from secsweep.ops.triggers import badnets, badnets_patch_size, blend_pattern, blended

torch.set_num_threads(1)  # tiny tensors: threads only add contention on the shared CI box


def _grey(*shape: int) -> torch.Tensor:
    """Images in [0, 0.5) so a white patch (1.0) is unmistakable."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(1)) * 0.5


# ----------------------------------------------------------------------------- badnets


def test_patch_size_is_3_on_32x32():
    assert badnets_patch_size(32, 32) == 3


def test_patch_size_is_2_on_28x28():
    assert badnets_patch_size(28, 28) == 2


def test_patch_size_never_below_one_and_scales_up():
    assert badnets_patch_size(4, 4) == 1
    assert badnets_patch_size(1, 1) == 1
    assert badnets_patch_size(64, 64) == 6
    assert badnets_patch_size(64, 32) == 3  # the shorter side decides


@pytest.mark.parametrize("side", [32, 28])
def test_patch_is_bottom_right_and_nothing_else_changes_chw(side):
    x = _grey(3, side, side)
    before = x.clone()
    out = badnets(x)
    s = badnets_patch_size(side, side)
    assert out.shape == x.shape
    assert torch.equal(x, before), "input was modified"
    patch = torch.zeros(side, side, dtype=torch.bool)
    patch[side - s :, side - s :] = True
    assert torch.all(out[:, patch] == 1.0)
    assert torch.equal(out[:, ~patch], x[:, ~patch])
    assert int((out != x).any(0).sum()) == s * s  # exactly s x s pixels differ


def test_patch_on_batch_nchw_is_per_image():
    x = _grey(5, 1, 32, 32)
    before = x.clone()
    out = badnets(x)
    assert out.shape == (5, 1, 32, 32)
    assert torch.equal(x, before)
    assert torch.all(out[..., 29:, 29:] == 1.0)
    assert torch.equal(out[..., :29, :], x[..., :29, :])
    assert torch.equal(out[..., :, :29], x[..., :, :29])
    for i in range(5):
        assert torch.equal(out[i], badnets(x[i]))


def test_patch_value_and_margin():
    x = _grey(1, 32, 32)
    out = badnets(x, value=0.75, margin=2)
    assert torch.all(out[0, 27:30, 27:30] == 0.75)
    assert torch.equal(out[0, 30:, :], x[0, 30:, :])  # margin rows untouched
    assert torch.equal(out[0, :, 30:], x[0, :, 30:])
    assert int((out != x).sum()) == 9


def test_patch_on_non_square_image_sits_in_the_corner():
    x = _grey(1, 32, 64)
    out = badnets(x)
    changed = torch.nonzero((out != x)[0])
    assert changed[:, 0].min() == 29 and changed[:, 0].max() == 31
    assert changed[:, 1].min() == 61 and changed[:, 1].max() == 63


# ----------------------------------------------------------------------------- blended


def test_blend_pattern_deterministic_per_seed_and_in_unit_range():
    a = blend_pattern((3, 32, 32), seed=7)
    b = blend_pattern((3, 32, 32), seed=7)
    c = blend_pattern((3, 32, 32), seed=8)
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert float(a.std()) > 0.1  # noise, not a constant image


def test_blend_pattern_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    blend_pattern((1, 8, 8), seed=3)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("alpha", [0.2, 0.5, 1.0])
def test_blended_is_exact_convex_mix(alpha):
    x = _grey(4, 3, 8, 8)
    before = x.clone()
    p = blend_pattern((3, 8, 8), seed=0)
    out = blended(x, p, alpha=alpha)
    assert torch.equal(x, before), "input was modified"
    assert out.shape == x.shape
    assert torch.allclose(out, (1 - alpha) * x + alpha * p, atol=0, rtol=0)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_blended_alpha_one_is_the_pattern_and_chw_works():
    x = _grey(3, 8, 8)
    p = blend_pattern((3, 8, 8), seed=2)
    assert torch.equal(blended(x, p, alpha=1.0), p)
    assert torch.allclose(blended(x, p, alpha=0.2), 0.8 * x + 0.2 * p)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.0001, 2.0])
def test_blended_rejects_alpha_outside_half_open_unit(alpha):
    x = _grey(3, 8, 8)
    with pytest.raises(ValueError, match="alpha"):
        blended(x, blend_pattern((3, 8, 8)), alpha=alpha)
