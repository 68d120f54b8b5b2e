"""Unit tests for secsweep.ops.neural_cleanse: MAD anomaly index, stamping, and a tiny end-to-end
reverse-engineering run on a model trained with a 2x2 BadNets patch (8x8 images, 3 classes)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from secsweep.ops.neural_cleanse import anomaly_index, flagged_classes, reverse_engineer_trigger, stamp
from secsweep.ops.triggers import badnets

N_CLASSES = 3
SIDE = 8  # image side in pixels
PATCH = 8  # badnets() scales its patch from 32x32: round(8 * 8 / 32) = a 2x2 patch here
TARGET = 0  # backdoor target class




def _images(n: int, seed: int, poison: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k = a fixed random 8x8 template + noise; the first `poison` fraction carry the patch, label 0."""
    templates = torch.rand(N_CLASSES, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(42))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(N_CLASSES, (n,), generator=g)
    x = (0.2 + 0.6 * templates[labels] + 0.1 * torch.randn(n, 1, SIDE, SIDE, generator=g)).clamp(0.0, 1.0)
    n_poison = int(poison * n)
    x[:n_poison] = badnets(x[:n_poison], patch=PATCH)
    labels[:n_poison] = TARGET
    return x, labels


@pytest.fixture(scope="module")
def backdoored() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 64-32-3 MLP trained 300 Adam steps on 600 images, 20 % poisoned; plus clean test images."""
    x, y = _images(600, seed=0, poison=0.2)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 32), nn.ReLU(), nn.Linear(32, N_CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        idx = torch.randint(x.shape[0], (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    x_test, y_test = _images(300, seed=100, poison=0.0)
    return model, x_test, y_test


def test_anomaly_index_flags_only_the_small_outlier():
    norms = [20.0, 22.0, 19.0, 21.0, 3.0, 20.5, 23.0, 18.0, 21.5, 60.0]  # class 4 small, class 9 large
    index = anomaly_index(norms)
    # median 20.75, MAD 1.5 -> index of class 4 = 17.75 / (1.4826 * 1.5)
    assert index[4].item() == pytest.approx(17.75 / (1.4826 * 1.5))
    assert index[9] > 2.0  # a large outlier has a large index ...
    assert flagged_classes(norms) == [4]  # ... but only small norms are flagged
    assert flagged_classes(norms, threshold=20.0) == []


def test_anomaly_index_with_zero_mad():
    index = anomaly_index([5.0, 5.0, 5.0, 1.0])
    assert index[:3].tolist() == [0.0, 0.0, 0.0] and math.isinf(index[3].item())
    assert flagged_classes([5.0, 5.0, 5.0, 1.0]) == [3]


def test_stamp_blends_mask_and_pattern():
    images = torch.full((2, 3, 4, 4), 0.2)
    mask = torch.zeros(1, 4, 4)
    mask[0, 0, 0], mask[0, 1, 1] = 1.0, 0.5
    pattern = torch.full((3, 4, 4), 0.8)
    out = stamp(images, mask, pattern)
    assert out.shape == images.shape
    assert torch.allclose(out[:, :, 0, 0], torch.tensor(0.8))
    assert torch.allclose(out[:, :, 1, 1], torch.tensor(0.5))  # 0.5 * 0.2 + 0.5 * 0.8
    assert torch.allclose(out[:, :, 2, 2], torch.tensor(0.2))
    assert torch.equal(stamp(images[0], mask[0], pattern), out[0])  # (C, H, W) and (H, W) also work
    assert torch.equal(images, torch.full((2, 3, 4, 4), 0.2))  # input untouched


def test_reverse_engineering_finds_the_backdoor_target(backdoored):
    model, x_test, y_test = backdoored
    with torch.no_grad():
        assert (model(x_test).argmax(1) == y_test).float().mean() > 0.9  # clean accuracy
        assert (model(badnets(x_test, patch=PATCH)).argmax(1) == TARGET).float().mean() > 0.9  # ASR
    before = [p.requires_grad for p in model.parameters()]
    model.train()
    norms = []
    for label in range(N_CLASSES):
        mask, pattern, l1, asr = reverse_engineer_trigger(model, x_test[:64], label, steps=200, seed=0)
        assert mask.shape == (1, SIDE, SIDE) and pattern.shape == (1, SIDE, SIDE)
        assert 0.0 <= float(mask.min()) and float(mask.max()) <= 1.0
        assert 0.0 <= float(pattern.min()) and float(pattern.max()) <= 1.0
        assert l1 == pytest.approx(float(mask.sum()))
        assert asr > 0.9
        norms.append(l1)
    assert model.training and [p.requires_grad for p in model.parameters()] == before
    assert min(range(N_CLASSES), key=norms.__getitem__) == TARGET
    assert norms[TARGET] < 0.5 * min(norms[1:])
    if anomaly_index(norms)[TARGET] > 2.0:
        assert flagged_classes(norms) == [TARGET]


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x: reverse_engineer_trigger(m, x[0], 0),
        lambda m, x: reverse_engineer_trigger(m, x, 3),
        lambda m, x: reverse_engineer_trigger(m, x, -1),
        lambda m, x: reverse_engineer_trigger(m, x, 0, steps=0),
        lambda m, x: reverse_engineer_trigger(m, x, 0, lr=0.0),
        lambda m, x: reverse_engineer_trigger(m, x, 0, init_cost=-1.0),
        lambda m, x: reverse_engineer_trigger(m, x, 0, cost_multiplier=1.0),
        lambda m, x: reverse_engineer_trigger(m, x, 0, asr_threshold=0.0),
        lambda m, x: stamp(x, torch.zeros(2, SIDE, SIDE), torch.zeros(1, SIDE, SIDE)),
        lambda m, x: stamp(x, torch.zeros(1, SIDE, SIDE), torch.zeros(1, 4, 4)),
        lambda m, x: anomaly_index([1.0]),
        lambda m, x: anomaly_index([1.0, math.nan]),
        lambda m, x: flagged_classes([1.0, 2.0, 3.0], threshold=0.0),
    ],
)
def test_bad_arguments_raise_value_error(call, backdoored):
    model, x_test, _ = backdoored
    grads = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError):
        call(model, x_test[:8])
    assert [p.requires_grad for p in model.parameters()] == grads  # restored even on error
