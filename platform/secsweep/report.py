"""Results tables and plots of a sweep: from a Tune ResultGrid, or from MLflow runs (`secsweep report`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .names import (
    ASR, CLEAN_ACC, DER, DEVICE_HOURS, IMPLANTED, VAL_ASR, VAL_CLEAN_ACC, VAL_DER,
)
from .ops.metrics import der
from .runtime import PARAMS_KEY, TRAINABLE_KEY, numeric_metrics

FIRST = ("trial_id", TRAINABLE_KEY, "attack")
LAST = (VAL_ASR, VAL_CLEAN_ACC, ASR, CLEAN_ACC, DEVICE_HOURS, "asr_before", "clean_acc_before", DER, VAL_DER,
        IMPLANTED, "pareto", "status", "error")
SEED_COLUMNS = ("seed", "victim_seed")   # what repeats of one grid point differ in
# metrics summarised over seeds (mean, 95 % CI, n), in this order, where present
SUMMARY_METRICS = (VAL_ASR, VAL_CLEAN_ACC, ASR, CLEAN_ACC, DER, VAL_DER, "auc", "accuracy", DEVICE_HOURS)
NOT_IMPLANTED_NOTE = ("backdoor not implanted (val ASR before the defense below min_asr_before): these rows "
                      "are no evidence for the defense; raise attack_epochs or poison_ratio")


def pareto_front(frame: pd.DataFrame, objectives: dict[str, str]) -> pd.Series:
    """True for trials no other finished trial beats on every objective (and strictly on one)."""
    cols = [c for c in objectives if c in frame.columns]
    ok = frame["status"].eq("TERMINATED") & frame[cols].notna().all(axis=1) if cols else frame["status"].eq("")
    if IMPLANTED in frame.columns:  # a defense of a backdoor that never took is never on the front
        ok &= frame[IMPLANTED].fillna(1.0).ne(0.0)
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
        row.update({k: v for k, v in numeric_metrics(m).items() if k not in row})
        row["status"] = status
        row["error"] = (str(r.error).strip().splitlines() or [""])[-1][:200] if r.error is not None else ""
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["params"] = sorted({k for r in results for k in ((r.config or {}).get(PARAMS_KEY, {}))})
    return add_der(frame)


def _ci95(values: pd.Series) -> float:
    """Half-width of the 95 % confidence interval of the mean (Student t); NaN for fewer than 2 values."""
    from scipy import stats

    v = values.dropna().to_numpy(dtype=float)
    if len(v) < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / len(v) ** 0.5)


def param_columns(frame: pd.DataFrame) -> list[str]:
    """The config columns of a results frame (recorded when it was built; else the non-metric ones)."""
    known = frame.attrs.get("params")
    if known:
        return [c for c in known if c in frame.columns]
    metrics = set(SUMMARY_METRICS) | {"status", "error", "trial_id", "pareto", "epoch"}
    return [c for c in frame.columns if c not in metrics and not pd.api.types.is_float_dtype(frame[c])]


def declared_metrics(frame: pd.DataFrame, names: Sequence[str] = ()) -> list[str]:
    """The metrics a report summarises: the standard ones present in `frame`, then the numeric
    columns among `names` (what the sweep declares: its objectives, selection and columns; what
    the trainables declare), so an encoder sweep's `knn_acc` is summarised like a defense's `asr`."""
    out = [m for m in SUMMARY_METRICS if m in frame.columns]
    params = set(frame.attrs.get("params") or ())
    for n in names:
        if n in frame.columns and n not in out and n not in params and pd.api.types.is_numeric_dtype(frame[n]) \
                and n not in SEED_COLUMNS:
            out.append(n)
    return out


def trainable_metrics(frame: pd.DataFrame) -> list[str]:
    """The metrics the frame's trainables declare (`@register(metrics=...)`) and their val_ twins."""
    from . import registry

    names = []
    if TRAINABLE_KEY in frame.columns:
        for t in frame[TRAINABLE_KEY].dropna().unique():
            try:
                ms = registry.get(str(t)).metrics
            except Exception:  # a trainable that no longer exists (an old MLflow experiment)
                continue
            names += [n for m in ms for n in (f"val_{m}", m)]
    return list(dict.fromkeys(names))


def seed_summary(frame: pd.DataFrame, keys: Sequence[str] | None = None,
                 metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean, 95 % CI half-width (`<metric>_ci95`) and number of seeds `n` of every summary metric
    (`metrics`, default the standard ones present), per grid point (all config columns but the
    seeds) or per `keys`; finished trials only."""
    ok = frame[frame["status"] == "TERMINATED"] if "status" in frame.columns else frame
    if keys is None:
        keys = [c for c in param_columns(ok) if c not in SEED_COLUMNS]
        keys = [c for c in keys if ok[c].astype(str).nunique() > 1] or keys[:1]
    keys = [k for k in keys if k in ok.columns]
    metrics = [m for m in (metrics if metrics is not None else SUMMARY_METRICS) if m in ok.columns and m not in keys]
    if not len(ok) or not keys or not metrics:
        return pd.DataFrame()
    grouped = ok.assign(**{k: ok[k].astype(str) for k in keys}).groupby(keys, dropna=False, sort=True)
    out = grouped[metrics].mean()
    for m in metrics:
        out[f"{m}_ci95"] = grouped[m].agg(_ci95)
    out["n"] = grouped.size()
    if IMPLANTED in ok.columns:
        out[IMPLANTED] = grouped[IMPLANTED].min()
    return out.reset_index()


def summary_markdown(summary: pd.DataFrame) -> str:
    """The summary as a markdown table, each metric as `mean ± CI` (the CI is left out for n = 1)."""
    cols = [c for c in summary.columns if not c.endswith("_ci95")]
    shown = summary[cols].copy()
    for m in cols:
        if f"{m}_ci95" in summary.columns:
            shown[m] = [f"{v:.4g}" if pd.isna(ci) else f"{v:.4g} ± {round(ci, 6):.2g}"
                        for v, ci in zip(summary[m], summary[f"{m}_ci95"])]
    text = shown.to_markdown(index=False)
    if IMPLANTED in summary.columns and summary[IMPLANTED].eq(0.0).any():
        text += f"\n\n{IMPLANTED} = 0: {NOT_IMPLANTED_NOTE}\n"
    return text + "\n\nmean ± half-width of the 95 % confidence interval over n seeds (Student t)\n"


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


def write_sweep_report(frame: pd.DataFrame, out_dir: Path, sweep, csv_path: str | None = None,
                       histories: dict[str, pd.DataFrame] | None = None) -> list[Path]:
    """The end-of-sweep report (see write_report), plus a copy of the CSV at `csv_path`."""
    if sweep.space is not None and len(sweep.objectives) > 1 and len(frame):
        frame["pareto"] = pareto_front(frame, sweep.objectives)
    declared = [*sweep.objectives, sweep.selection[0], *sweep.columns]
    paths = write_report(frame, out_dir, title=sweep.name, columns=sweep.columns, histories=histories,
                         metrics=declared)
    if csv_path:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(csv_path, index=False)
    return paths


def write_report(frame: pd.DataFrame, out_dir: Path, *, title: str, columns: Sequence[str] = (),
                 histories: dict[str, pd.DataFrame] | None = None, metrics: Sequence[str] = ()) -> list[Path]:
    """results.csv and results.md (one row per trial, DER included), per_defense.csv/.md (mean ASR,
    clean accuracy, device-hours and DER per defense and attack), and the plots: ASR vs clean accuracy
    (one marker per defense), device-hours per defense, and ASR-per-epoch curves of re-injection
    trials when `histories` (trial_id -> per-epoch frame) has them. `metrics`: the sweep's declared
    metrics, summarised over seeds next to the standard ones (`declared_metrics`)."""
    from .plots import plot_asr_vs_clean_acc, plot_device_hours, plot_reinjection

    out_dir.mkdir(parents=True, exist_ok=True)
    frame = add_der(frame)
    cols = display_columns(frame, columns)
    paths = [out_dir / "results.csv", out_dir / "results.md"]
    frame.to_csv(paths[0], index=False)
    table = frame[cols].to_markdown(index=False, floatfmt=".4g")
    if IMPLANTED in frame.columns and frame[IMPLANTED].eq(0.0).any():
        table += f"\n\n{IMPLANTED} = 0: {NOT_IMPLANTED_NOTE}\n"
    paths[1].write_text(table)
    summary = seed_summary(frame, metrics=declared_metrics(frame, [*metrics, *columns, *trainable_metrics(frame)]))
    if len(summary):  # one row per grid point: mean, 95 % CI and n over its seeds
        paths += [out_dir / "summary.csv", out_dir / "summary.md"]
        summary.to_csv(paths[-2], index=False)
        paths[-1].write_text(summary_markdown(summary))
    finished = frame[frame["status"] == "TERMINATED"] if "status" in frame.columns else frame
    ok = finished.dropna(subset=[c for c in (ASR, CLEAN_ACC) if c in finished.columns])  # plottable rows
    if len(ok) and {ASR, CLEAN_ACC, TRAINABLE_KEY} <= set(ok.columns):
        keys = [TRAINABLE_KEY] + (["attack"] if "attack" in ok.columns else [])
        per_defense = seed_summary(finished, keys)  # a NaN ASR (nothing counted) stays out of the mean only
        paths += [out_dir / "per_defense.csv", out_dir / "per_defense.md"]
        per_defense.to_csv(paths[-2], index=False)
        paths[-1].write_text(summary_markdown(per_defense))
        if len(summary) and summary["n"].max() > 1 and {ASR, CLEAN_ACC, TRAINABLE_KEY} <= set(summary.columns):
            ok = summary  # repeats: plot each grid point's mean with its confidence interval
        paths.append(plot_asr_vs_clean_acc(ok, out_dir / "asr_vs_clean_acc.png", group=TRAINABLE_KEY,
                                           style="attack" if "attack" in ok.columns else None,
                                           label="defense", title=f"{title}: ASR vs clean accuracy"))
        if DEVICE_HOURS in ok.columns:
            paths.append(plot_device_hours(ok, out_dir / "device_hours.png", group=TRAINABLE_KEY,
                                           title=f"{title}: cost per trial"))
    if histories and TRAINABLE_KEY in frame.columns:
        curves = {}
        for row in frame[frame[TRAINABLE_KEY] == "reinjection"].to_dict("records"):
            h = histories.get(row["trial_id"])
            if h is not None and ASR in h.columns:
                curves[f"{row.get('defense', '?')} @ ratio {row.get('reinject_ratio', '?')}"] = h
        if curves:
            paths.append(plot_reinjection(curves, out_dir / "reinjection.png", title=f"{title}: backdoor re-injection"))
    from .audit_report import is_audit_frame, write_audit_report

    if is_audit_frame(frame):  # audits of models: the per-model table, correlations, detection FPRs
        paths += write_audit_report(frame, out_dir, title=title)
    return paths


# -- from MLflow (`secsweep report`) ----------------------------------------------------------------

def frame_from_mlflow(client, experiment: str, parent_run_id: str | None = None):
    """Trials of one sweep invocation (the latest parent run of `experiment` unless given) as rows of
    params, last metric values, status and error; plus per-epoch ASR of re-injection runs; and the
    parent run."""
    from .config import parse_value
    from .errors import SecsweepError

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SecsweepError(f"experiment={experiment!r}: not found in {client.tracking_uri}")
    if parent_run_id is None:
        parents = client.search_runs([exp.experiment_id], filter_string="tags.sweep_script != ''",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise SecsweepError(f"experiment={experiment!r}: no sweep runs in it")
        parent = parents[0]
    else:
        parent = client.get_run(parent_run_id)
    children = client.search_runs([exp.experiment_id], max_results=50000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    rows, histories = [], {}
    status_map = {"FINISHED": "TERMINATED", "FAILED": "ERROR"}
    for child in children:
        row = {"trial_id": child.data.tags.get("trial_id", child.info.run_id)}
        row.update({k: parse_value(v) for k, v in child.data.params.items()})
        row.update(child.data.metrics)
        row["status"] = status_map.get(child.info.status, "UNFINISHED")
        row["error"] = (child.data.tags.get("error", "").strip().splitlines() or [""])[-1][:200]
        rows.append(row)
        if row.get(TRAINABLE_KEY) == "reinjection":
            hist = sorted(client.get_metric_history(child.info.run_id, ASR), key=lambda m: m.step)
            histories[row["trial_id"]] = pd.DataFrame({"epoch": [m.step for m in hist], ASR: [m.value for m in hist]})
    frame = pd.DataFrame(rows)
    if len(frame):
        frame = frame.sort_values("trial_id").reset_index(drop=True)
    frame.attrs["params"] = sorted({k for c in children for k in c.data.params})
    return frame, histories, parent


def histories_from_results(results) -> dict[str, pd.DataFrame]:
    """Per-epoch metrics of every trial of a Tune ResultGrid, by trial_id."""
    out = {}
    for r in results:
        df = getattr(r, "metrics_dataframe", None)
        tid = (r.metrics or {}).get("trial_id")
        if df is not None and tid and "epoch" in df.columns:
            out[tid] = df
    return out
