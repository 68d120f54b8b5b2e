"""Results tables and plots of a sweep: from a Tune ResultGrid, or from MLflow runs (`secsweep report`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .names import ASR, CLEAN_ACC, DER, DEVICE_HOURS
from .ops.metrics import der
from .runtime import PARAMS_KEY, TRAINABLE_KEY

FIRST = ("trial_id", TRAINABLE_KEY, "attack")
LAST = (ASR, CLEAN_ACC, DEVICE_HOURS, "asr_before", "clean_acc_before", DER, "pareto", "status", "error")


def pareto_front(frame: pd.DataFrame, objectives: dict[str, str]) -> pd.Series:
    """True for trials no other finished trial beats on every objective (and strictly on one)."""
    cols = [c for c in objectives if c in frame.columns]
    ok = frame["status"].eq("TERMINATED") & frame[cols].notna().all(axis=1) if cols else frame["status"].eq("")
    # orient every objective so that larger is better
    vals = frame.loc[ok, cols].to_numpy(dtype=float) * [1.0 if objectives[c] == "max" else -1.0 for c in cols]
    front = pd.Series(False, index=frame.index)
    for i, idx in enumerate(frame.index[ok]):
        dominated = ((vals >= vals[i]).all(axis=1) & (vals > vals[i]).any(axis=1)).any()
        front[idx] = not dominated
    return front


def _statuses(results) -> list[str]:
    """TERMINATED / ERROR / UNFINISHED per result, from Tune's trial states (the ResultGrid lists
    results in its trials' order; a restored trial's last result does not say it was done)."""
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None)
    if trials is not None and len(trials) == len(results):
        return [t.status if t.status in ("TERMINATED", "ERROR") else "UNFINISHED" for t in trials]
    return ["ERROR" if r.error is not None else "TERMINATED" if (r.metrics or {}).get("done") else "UNFINISHED"
            for r in results]


def results_frame(results) -> pd.DataFrame:
    """One row per trial: its config values, last metrics, status and error text."""
    rows = []
    for r, status in zip(results, _statuses(results)):
        m = dict(r.metrics or {})
        cfg = (r.config or {}).get(PARAMS_KEY, {})
        row: dict[str, Any] = {"trial_id": m.get("trial_id") or Path(str(r.path)).name.split("_")[1] if r.path else None}
        row.update({k: v for k, v in cfg.items()})
        for k in (ASR, CLEAN_ACC, DEVICE_HOURS, "asr_before", "clean_acc_before", "epoch"):
            if k in m:
                row[k] = m[k]
        row["status"] = status
        row["error"] = (str(r.error).strip().splitlines() or [""])[-1][:200] if r.error is not None else ""
        rows.append(row)
    frame = pd.DataFrame(rows)
    return add_der(frame)


def add_der(frame: pd.DataFrame) -> pd.DataFrame:
    need = {ASR, CLEAN_ACC, "asr_before", "clean_acc_before"}
    if len(frame) and need <= set(frame.columns):
        frame[DER] = [
            der(r.asr_before, r.asr, r.clean_acc_before, r.clean_acc) if pd.notna(r.asr) and pd.notna(r.asr_before) else float("nan")
            for r in frame.itertuples()
        ]
    return frame


def display_columns(frame: pd.DataFrame, wanted: Sequence[str]) -> list[str]:
    """Identification columns, the sweep's own columns, then the metrics; only those present."""
    order = [*FIRST, *wanted, *LAST]
    seen: list[str] = []
    for c in order:
        if c in frame.columns and c not in seen and (c != "error" or frame["error"].astype(bool).any()):
            seen.append(c)
    return seen


def write_sweep_report(frame: pd.DataFrame, out_dir: Path, sweep, csv_path: str | None = None) -> list[Path]:
    """results.csv, results.md and the ASR-vs-clean-accuracy scatter in `out_dir` (and `csv_path`)."""
    from .plots import plot_asr_vs_clean_acc

    out_dir.mkdir(parents=True, exist_ok=True)
    if sweep.space is not None and len(sweep.objectives) > 1 and len(frame):
        frame["pareto"] = pareto_front(frame, sweep.objectives)
    cols = display_columns(frame, sweep.columns)
    paths = [out_dir / "results.csv", out_dir / "results.md"]
    frame.to_csv(paths[0], index=False)
    paths[1].write_text(frame[cols].to_markdown(index=False, floatfmt=".4g") if _has_tabulate() else frame[cols].to_string(index=False))
    if csv_path:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(csv_path, index=False)
    ok = frame[frame["status"] != "ERROR"].dropna(subset=[c for c in (ASR, CLEAN_ACC) if c in frame.columns]) if len(frame) else frame
    if len(ok) and {ASR, CLEAN_ACC} <= set(ok.columns):
        group = TRAINABLE_KEY if TRAINABLE_KEY in ok.columns else None
        if group and "attack" in ok.columns and ok["attack"].nunique() > 1:
            ok = ok.assign(method=ok[TRAINABLE_KEY] + " / " + ok["attack"])
            group = "method"
        paths.append(plot_asr_vs_clean_acc(ok, out_dir / "asr_vs_clean_acc.png", group=group or "status",
                                           label="defense / attack", title=f"{sweep.name}: ASR vs clean accuracy"))
    return paths


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
