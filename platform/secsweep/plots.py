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


def plot_asr_vs_clean_acc(rows, path: Path, *, group: str = "trainable", style: str | None = None,
                          label: str | None = None, title: str = "attack success rate vs clean accuracy") -> Path:
    """Scatter of final ASR (y) vs clean accuracy (x): one marker shape per `group` value (defense),
    one colour per `style` value (attack); lower right is better. Rows with asr_before and
    clean_acc_before add the undefended models as black crosses."""
    markers = "osD^vP*Xh<>p"
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = sorted(rows[group].astype(str).unique())
    styles = sorted(rows[style].astype(str).unique()) if style else [None]
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=110)
    for gi, g in enumerate(groups):
        for si, st in enumerate(styles):
            sub = rows[rows[group].astype(str) == g]
            if st is not None:
                sub = sub[sub[style].astype(str) == st]
            if len(sub):
                colour = colours[si % len(colours)] if st is not None else colours[gi % len(colours)]
                if {"asr_ci95", "clean_acc_ci95"} <= set(sub.columns):  # means over seeds: 95 % CI bars
                    ax.errorbar(sub["clean_acc"], sub["asr"], xerr=sub["clean_acc_ci95"].fillna(0),
                                yerr=sub["asr_ci95"].fillna(0), fmt="none", ecolor=colour, elinewidth=0.8,
                                capsize=2, alpha=0.8)
                ax.scatter(sub["clean_acc"], sub["asr"], marker=markers[gi % len(markers)], s=60, alpha=0.85,
                           color=colour, edgecolors="k", linewidths=0.4)
    if {"asr_before", "clean_acc_before"} <= set(rows.columns):
        ref = rows.dropna(subset=["asr_before"]).drop_duplicates(subset=["asr_before", "clean_acc_before"])
        ax.scatter(ref["clean_acc_before"], ref["asr_before"], marker="x", c="k", s=70)
    # legends: shapes = defenses, colours = attacks
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker=markers[i % len(markers)], ls="", color="grey", mec="k", label=g)
               for i, g in enumerate(groups)]
    if style:
        handles += [Line2D([], [], marker="s", ls="", color=colours[i % len(colours)], label=f"{style}: {st}")
                    for i, st in enumerate(styles)]
    if {"asr_before", "clean_acc_before"} <= set(rows.columns):
        handles.append(Line2D([], [], marker="x", ls="", color="k", label="before defense"))
    ax.legend(handles=handles, title=label or group, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xlabel("clean accuracy (fraction of the clean test set)")
    ax.set_ylabel("attack success rate (fraction of triggered test inputs)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title + "\n(lower right is better)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_device_hours(rows, path: Path, *, group: str = "trainable", title: str = "cost per trial") -> Path:
    """Mean device-hours per trial for each defense (bars, with the min-max range)."""
    stats = rows.groupby(group)["device_hours"].agg(["mean", "min", "max"]).sort_values("mean")
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(stats) + 1.6), dpi=110)
    y = range(len(stats))
    ax.barh(list(y), stats["mean"], xerr=[stats["mean"] - stats["min"], stats["max"] - stats["mean"]],
            color="#4c72b0", capsize=3)
    ax.set_yticks(list(y), [str(i) for i in stats.index])
    ax.set_xlabel("device-hours per trial (GPU-hours on GPUs, CPU process-hours on CPUs)")
    ax.set_ylabel(group)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_reinjection(curves, path: Path, *, title: str = "backdoor re-injection") -> Path:
    """ASR per epoch of re-injection runs, one line per (defense, poison ratio); 0.9 marked."""
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    for name, frame in sorted(curves.items()):
        ax.plot(frame["epoch"], frame["asr"], marker=".", label=name)
    ax.axhline(0.9, color="grey", ls=":", lw=1)
    ax.set_xlabel("re-injection epoch (0 = defended model before re-injection)")
    ax.set_ylabel("attack success rate (fraction of triggered test inputs)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(title="defense @ poison ratio", fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
