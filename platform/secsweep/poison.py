"""Data poisoning: choose which training samples carry the trigger and relabel them.

All-to-one attacks (every poisoned sample gets the target label) as in the FTP paper's BackdoorBench
setting (docs/methods.md §4.1: poison ratio 0.1; target label not stated, 0 here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Trigger = Callable[[torch.Tensor], torch.Tensor]


def choose_poison_indices(
    labels: torch.Tensor, ratio: float, target: int, seed: int = 0, *, exclude_target: bool = False
) -> torch.Tensor:
    """Indices of round(ratio * N) training samples to poison, drawn with a seeded generator.

    `exclude_target` draws only from samples whose label is not the target (a "dirty-label"
    variant some toolkits use); the default draws from the whole set, as BackdoorBench does.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"poison_ratio={ratio}: must be in (0, 1)")
    pool = torch.nonzero(labels != target).flatten() if exclude_target else torch.arange(len(labels))
    n = max(1, round(ratio * len(labels)))
    n = min(n, len(pool))
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randperm(len(pool), generator=g)[:n]].sort().values


@dataclass(frozen=True)
class PoisonedSet:
    """A training set with a poisoned subset; `poisoned[i]` says whether sample i carries the trigger."""

    images: torch.Tensor
    labels: torch.Tensor
    poisoned: torch.Tensor        # bool (N,)
    true_labels: torch.Tensor     # labels before relabelling

    @property
    def indices(self) -> torch.Tensor:
        return torch.nonzero(self.poisoned).flatten()

    def __len__(self) -> int:
        return len(self.labels)


def poison(
    images: torch.Tensor,
    labels: torch.Tensor,
    trigger: Trigger,
    *,
    ratio: float,
    target: int,
    seed: int = 0,
    exclude_target: bool = False,
    batch_size: int = 4096,
) -> PoisonedSet:
    """Apply `trigger` to a seeded `ratio` of the samples and relabel them to `target` (inputs untouched)."""
    idx = choose_poison_indices(labels, ratio, target, seed, exclude_target=exclude_target)
    out = images.clone()
    for i in range(0, len(idx), batch_size):
        part = idx[i : i + batch_size]
        out[part] = trigger(images[part])
    new_labels = labels.clone()
    new_labels[idx] = target
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[idx] = True
    return PoisonedSet(out, new_labels, mask, labels.clone())


def triggered_test_set(
    images: torch.Tensor, labels: torch.Tensor, trigger: Trigger, target: int, *, include_target_class: bool = False,
    batch_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triggered copies of the test inputs that count for ASR, with their true labels."""
    keep = torch.ones_like(labels, dtype=torch.bool) if include_target_class else labels != target
    x, y = images[keep], labels[keep]
    return torch.cat([trigger(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else x, y
