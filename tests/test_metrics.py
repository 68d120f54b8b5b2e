"""secsweep.ops.metrics: accuracy, attack success rate and the defense effectiveness rating."""

from __future__ import annotations

import math

import pytest
import torch

from secsweep.ops.metrics import accuracy, asr_mask, attack_success_rate, der

torch.set_num_threads(1)


def test_accuracy_counts_matches():
    pred = torch.tensor([0, 1, 2, 3])
    labels = torch.tensor([0, 1, 0, 0])
    assert accuracy(pred, labels) == pytest.approx(0.5)
    assert accuracy(labels, labels) == 1.0
    assert accuracy(labels + 1, labels) == 0.0


def test_accuracy_of_empty_set_is_zero():
    empty = torch.tensor([], dtype=torch.long)
    assert accuracy(empty, empty) == 0.0


def test_asr_excludes_target_class_by_default():
    target = 0
    labels = torch.tensor([0, 0, 1, 2, 3, 4])
    pred = torch.tensor([0, 0, 0, 2, 3, 4])  # only the target-class samples and one other hit the target
    # default: only labels 1..4 count -> 1 hit of 4
    assert attack_success_rate(pred, labels, target) == pytest.approx(0.25)
    # included: 3 hits of 6
    assert attack_success_rate(pred, labels, target, include_target_class=True) == pytest.approx(0.5)


def test_asr_counts_predictions_equal_to_target_not_true_label():
    labels = torch.tensor([1, 2, 3, 4])
    assert attack_success_rate(labels.clone(), labels, target=0) == 0.0  # correct but not the target
    assert attack_success_rate(torch.full((4,), 7), labels, target=7) == 1.0


def test_asr_over_no_counted_sample_is_nan_not_zero():
    labels = torch.tensor([5, 5, 5])
    pred = torch.tensor([5, 5, 5])
    assert math.isnan(attack_success_rate(pred, labels, target=5))  # only target-class samples: none counts
    assert attack_success_rate(pred, labels, target=5, include_target_class=True) == 1.0
    empty = torch.empty(0, dtype=torch.long)
    assert math.isnan(attack_success_rate(empty, empty, target=0, include_target_class=True))


def test_asr_mask():
    labels = torch.tensor([0, 1, 0, 2])
    assert asr_mask(labels, 0).tolist() == [False, True, False, True]
    assert asr_mask(labels, 0, include_target_class=True).tolist() == [True] * 4
    assert asr_mask(labels, 0).dtype == torch.bool


@pytest.mark.parametrize(
    "asr_before, asr_after, acc_before, acc_after, expected",
    [
        (1.0, 0.0, 0.9, 0.9, 1.0),    # backdoor removed, no accuracy lost
        (0.9, 0.9, 0.9, 0.9, 0.5),    # nothing changed
        (1.0, 0.0, 0.9, 0.95, 1.0),   # accuracy gain is not rewarded beyond 1
        (0.2, 0.6, 0.9, 0.9, 0.5),    # ASR increase is not penalised below 0.5
        (0.9, 0.1, 0.9, 0.8, 0.85),   # (0.8 - 0.1 + 1) / 2
        (0.5, 0.5, 0.9, 0.3, 0.2),    # (0 - 0.6 + 1) / 2
        (0.0, 0.0, 1.0, 0.0, 0.0),    # worst case: accuracy destroyed
    ],
)
def test_der_hand_computed(asr_before, asr_after, acc_before, acc_after, expected):
    assert der(asr_before, asr_after, acc_before, acc_after) == pytest.approx(expected)


def test_der_argument_order_matters():
    # swapping asr and acc drops must change the value: 0.8 asr drop / 0.1 acc drop vs the reverse
    assert der(0.9, 0.1, 0.9, 0.8) == pytest.approx(0.85)
    assert der(0.9, 0.8, 0.9, 0.1) == pytest.approx((0.1 - 0.8 + 1) / 2)
