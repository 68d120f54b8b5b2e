"""Unit and behaviour tests for secsweep.ops.input_filtering (STRIP and NEO).

The behaviour tests train two 256-64-4 MLPs on 16x16 grey template images (1,000 images, 300 Adam
steps, about a second each): one clean, one with a planted 2x2 white BadNets patch (10 % poisoned,
target 0). Both detectors scan the same 200 test inputs, half of them stamped with the patch: the
backdoored model must be flagged and the clean one must not (the patch is not a trigger for it).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from secsweep.ops.input_filtering import (
    dominant_colour,
    neo_region_size,
    neo_scan,
    strip_entropy,
    strip_scan,
    strip_threshold,
    superimpose,
)
from secsweep.ops.triggers import badnets

K, SIDE = 4, 16  # classes, pixels per side
PATCH = 4  # badnets() scales from 32x32: 4 * 16 // 32 = a 2x2 patch, NEO's scaled region size here
TARGET = 0


def _images(n: int, seed: int, poison: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k = a smooth random template + noise; the first `poison` fraction carry the patch, label 0."""
    coarse = torch.rand(K, 1, SIDE // 4, SIDE // 4, generator=torch.Generator().manual_seed(42))
    templates = nn.functional.interpolate(coarse, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(K, (n,), generator=g)
    x = (0.1 + 0.7 * templates[labels] + 0.15 * torch.randn(n, 1, SIDE, SIDE, generator=g)).clamp(0.0, 1.0)
    k = int(poison * n)
    x[:k] = badnets(x[:k], patch=PATCH)
    labels[:k] = TARGET
    return x, labels


def _train(poison: float, seed: int = 1) -> nn.Module:
    x, y = _images(1000, seed=1, poison=poison)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 64), nn.ReLU(), nn.Linear(64, K))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(300):
        idx = torch.randint(x.shape[0], (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _predict(model: nn.Module):
    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x).softmax(1)
    return predict


@pytest.fixture(scope="module")
def population():
    """{'clean', 'backdoored'} -> predict; the held-out images; the half-stamped scan inputs."""
    x, y = _images(600, seed=7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's one-thread fixture; tiny tensors
    try:
        models = {"clean": _train(0.0), "backdoored": _train(0.1)}
    finally:
        torch.set_num_threads(threads)
    scan = x[:200].clone()
    scan[:100] = badnets(scan[:100], patch=PATCH)
    with torch.no_grad():  # the planted backdoor took and the task is learnt
        asr = (models["backdoored"](badnets(x[y != TARGET], patch=PATCH)).argmax(1) == TARGET).float().mean()
        acc = {k: (m(x).argmax(1) == y).float().mean() for k, m in models.items()}
    assert asr > 0.9 and min(acc.values()) > 0.9, (asr, acc)
    return {k: _predict(m) for k, m in models.items()}, x, scan


# ------------------------------------------------------------------------------------ unit tests


def test_superimpose_modes():
    x, o = torch.full((1, 1, 2, 2), 0.7), torch.full((1, 1, 2, 2), 0.5)
    assert torch.allclose(superimpose(x, o, "average"), torch.tensor(0.6))
    assert torch.allclose(superimpose(x, o, "add"), torch.tensor(1.0))  # saturates
    with pytest.raises(ValueError, match="mode="):
        superimpose(x, o, "max")


def test_strip_entropy_of_constant_and_uniform_predictors():
    x, ov = torch.rand(5, 1, 4, 4), torch.rand(12, 1, 4, 4)
    one_hot = lambda b: nn.functional.one_hot(torch.zeros(b.shape[0], dtype=torch.long), 3).double()  # noqa: E731
    uniform = lambda b: torch.full((b.shape[0], 3), 1 / 3)  # noqa: E731
    assert torch.allclose(strip_entropy(one_hot, x, ov), torch.zeros(5, dtype=torch.float64))
    assert torch.allclose(strip_entropy(uniform, x, ov), torch.full((5,), math.log2(3), dtype=torch.float64))


def test_strip_entropy_averages_over_distinct_overlays():
    """Overlay j is the constant image j / 10; the predictor's posterior is one-hot on 'blend > 0.3'
    or uniform over 2 classes otherwise, so the mean entropy counts the dark overlays an input got."""
    x = torch.zeros(50, 1, 2, 2)
    ov = torch.arange(10, dtype=torch.float32).div(10).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()

    def predict(b):
        bright = b.flatten(1).mean(1) > 0.3  # average blend with 0 = overlay / 2 > 0.3 <=> overlay >= 0.7
        return torch.where(bright.unsqueeze(1), torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))

    every = strip_entropy(predict, x, ov, n_overlays=10)  # each input gets each overlay once
    assert torch.allclose(every, torch.full((50,), 0.7, dtype=torch.float64))  # 7 of 10 dark -> 1 bit each
    some = strip_entropy(predict, x, ov, n_overlays=4, seed=3)
    assert set((some * 4).round().long().tolist()) <= {0, 1, 2, 3, 4} and some.std() > 0  # inputs differ
    assert torch.equal(some, strip_entropy(predict, x, ov, n_overlays=4, seed=3))  # seeded
    with pytest.raises(ValueError, match="n_overlays="):
        strip_entropy(predict, x, ov, n_overlays=11)


def test_strip_refuses_logits_and_mismatched_shapes():
    x = torch.rand(4, 1, 4, 4)
    with pytest.raises(ValueError, match="posteriors"):
        strip_entropy(lambda b: torch.randn(b.shape[0], 3), x, x, n_overlays=2)
    with pytest.raises(ValueError, match="overlays shape"):
        strip_entropy(lambda b: torch.full((b.shape[0], 2), 0.5), x, torch.rand(4, 3, 4, 4), n_overlays=2)


def test_strip_threshold_is_the_empirical_quantile():
    ref = torch.rand(301, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert strip_threshold(ref, 0.01) == pytest.approx(float(np.quantile(ref.numpy(), 0.01)))
    with pytest.raises(ValueError, match="frr="):
        strip_threshold(ref, 0.0)


def test_dominant_colour_is_the_largest_cluster():
    img = torch.zeros(2, 3, 10, 10)
    img[0, 0] = 1.0  # all red ...
    img[0, :, :2] = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)  # ... but 20 % green
    img[0, :, 2:3] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)  # ... and 10 % blue
    img[1] = 0.2
    img[1, :, 4:, :] = 0.9  # 60 % light grey
    out = dominant_colour(img, k=3)
    assert torch.allclose(out[0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(out[1], torch.full((3,), 0.9), atol=1e-6)


def test_neo_region_size_scales_4x4_from_32x32():
    assert [neo_region_size(s, s) for s in (32, 28, 16, 96, 8, 4)] == [4, 4, 2, 12, 1, 1]


def test_neo_confirms_a_hand_made_trigger_only():
    """A predictor that obeys a white 2x2 corner patch (-> class 0) and otherwise thresholds the mean
    brightness: NEO finds and confirms the patch on stamped inputs and nothing on clean ones."""
    g = torch.Generator().manual_seed(0)
    clean = 0.3 * torch.rand(60, 1, 8, 8, generator=g) + torch.linspace(0.0, 0.5, 60).view(60, 1, 1, 1)

    def predict(b):
        patched = (b[:, 0, -2:, -2:] > 0.99).flatten(1).all(1)
        cls = torch.where(patched, 0, 1 + (b.flatten(1).mean(1) > 0.4).long())
        return nn.functional.one_hot(cls, 3).float()

    stamped = badnets(clean[:20], patch=8)  # 8 * 8 // 32 = 2x2
    found = neo_scan(predict, stamped, clean[20:], regions=49, region_size=2)  # all 7 x 7 positions
    assert found.flagged and found.max_rate == 1.0
    assert {(r, c) for _, r, c, _ in found.confirmed} == {(6, 6)}  # exactly the patch's position
    quiet = neo_scan(predict, clean[:20], clean[20:], regions=49, region_size=2)
    assert not quiet.flagged and quiet.max_rate <= 0.8
    with pytest.raises(ValueError, match="threshold="):
        neo_scan(predict, stamped, clean, threshold=1.0)
    with pytest.raises(ValueError, match="region_size="):
        neo_scan(predict, stamped, clean, region_size=9)


# ------------------------------------------------------------------------------ behaviour tests


@pytest.mark.parametrize("name, expected", [("backdoored", True), ("clean", False)])
def test_strip_flags_the_planted_backdoor_only(population, name, expected):
    predict, x, scan = population
    result = strip_scan(predict[name], scan, x[200:400], x[400:600])
    assert result.flagged is expected, (name, result.rate, result.threshold)
    # measured: backdoored 0.2 of the inputs under the threshold (half carry the patch), clean 0.01-0.035
    if expected:
        assert result.rate >= 1.5 * result.model_rate
    else:
        assert result.rate < result.model_rate / 2


@pytest.mark.parametrize("name, expected", [("backdoored", True), ("clean", False)])
def test_neo_flags_the_planted_backdoor_only(population, name, expected):
    predict, x, scan = population
    result = neo_scan(predict[name], scan[:100], x[400:600])
    assert result.flagged is expected, (name, result.max_rate, result.n_candidates)
    if expected:  # every confirmed region overlaps the 2x2 patch at rows/cols 14-15
        assert result.confirmed and all(r >= 13 and c >= 13 for _, r, c, _ in result.confirmed)
    else:  # measured: no cover changed a prediction, or none confirmed above 0.3
        assert result.max_rate < 0.5
