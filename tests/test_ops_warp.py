"""WaNet warping trigger (secsweep.ops.warp)."""

from __future__ import annotations

import pytest
import torch

from secsweep.ops.warp import (
    CROSS_RATIO,
    identity_grid,
    make_warp_field,
    noise_grid,
    warp,
    warp_control_points,
)

H = W = 32




def _displacement_px(grid: torch.Tensor) -> torch.Tensor:
    """Displacement of a grid from the identity, in pixels, (N, H, W, 2) in (x, y) order."""
    h, w = grid.shape[1:3]
    px_per_unit = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0])
    return (grid - identity_grid(h, w)) * px_per_unit


def test_identity_grid_returns_input():
    x = torch.rand(3, 3, 28, 30, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(warp(x, identity_grid(28, 30)), x, atol=1e-5)
    assert torch.allclose(warp(x[0], identity_grid(28, 30)), x[0], atol=1e-5)  # (C, H, W) input


def test_field_shape_range_and_determinism():
    g = make_warp_field(H, W, seed=3)
    assert g.shape == (1, H, W, 2)
    assert g.min() >= -1.0 and g.max() <= 1.0
    assert torch.equal(g, make_warp_field(H, W, seed=3))
    assert not torch.equal(g, make_warp_field(H, W, seed=4))
    ctrl = warp_control_points(seed=3)
    assert ctrl.shape == (1, 2, 4, 4)
    assert ctrl.abs().mean().item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_displacement_is_bounded_in_pixels(seed):
    s = 0.5
    disp = _displacement_px(make_warp_field(H, W, s=s, seed=seed)).abs()
    # |displacement| <= s * max|control| * (bicubic gain <= 1.375**2) * (H-1) / (2H) pixels.
    bound = s * warp_control_points(seed=seed).abs().max().item() * 1.375**2 * (H - 1) / (2 * H)
    assert disp.max().item() <= bound + 1e-5
    assert disp.max().item() < 1.0  # WaNet default: a sub-pixel warp
    assert disp.mean().item() > 0.05  # but not the identity


def test_displacement_scales_with_s():
    small = _displacement_px(make_warp_field(H, W, s=0.25, seed=0))[:, 1:-1, 1:-1]
    big = _displacement_px(make_warp_field(H, W, s=0.5, seed=0))[:, 1:-1, 1:-1]
    assert torch.allclose(big, 2 * small, atol=1e-4)  # away from the clamped border rows


def test_warp_field_is_smooth_but_noise_grid_is_not():
    g = make_warp_field(H, W, seed=0)
    d = _displacement_px(g)[:, 1:-1, 1:-1]  # the outermost pixels are clamped to the border
    step = max((d[:, 1:] - d[:, :-1]).abs().max().item(), (d[:, :, 1:] - d[:, :, :-1]).abs().max().item())
    assert step < 0.2  # pixels of displacement change between neighbouring pixels
    dn = _displacement_px(noise_grid(g, 2, torch.Generator().manual_seed(0)))[:, 1:-1, 1:-1]
    assert (dn[:, 1:] - dn[:, :-1]).abs().max().item() > 3 * step


def test_warp_small_on_smooth_image_visible_on_checkerboard():
    g = make_warp_field(H, W, seed=0)
    ramp = torch.linspace(0, 1, W).expand(1, 1, H, W).clone()
    assert (warp(ramp, g) - ramp)[..., 1:-1, 1:-1].abs().max().item() < 0.05
    assert (warp(ramp, g) - ramp).abs().max().item() < 0.3
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    checker = ((ii + jj) % 2).float().expand(1, 3, H, W)
    out = warp(checker, g)
    assert out.min() >= 0 and out.max() <= 1
    assert (out - checker).abs().mean().item() > 0.1


def test_warp_broadcasts_and_accepts_per_sample_grids():
    x = torch.rand(4, 1, H, W, generator=torch.Generator().manual_seed(1))
    g = make_warp_field(H, W)
    out = warp(x, g)
    assert out.shape == x.shape
    assert torch.allclose(out[2], warp(x[2:3], g)[0])
    grids = noise_grid(g, 4, torch.Generator().manual_seed(0))
    assert warp(x, grids).shape == x.shape
    with pytest.raises(ValueError, match="grid.shape"):
        warp(x, make_warp_field(28, 28))


def test_noise_grid_differs_and_stays_in_range():
    assert CROSS_RATIO == 2
    g = make_warp_field(H, W, seed=0)
    n = noise_grid(g, 3, torch.Generator().manual_seed(0))
    assert n.shape == (3, H, W, 2)
    assert n.min() >= -1.0 and n.max() <= 1.0
    assert not torch.allclose(n[0], g[0]) and not torch.allclose(n[0], n[1])
    jitter_px = (_displacement_px(n) - _displacement_px(g)).abs()
    assert jitter_px.max().item() <= (H - 1) / (2 * H) + 1e-5  # <= 1/H normalised, about half a pixel
    assert torch.equal(n, noise_grid(g, 3, torch.Generator().manual_seed(0)))
    assert torch.equal(noise_grid(g, 2, scale=0.0), g.expand(2, H, W, 2))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: make_warp_field(32, 32, k=1), "k=1"),
        (lambda: make_warp_field(32, 32, s=-0.1), "s=-0.1"),
        (lambda: make_warp_field(1, 32), "height, width"),
        (lambda: make_warp_field(32, 32, grid_rescale=0.0), "grid_rescale=0.0"),
        (lambda: noise_grid(make_warp_field(8, 8), -1), "n=-1"),
    ],
)
def test_bad_arguments_raise(call, name):
    with pytest.raises(ValueError, match=name):
        call()
