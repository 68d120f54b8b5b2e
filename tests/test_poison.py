"""secsweep.poison: which samples are poisoned, relabelling, and the triggered test set."""

from __future__ import annotations

import pytest
import torch

from secsweep.ops.triggers import badnets
from secsweep.poison import PoisonedSet, choose_poison_indices, poison, triggered_test_set

torch.set_num_threads(1)

N = 200
TARGET = 0


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(N, 1, 8, 8, generator=g) * 0.5  # < 1 so the white patch is visible
    labels = torch.arange(N) % 10
    return images, labels


def _plus_one(x: torch.Tensor) -> torch.Tensor:
    return x + 1.0


# ----------------------------------------------------------------------------- choose_poison_indices


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.25, 0.5, 0.99])
def test_indices_count_unique_sorted(ratio):
    labels = torch.arange(N) % 10
    idx = choose_poison_indices(labels, ratio, TARGET, seed=3)
    assert len(idx) == round(ratio * N)
    assert len(torch.unique(idx)) == len(idx)
    assert torch.equal(idx, idx.sort().values)
    assert int(idx.min()) >= 0 and int(idx.max()) < N


def test_indices_deterministic_by_seed():
    labels = torch.arange(N) % 10
    a = choose_poison_indices(labels, 0.1, TARGET, seed=5)
    b = choose_poison_indices(labels, 0.1, TARGET, seed=5)
    c = choose_poison_indices(labels, 0.1, TARGET, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_indices_default_draws_from_whole_set_including_target():
    labels = torch.arange(N) % 10
    idx = choose_poison_indices(labels, 0.5, TARGET, seed=0)
    assert (labels[idx] == TARGET).any()


def test_exclude_target():
    labels = torch.arange(N) % 10
    idx = choose_poison_indices(labels, 0.5, TARGET, seed=0, exclude_target=True)
    assert len(idx) == 100
    assert not (labels[idx] == TARGET).any()
    # fewer non-target samples than requested: capped at the pool
    idx = choose_poison_indices(labels, 0.95, TARGET, seed=0, exclude_target=True)
    assert len(idx) == 180 and not (labels[idx] == TARGET).any()


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_unit_raises(ratio):
    with pytest.raises(ValueError, match="poison_ratio"):
        choose_poison_indices(torch.arange(10), ratio, TARGET)


# ----------------------------------------------------------------------------- poison


def test_poison_relabels_and_triggers_exactly_the_chosen(data):
    images, labels = data
    img0, lab0 = images.clone(), labels.clone()
    ps = poison(images, labels, badnets, ratio=0.1, target=TARGET, seed=4)
    idx = choose_poison_indices(labels, 0.1, TARGET, seed=4)
    assert isinstance(ps, PoisonedSet) and len(ps) == N

    # inputs untouched
    assert torch.equal(images, img0) and torch.equal(labels, lab0)

    # mask and indices
    assert ps.poisoned.dtype == torch.bool
    assert int(ps.poisoned.sum()) == 20
    assert torch.equal(ps.indices, idx)

    # labels: poisoned -> target, others unchanged; true_labels are the originals
    assert torch.all(ps.labels[idx] == TARGET)
    assert torch.equal(ps.labels[~ps.poisoned], labels[~ps.poisoned])
    assert torch.equal(ps.true_labels, labels)

    # images: trigger applied to the poisoned, others bit-identical
    assert torch.equal(ps.images[idx], badnets(images[idx]))
    assert torch.equal(ps.images[~ps.poisoned], images[~ps.poisoned])
    assert not torch.equal(ps.images[idx], images[idx])


def test_poison_outputs_do_not_alias_inputs(data):
    images, labels = data
    ps = poison(images, labels, _plus_one, ratio=0.1, target=TARGET)
    ps.images.zero_()
    ps.labels.fill_(9)
    ps.true_labels.fill_(9)
    assert float(images.abs().sum()) > 0
    assert torch.equal(labels, torch.arange(N) % 10)


def test_poison_batches_give_same_result(data):
    images, labels = data
    a = poison(images, labels, _plus_one, ratio=0.3, target=3, seed=1)
    b = poison(images, labels, _plus_one, ratio=0.3, target=3, seed=1, batch_size=7)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.poisoned, b.poisoned)
    # the generic trigger was applied exactly once to exactly the poisoned samples
    assert torch.equal(a.images[a.poisoned], images[a.poisoned] + 1.0)
    assert torch.equal(a.images[~a.poisoned], images[~a.poisoned])


def test_poison_exclude_target_keeps_target_class_clean(data):
    images, labels = data
    ps = poison(images, labels, _plus_one, ratio=0.2, target=TARGET, exclude_target=True)
    assert not (ps.true_labels[ps.poisoned] == TARGET).any()
    assert torch.equal(ps.images[labels == TARGET], images[labels == TARGET])


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5])
def test_poison_ratio_outside_open_unit_raises(data, ratio):
    images, labels = data
    with pytest.raises(ValueError, match="poison_ratio"):
        poison(images, labels, badnets, ratio=ratio, target=TARGET)


# ----------------------------------------------------------------------------- triggered_test_set


def test_triggered_test_set_drops_target_class(data):
    images, labels = data
    img0 = images.clone()
    x, y = triggered_test_set(images, labels, _plus_one, TARGET)
    keep = labels != TARGET
    assert len(x) == len(y) == int(keep.sum()) == 180
    assert not (y == TARGET).any()
    assert torch.equal(y, labels[keep])
    assert torch.equal(x, images[keep] + 1.0)
    assert torch.equal(images, img0)


def test_triggered_test_set_include_target_class(data):
    images, labels = data
    x, y = triggered_test_set(images, labels, _plus_one, TARGET, include_target_class=True, batch_size=16)
    assert len(x) == N
    assert torch.equal(y, labels)
    assert torch.equal(x, images + 1.0)


def test_triggered_test_set_of_only_target_class_is_empty():
    images = torch.rand(5, 1, 4, 4)
    labels = torch.zeros(5, dtype=torch.long)
    x, y = triggered_test_set(images, labels, _plus_one, TARGET)
    assert len(x) == 0 and len(y) == 0
