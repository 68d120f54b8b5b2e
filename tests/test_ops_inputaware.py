"""Input-Aware Dynamic Backdoor ops (secsweep.ops.inputaware)."""

from __future__ import annotations

import pytest
import torch

from secsweep.ops.inputaware import (
    CROSS_RATIO,
    LAMBDA_DIV,
    LAMBDA_NORM,
    MASK_DENSITY,
    MASK_PRETRAIN_EPOCHS,
    MaskGenerator,
    TriggerGenerator,
    apply_inputaware,
    diversity_loss,
    mask_norm_loss,
)

TINY = (4, 8)  # channel widths small enough for fast CPU tests




def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_constants_are_paper_defaults():
    assert (LAMBDA_DIV, LAMBDA_NORM, MASK_DENSITY, CROSS_RATIO, MASK_PRETRAIN_EPOCHS) == (1.0, 100.0, 0.032, 1, 25)


@pytest.mark.parametrize("c, h, w", [(1, 28, 28), (3, 32, 32), (3, 30, 27)])
def test_generators_keep_size_and_range(c, h, w):
    torch.manual_seed(0)
    x = _rand(2, c, h, w)
    for gen, out_c in ((TriggerGenerator(c, TINY), c), (MaskGenerator(c, TINY), 1)):
        out = gen(x)
        assert out.shape == (2, out_c, h, w)
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_default_widths_run_on_cifar_size():
    torch.manual_seed(0)
    out = TriggerGenerator(3).eval()(_rand(1, 3, 32, 32))
    assert out.shape == (1, 3, 32, 32)


def test_diversity_training_gives_input_specific_triggers():
    torch.manual_seed(0)
    gen = TriggerGenerator(3, TINY)
    x = _rand(8, 3, 16, 16)
    x1, x2 = x[:4], x[4:]
    with torch.no_grad():
        diff_before = (gen(x1) - gen(x2)).abs().mean().item()
    losses = []
    for _ in range(5):  # signed-gradient steps (torch.optim's first import costs ~2 s)
        loss = LAMBDA_DIV * diversity_loss(x1, x2, gen(x1), gen(x2))
        grads = torch.autograd.grad(loss, list(gen.parameters()))
        with torch.no_grad():
            for p, g in zip(gen.parameters(), grads):
                p -= 1e-2 * g.sign()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        p1, p2 = gen(x1), gen(x2)
    diff_after = (p1 - p2).abs().mean().item()
    assert diff_after > 0.1 and diff_after > diff_before  # each input gets its own trigger


def test_apply_inputaware_mask_extremes():
    x, pattern = _rand(2, 3, 8, 8, seed=1), _rand(2, 3, 8, 8, seed=2)
    zeros, ones = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    assert torch.equal(apply_inputaware(x, pattern, zeros), x)
    assert torch.equal(apply_inputaware(x, pattern, ones), pattern)
    half = apply_inputaware(x, pattern, 0.5 * ones)
    assert torch.allclose(half, (x + pattern) / 2)


def test_diversity_loss_value_and_monotonicity():
    x1, x2 = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)  # ||x1 - x2|| = 2 per sample
    p1 = torch.zeros(2, 1, 2, 2)
    near, far = torch.full_like(p1, 0.1), torch.full_like(p1, 0.5)  # ||dp|| = 0.2 and 1.0
    assert diversity_loss(x1, x2, p1, far, eps=0.0).item() == pytest.approx(2.0)
    assert diversity_loss(x1, x2, p1, far) < diversity_loss(x1, x2, p1, near)
    assert torch.isfinite(diversity_loss(x1, x2, p1, p1))  # identical patterns: eps avoids 0-division


def test_mask_norm_loss():
    sparse = torch.full((2, 1, 4, 4), 0.02)
    assert mask_norm_loss(sparse).item() == 0.0
    assert mask_norm_loss(torch.ones(2, 1, 4, 4)).item() == pytest.approx(1 - MASK_DENSITY)
    spot = torch.zeros(1, 1, 10, 10)
    spot[..., 0, :3] = 1.0  # mean 0.03 < density, but 3 pixels far above it
    assert mask_norm_loss(spot, per_pixel=False).item() == 0.0
    assert mask_norm_loss(spot).item() == pytest.approx(3 * (1 - MASK_DENSITY) / 100)
    assert mask_norm_loss(torch.full((1, 1, 4, 4), 0.5), per_pixel=False).item() == pytest.approx(0.5 - MASK_DENSITY)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: TriggerGenerator(0), "in_channels=0"),
        (lambda: MaskGenerator(3, ()), "widths=()"),
        (lambda: TriggerGenerator(3, TINY)(torch.zeros(1, 1, 8, 8)), "x.shape"),
        (lambda: mask_norm_loss(torch.zeros(1), density=1.5), "density=1.5"),
        (lambda: diversity_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 3), torch.zeros(3, 3)), "shapes"),
    ],
)
def test_bad_arguments_raise(call, name):
    with pytest.raises(ValueError, match=name.replace("(", r"\(").replace(")", r"\)")):
        call()
