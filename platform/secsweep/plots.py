"""PNG plots for trials and sweeps (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_lr_schedule(lr_at: Callable[[int], float], total_steps: int, steps_per_epoch: int, path: Path,
                     title: str = "learning rate schedule") -> Path:
    """Learning rate per optimizer step, with epoch boundaries marked."""
    steps = list(range(max(total_steps, 1)))
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.plot(steps, [lr_at(s) for s in steps], lw=1.2)
    for e in range(1, max(total_steps // max(steps_per_epoch, 1), 1) + 1):
        ax.axvline(e * steps_per_epoch, color="grey", lw=0.5, ls=":")
    ax.set_xlabel(f"optimizer step ({steps_per_epoch} steps per epoch, dotted lines)")
    ax.set_ylabel("learning rate")
    ax.set_yscale("log")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_asr_vs_clean_acc(rows, path: Path, *, group: str = "defense", label: str | None = None,
                          title: str = "attack success rate vs clean accuracy") -> Path:
    """Scatter of final ASR (y) vs clean accuracy (x), one marker per group; lower right is better.

    `rows` is a pandas DataFrame with columns asr, clean_acc and `group` (and optionally
    asr_before/clean_acc_before, drawn as the undefended reference).
    """
    markers = "osD^vP*Xh<>"
    fig, ax = plt.subplots(figsize=(6.5, 5), dpi=110)
    for i, (name, sub) in enumerate(rows.groupby(group, sort=True)):
        ax.scatter(sub["clean_acc"], sub["asr"], marker=markers[i % len(markers)], s=55, alpha=0.85, label=str(name))
    if {"asr_before", "clean_acc_before"} <= set(rows.columns):
        ref = rows.dropna(subset=["asr_before"]).drop_duplicates(subset=["asr_before", "clean_acc_before"])
        ax.scatter(ref["clean_acc_before"], ref["asr_before"], marker="x", c="k", s=70, label="before defense")
    ax.set_xlabel("clean accuracy (fraction of clean test set)")
    ax.set_ylabel("attack success rate (fraction of triggered test set)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title + "\n(lower right is better)")
    ax.legend(title=label or group, fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
