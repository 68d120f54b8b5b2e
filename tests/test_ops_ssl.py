"""Unit tests for secsweep.ops.ssl: batched SimCLR views, RandAugment, the kNN monitor, the linear probe."""

from __future__ import annotations

import math

import pytest
import torch

from secsweep.ops.ssl import (
    ProbeResult,
    augment,
    knn_accuracy,
    knn_predict,
    knn_scores,
    linear_probe,
    rand_augment,
    two_views,
)


def _images(c: int, n: int = 16, side: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("c", [1, 3])
def test_two_views_shape_range_and_changes_image(c):
    x = _images(c)
    v1, v2 = two_views(x, torch.Generator().manual_seed(0), blur=True)
    for v in (v1, v2):
        assert v.shape == x.shape and v.dtype == x.dtype
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
        assert (v - x).abs().mean() > 0.05  # a view is not the image
    assert (v1 - v2).abs().mean() > 0.05    # and the two views differ


@pytest.mark.parametrize("c", [1, 3])
def test_two_views_deterministic_per_seed(c):
    x = _images(c)
    a = two_views(x, torch.Generator().manual_seed(1))
    b = two_views(x, torch.Generator().manual_seed(1))
    d = two_views(x, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], d[0])


def test_augment_without_randomness_is_identity_and_flip_mirrors():
    """Full-size square crop, no jitter: the view is the image, or its mirror when flipped; this
    pins the crop geometry of affine_grid (a wrong scale/offset would not reproduce the pixels)."""
    x = _images(3, n=32)
    off = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter=0.0, grayscale_p=0.0)
    same = augment(x, torch.Generator().manual_seed(0), flip=False, **off)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    flipped = augment(x, torch.Generator().manual_seed(0), flip=True, **off)
    is_x = (flipped - x).abs().flatten(1).amax(1) < 1e-5
    is_mirror = (flipped - x.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert bool((is_x | is_mirror).all()) and 0 < int(is_mirror.sum()) < 32


def test_augment_small_crop_zooms_in():
    """A crop of at most 1/4 of the area magnifies: neighbouring pixels of the view are more alike
    than those of the (noise) image."""
    x = _images(1, n=8, side=32)
    v = augment(x, torch.Generator().manual_seed(0), crop_scale=(0.1, 0.25), flip=False, jitter=0.0)
    tv = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean()  # noqa: E731
    assert tv(v) < 0.6 * tv(x)


def test_grayscale_p1_makes_rgb_views_gray():
    v = augment(_images(3), torch.Generator().manual_seed(0), grayscale_p=1.0)
    torch.testing.assert_close(v[:, 0], v[:, 1])
    torch.testing.assert_close(v[:, 1], v[:, 2])


def test_augment_refuses_bad_input():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="x shape"):
        augment(torch.rand(2, 2, 8, 8), g)
    with pytest.raises(ValueError, match="crop_scale"):
        augment(torch.rand(2, 1, 8, 8), g, crop_scale=(0.5, 0.2))


@pytest.mark.parametrize("c", [1, 3])
def test_rand_augment_per_sample_seeded_and_leaves_global_rng(c):
    x = _images(c, n=8)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = rand_augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)  # the caller's global RNG is untouched
    b = rand_augment(x, torch.Generator().manual_seed(0))
    d = rand_augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, d)
    # at magnitude 14 of 30 most images change, and not all in the same way
    changed = (a - x).abs().flatten(1).amax(1) > 1 / 255
    assert int(changed.sum()) >= 4


def test_rand_augment_magnitude_zero_identity_ops_only_quantises():
    """num_ops=0 applies nothing: the output is x quantised to 1/255 steps."""
    x = _images(3, n=4)
    out = rand_augment(x, torch.Generator().manual_seed(0), num_ops=0)
    torch.testing.assert_close(out, (x * 255).round() / 255)


def _clusters(n_per: int, k: int, d: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 5
    labels = torch.arange(k).repeat_interleave(n_per)
    return centres[labels] + spread * torch.randn(len(labels), d, generator=g), labels


def test_knn_separable_clusters_is_perfect_and_shuffled_labels_chance():
    train, ytr = _clusters(50, 4, 8, 0.3, seed=0)
    test, yte = _clusters(50, 4, 8, 0.3, seed=0)
    test = test + 0.05 * torch.randn(test.shape, generator=torch.Generator().manual_seed(9))
    assert knn_accuracy(train, ytr, test, yte, k=20, temperature=0.1) == 1.0
    # labels independent of the features (each sample shuffled to a random label): chance, 1/4.
    # (Cluster-wise structure would make this coarse: every point of a cluster gets the same vote.)
    g = torch.Generator().manual_seed(3)
    noise_tr, noise_te = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    rand_tr, rand_te = torch.randint(4, (400,), generator=g), torch.randint(4, (400,), generator=g)
    assert abs(knn_accuracy(noise_tr, rand_tr, noise_te, rand_te, k=20, temperature=0.1) - 0.25) < 0.08


def test_knn_scores_formula():
    """Hand-computed: query along e1; bank at 0 and 60 degrees (class 0, 1) and 180 (class 1); k=2."""
    bank = torch.tensor([[2.0, 0.0], [0.5, math.sqrt(3) / 2], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    s = knn_scores(torch.tensor([[3.0, 0.0]]), bank, labels, 2, k=2, temperature=0.5)
    torch.testing.assert_close(s, torch.tensor([[math.exp(1 / 0.5), math.exp(0.5 / 0.5)]]))
    # k larger than the bank is capped: all three vote; a large weight on class 1 can win
    s3 = knn_scores(torch.tensor([[3.0, 0.0]]), bank, labels, 2, k=500, temperature=0.5)
    assert s3[0, 1] == pytest.approx(math.exp(1.0) + math.exp(-2.0))
    pred = knn_predict(torch.tensor([[0.6, 0.8]]), bank, labels, 2, k=1)
    assert pred.tolist() == [1]


def test_linear_probe_separates_and_depends_on_data():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 3, generator=g)
    x = torch.randn(1400, 16, generator=g) * 10 + 3  # unstandardised scale and offset
    y = (x @ w).argmax(1)
    res = linear_probe(x[:1000], y[:1000], x[1000:1200], y[1000:1200], val_feats=x[1200:], val_labels=y[1200:],
                       seed=0)
    assert isinstance(res, ProbeResult)
    assert res.test_acc > 0.9 and res.val_acc > 0.9 and res.train_acc > 0.9
    # the head acts on raw features (standardisation folded in)
    assert (res.head(x[1000:1200]).argmax(1) == y[1000:1200]).float().mean().item() == pytest.approx(res.test_acc)
    # labels unrelated to the features: near chance on test
    y_rand = torch.randint(3, (1400,), generator=g)
    bad = linear_probe(x[:1000], y_rand[:1000], x[1000:1200], y_rand[1000:1200], epochs=20, seed=0)
    assert bad.val_acc is None and bad.test_acc < 0.5


def test_linear_probe_deterministic_given_seed():
    x, y = _clusters(40, 3, 6, 3.0, seed=1)
    a = linear_probe(x, y, x, y, epochs=5, seed=0)
    b = linear_probe(x, y, x, y, epochs=5, seed=0)
    c = linear_probe(x, y, x, y, epochs=5, seed=1)
    assert torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_linear_probe_refuses_bad_input():
    x, y = _clusters(10, 2, 4, 1.0, seed=0)
    with pytest.raises(ValueError, match="val_feats/val_labels"):
        linear_probe(x, y, x, y, val_feats=x)
    with pytest.raises(ValueError, match="test_feats dim"):
        linear_probe(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="train_labels dtype"):
        linear_probe(x, y.float(), x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_views_same_on_cuda_as_on_cpu():
    x = _images(3)
    cpu = two_views(x, torch.Generator().manual_seed(0), blur=True)
    gpu = two_views(x.cuda(), torch.Generator().manual_seed(0), blur=True)
    for a, b in zip(cpu, gpu):
        assert b.is_cuda
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)
