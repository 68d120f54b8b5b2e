"""Metric definitions shared by every trainable (docs/methods.md §2)."""

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
    """ASR = #{f(t(x)) = target} / #counted, over triggered test inputs (docs/methods.md §2.3).

    NaN when no input counts (an empty set, or only target-class inputs with the target class
    left out): the rate is undefined there, and 0 would read as a defense that worked.
    """
    keep = asr_mask(labels, target, include_target_class)
    if not bool(keep.any()):
        return float("nan")
    return accuracy(pred_triggered[keep], torch.full_like(labels[keep], target))


def der(asr_before: float, asr_after: float, acc_before: float, acc_after: float) -> float:
    """Defense effectiveness rating, [max(0, dASR) - max(0, dACC) + 1] / 2, in [0, 1].

    dASR = drop of the attack success rate, dACC = drop of clean accuracy (BackdoorBench).
    NaN when any input is NaN (an undefined ASR), not the value max(0, NaN) = 0 would give.
    """
    if any(v != v for v in (asr_before, asr_after, acc_before, acc_after)):
        return float("nan")
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


def with_der(metrics: dict) -> dict:
    """`metrics` plus `der` (test) and `val_der` (validation) wherever the before/after pairs exist.

    DER of a trial whose backdoor never took (`backdoor_implanted` = 0) is NaN: removing a backdoor
    that is not there is not a success, and NaN keeps such trials out of every selection.
    """
    out = dict(metrics)
    implanted = out.get("backdoor_implanted", 1.0)
    for prefix in ("", "val_"):
        keys = (f"{prefix}asr_before", f"{prefix}asr", f"{prefix}clean_acc_before", f"{prefix}clean_acc")
        if all(k in out for k in keys) and f"{prefix}der" not in out:
            value = der(*(float(out[k]) for k in keys))
            out[f"{prefix}der"] = value if implanted else float("nan")
    return out
