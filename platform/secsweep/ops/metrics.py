"""Metric definitions shared by every trainable (METHODS.md §2)."""

from __future__ import annotations

import torch


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions equal to the labels (0.0 for an empty set)."""
    if pred.numel() == 0:
        return 0.0
    return (pred == labels).float().mean().item()


def asr_mask(labels: torch.Tensor, target: int, include_target_class: bool = False) -> torch.Tensor:
    """Which test samples count for the attack success rate.

    By default samples whose true label already is the target are left out: for them the backdoor
    behaviour cannot be told apart from correct classification (BackdoorBench's convention).
    """
    if include_target_class:
        return torch.ones_like(labels, dtype=torch.bool)
    return labels != target


def attack_success_rate(
    pred_triggered: torch.Tensor, labels: torch.Tensor, target: int, include_target_class: bool = False
) -> float:
    """ASR = #{f(t(x)) = target} / #counted, over triggered test inputs (METHODS.md §2)."""
    keep = asr_mask(labels, target, include_target_class)
    return accuracy(pred_triggered[keep], torch.full_like(labels[keep], target))


def der(asr_before: float, asr_after: float, acc_before: float, acc_after: float) -> float:
    """Defense effectiveness rating, [max(0, dASR) - max(0, dACC) + 1] / 2, in [0, 1].

    dASR = drop of the attack success rate, dACC = drop of clean accuracy (BackdoorBench).
    """
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0
