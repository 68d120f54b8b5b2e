"""secsweep.ops.ctrl (CTRL's DCT trigger) and secsweep.ops.distribution (SWD, MMD): pure tensor
code, checked against what it must be (orthonormality, exact coefficients, bounds, invisibility,
distances that separate shifted from equal distributions). Runs in a few seconds."""

from __future__ import annotations

import math

import pytest
import torch

from secsweep.ops import ctrl, distribution as dist


def test_dct_matrix_is_orthonormal_and_dct2_inverts():
    for n in (1, 8, 28, 32):
        d = ctrl.dct_matrix(n, dtype=torch.float64)
        assert torch.allclose(d @ d.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    assert torch.allclose(ctrl.idct2(ctrl.dct2(x)), x, atol=1e-12)
    # the DC coefficient of a constant image c on an n x n grid is c * n (orthonormal)
    assert ctrl.dct2(torch.full((8, 8), 0.5, dtype=torch.float64))[0, 0].item() == pytest.approx(4.0)


def test_yuv_round_trip_and_luma_of_grey():
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    assert torch.allclose(ctrl.yuv_to_rgb(ctrl.rgb_to_yuv(x)), x, atol=1e-12)
    grey = torch.full((1, 3, 4, 4), 0.3, dtype=torch.float64)
    yuv = ctrl.rgb_to_yuv(grey)
    assert torch.allclose(yuv[:, 0], torch.full_like(yuv[:, 0], 0.3), atol=1e-6)  # Y of grey = grey
    assert yuv[:, 1:].abs().max() < 1e-4                                             # no chroma


def test_scaled_positions_keep_the_band():
    assert ctrl.scaled_positions(ctrl.CTRL_POSITIONS, 32) == ((15, 15), (31, 31))
    assert ctrl.scaled_positions(ctrl.CTRL_POSITIONS, 28) == ((13, 13), (27, 27))
    assert ctrl.scaled_positions(ctrl.CTRL_POSITIONS, 8) == ((3, 3), (7, 7))
    with pytest.raises(ValueError, match="position"):
        ctrl.scaled_positions(((32, 0),), 32)


@pytest.mark.parametrize("channels,components", [(1, "uv"), (3, "uv"), (3, "y")])
def test_trigger_adds_exactly_the_magnitude_to_the_chosen_coefficients(channels, components):
    # mid-grey images: nothing is clamped, so the change is the pattern itself
    x = torch.full((2, channels, 32, 32), 0.5, dtype=torch.float64) + 0.01 * torch.rand(2, channels, 32, 32,
                                                                                        dtype=torch.float64)
    y = ctrl.apply_ctrl(x, magnitude=0.2, components=components)
    delta = y - x
    if channels == 3:
        delta = ctrl.rgb_to_yuv(delta)
        planes = [ctrl.COMPONENTS.index(k) for k in components]
    else:
        planes = [0]
    coeff = ctrl.dct2(delta)
    for ch in range(delta.shape[1]):
        want = torch.zeros(32, 32, dtype=torch.float64)
        if ch in planes:
            want[15, 15] = want[31, 31] = 0.2
        assert torch.allclose(coeff[:, ch], want.expand(2, 32, 32), atol=1e-9), ch


def test_windowed_trigger_repeats_per_block_and_checks_the_window():
    p = ctrl.ctrl_pattern((1, 32, 32), window=8, dtype=torch.float64)
    assert torch.allclose(p[0, :8, :8], p[0, 8:16, 24:32])
    # the coefficient scales with the window (8 / 32 of the magnitude), the per-pixel amplitude does not
    assert torch.allclose(ctrl.dct2(p[0, :8, :8])[3, 3], torch.tensor(ctrl.CTRL_MAGNITUDE / 4, dtype=torch.float64))
    assert ctrl.max_change((1, 8, 8)) == pytest.approx(ctrl.max_change((1, 32, 32)), rel=0.05)
    with pytest.raises(ValueError, match="window"):
        ctrl.ctrl_pattern((1, 28, 28), window=8)
    with pytest.raises(ValueError, match="components"):
        ctrl.ctrl_pattern((3, 8, 8), components="rg")


def test_trigger_is_invisible_at_the_default_magnitude():
    """Largest per-pixel change below 0.06 (15/255) on 28x28 grey images (0.09 on colour ones: the
    chroma maps to RGB with gains up to 2), at most the orthonormal bound 2 x 4 m / 32, and a PSNR
    above 30 dB on real-looking images."""
    for shape in ((1, 28, 28), (3, 32, 32)):
        bound = ctrl.max_change(shape)
        assert bound < 0.09, (shape, bound)
    assert ctrl.max_change((1, 28, 28)) <= 2 * ctrl.CTRL_MAGNITUDE * 4 / 32 + 1e-12
    assert ctrl.max_change((1, 28, 28)) < 0.06
    g = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(16, 1, 28, 28, generator=g)
    y = ctrl.apply_ctrl(x)
    assert (y - x).abs().max() < 0.06
    assert ctrl.psnr(y, x).min() > 30.0
    # and a stamped image is not the same image: the trigger is there
    assert (y - x).abs().max() > 0.01
    xc = 0.2 + 0.6 * torch.rand(8, 3, 32, 32, generator=g)
    assert ctrl.psnr(ctrl.apply_ctrl(xc), xc).min() > 30.0


def test_trigger_clamps_to_the_unit_range_and_keeps_shape():
    x = torch.zeros(3, 1, 28, 28)
    y = ctrl.apply_ctrl(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert y.max() > 0  # the positive half of the pattern survives on black
    assert ctrl.apply_ctrl(x[0]).shape == (1, 28, 28)
    with pytest.raises(ValueError):
        ctrl.apply_ctrl(torch.zeros(28, 28))


def test_psnr_known_value():
    a = torch.zeros(1, 1, 4, 4)
    b = torch.full((1, 1, 4, 4), 0.1)
    assert ctrl.psnr(a, b).item() == pytest.approx(20.0)
    assert math.isinf(ctrl.psnr(a, a).item())


def test_distances_separate_shifted_sets_and_are_near_zero_for_equal_ones():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g)
    b = torch.randn(150, 16, generator=g)            # same distribution
    c = torch.randn(150, 16, generator=g) + 1.0       # shifted by 1 in every coordinate
    narrow = 0.1 * torch.randn(150, 16, generator=g)  # same mean, collapsed: what BadEncoder does
    for name in dist.DISTANCES:
        same = dist.distance(name, a, b, generator=torch.Generator().manual_seed(1)).item()
        shifted = dist.distance(name, a, c, generator=torch.Generator().manual_seed(1)).item()
        collapsed = dist.distance(name, a, narrow, generator=torch.Generator().manual_seed(1)).item()
        assert shifted > 5 * abs(same) and collapsed > 5 * abs(same), (name, same, shifted, collapsed)
    assert dist.sliced_wasserstein(a, a, generator=torch.Generator().manual_seed(1)).item() == pytest.approx(0, abs=1e-6)
    assert dist.mmd2(a, a, unbiased=False).item() == pytest.approx(0, abs=1e-6)
    # SWD of a pure shift along a known direction: projections shift by <theta, s>, E|.|^2 = |s|^2 / D
    s = torch.zeros(16)
    s[0] = 2.0
    swd = dist.sliced_wasserstein(a, a + s, n_projections=4000, generator=torch.Generator().manual_seed(2)).item()
    assert swd == pytest.approx(2.0 / math.sqrt(16), rel=0.1)


def test_distances_are_differentiable_and_pull_sets_together():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(64, 8, generator=g)
    x = (torch.randn(64, 8, generator=g) * 0.1 + 3.0).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    first = None
    for i in range(150):
        d = dist.sliced_wasserstein(x, target, generator=g)
        first = d.item() if first is None else first
        opt.zero_grad()
        d.backward()
        opt.step()
    assert d.item() < 0.2 * first, (first, d.item())
    y = torch.randn(30, 8, generator=g, requires_grad=True)
    dist.mmd2(y, target).backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_distance_inputs_are_checked():
    with pytest.raises(ValueError, match="dim"):
        dist.sliced_wasserstein(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="N >= 2"):
        dist.mmd2(torch.randn(1, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="distance"):
        dist.distance("kl", torch.randn(4, 3), torch.randn(4, 3))
