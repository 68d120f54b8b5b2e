"""The analysis of an audit sweep (SecurityNet's database, correlations and detection table;
docs/methods.md, "Audits of public models"): called by `report.write_report` for any results frame
with audit trials (`secsweep report audit_zoo`, and the end-of-sweep report).

Writes, next to the usual results tables:

* `audit_models.csv` / `.md` — the database table: one row per audited model (its trials of every
  audit joined; repeats with other audit seeds averaged), with the model's identity (`model`, a
  label; `model_trainable`, `dataset`, `arch`, and the model stage's varying config values), its
  `secsweep.audit` facts (train / test accuracy, overfit gap, parameters, year, ...) and every
  audit's declared metrics; each audit's `device_hours` as `device_hours_<audit>`.
* `audit_correlations.csv` / `.md` — the Pearson correlation of every attack metric present
  (`ATTACK_METRICS` and every `evasion_drop_*`) with each model property (`PROPERTIES`: test
  accuracy, overfit gap, parameter count, publication year) over the models, for all models
  ("all") and per dataset with at least `MIN_MODELS` models: r, its two-sided p-value and n.
  The year is correlated over registry models only (a model trained here has year 0).
* `audit_scatter_<property>.png` — one panel per attack metric against the property, one point
  per model (circles trained here, squares registry models, one colour per dataset), r in the
  panel's title, in the manner of SecurityNet's Fig. 13-17.
* `audit_fpr.csv` / `.md` — backdoor detection on models assumed clean (SecurityNet Tab. 1): per
  detector and dataset the false-positive rate (per cent of trials flagged, every model clean),
  the mean runtime in seconds and the number of models.

Rows come either from MLflow child runs (params `model.trainable`, `model.config.*`) or from a Tune
results frame (a `model` column holding the grid's stage reference); only finished trials count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .runtime import TRAINABLE_KEY

__all__ = [
    "ATTACK_METRICS", "PROPERTIES", "DETECTORS", "is_audit_frame", "model_table", "pearson", "correlations",
    "fpr_table", "write_audit_report",
]

MODEL_FIELD = "model"  # the audits' stage-reference field (secsweep.audit.AuditConfig.model)
FACTS = ("train_acc", "test_acc", "overfit_gap", "num_params", "year", "is_zoo", "model_train_size")
# attack metrics correlated with the model properties (their audits' names; evasion drops: all eps)
ATTACK_METRICS = ("agreement", "steal_acc", "steal_acc_ratio", "mia_auc_correctness", "mia_auc_mentr", "mia_auc_mlp")
EVASION_PREFIX = "evasion_drop_"
# model properties: column -> what the tables call it
PROPERTIES = {"test_acc": "accuracy", "overfit_gap": "overfit gap", "num_params": "parameters", "year": "year"}
YEAR = "year"
MIN_MODELS = 3  # models a correlation needs (fewer: NaN)
# the backdoor-detection audit's detectors: <key>_flag (0/1) and <key>_seconds (audit_backdoor_fpr)
DETECTORS = {"nc": "Neural Cleanse", "strip": "STRIP", "neo": "NEO"}
FPR_TRAINABLE = "audit_backdoor_fpr"
SKIP = {"epoch", "done", "trial_id", "training_iteration", "device_hours"}


def _kind(trainable: str) -> str:
    from . import registry

    try:
        return registry.get(str(trainable)).kind
    except Exception:  # a trainable that no longer exists (an old MLflow experiment)
        return ""


def is_audit_frame(frame: pd.DataFrame) -> bool:
    """True when `frame` has trials of an audit (registry kind "audit")."""
    if not len(frame) or TRAINABLE_KEY not in frame.columns:
        return False
    return any(_kind(t) == "audit" for t in frame[TRAINABLE_KEY].dropna().unique())


def _finished(frame: pd.DataFrame) -> pd.DataFrame:
    ok = frame[frame["status"] == "TERMINATED"] if "status" in frame.columns else frame
    return ok[[_kind(t) == "audit" for t in ok[TRAINABLE_KEY]]]


def _model_of(row: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(model trainable, its resolved config as a dict) of one trial row."""
    prefix = f"{MODEL_FIELD}.config."
    if f"{MODEL_FIELD}.{TRAINABLE_KEY}" in row and not _missing(row[f"{MODEL_FIELD}.{TRAINABLE_KEY}"]):
        cfg = {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix) and not _missing(v)}
        return str(row[f"{MODEL_FIELD}.{TRAINABLE_KEY}"]), cfg
    value = row.get(MODEL_FIELD)
    from . import refs
    from .config import to_dict

    ref = refs.coerce(MODEL_FIELD, value) if not _missing(value) else refs.coerce(
        MODEL_FIELD, _default_model(row[TRAINABLE_KEY]))
    return ref.trainable, to_dict(ref.config(MODEL_FIELD))


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _default_model(trainable: str):
    from . import registry

    return getattr(registry.get(trainable).config(), MODEL_FIELD)


def _arch(trainable: str, cfg: Mapping[str, Any]) -> str:
    if trainable == "zoo" and cfg.get("name"):
        try:
            from . import zoo

            return str(zoo.get(str(cfg["name"])).architecture)
        except Exception:  # a card no longer in the table
            return ""
    return str(cfg.get("model", ""))


def _declared(trainable: str) -> list[str]:
    from . import registry

    try:
        return list(registry.get(str(trainable)).metrics)
    except Exception:
        return []


def model_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The database table: one row per audited model (module docstring)."""
    ok = _finished(frame)
    if not len(ok):
        return pd.DataFrame()
    groups: dict[str, dict[str, Any]] = {}
    configs: dict[str, tuple[str, dict]] = {}
    values: dict[str, dict[str, list[float]]] = {}
    for row in ok.to_dict("records"):
        mtrain, mcfg = _model_of(row)
        key = json.dumps({TRAINABLE_KEY: mtrain, **mcfg}, sort_keys=True, default=str)
        configs[key] = (mtrain, mcfg)
        vals = values.setdefault(key, {})
        audit_name = str(row[TRAINABLE_KEY])
        names = [*FACTS, *(m for m in _declared(audit_name) if m not in FACTS and m not in SKIP)]
        names += [c for c in row if c.startswith(EVASION_PREFIX) and c not in names]
        for m in names:
            v = row.get(m)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not _missing(v):
                vals.setdefault(m, []).append(float(v))
        dh = row.get("device_hours")
        if isinstance(dh, (int, float)) and not _missing(dh):
            vals.setdefault(f"device_hours_{audit_name}", []).append(float(dh))
        groups.setdefault(key, {}).setdefault("audits", set()).add(audit_name)
        groups[key]["trials"] = groups[key].get("trials", 0) + 1
    # the config values that differ between the models of one model trainable name them
    by_trainable: dict[str, list[dict]] = {}
    for mtrain, mcfg in configs.values():
        by_trainable.setdefault(mtrain, []).append(mcfg)
    varying_of = {t: [k for k in sorted({k for c in cs for k in c})
                      if len({json.dumps(c.get(k), default=str) for c in cs}) > 1] for t, cs in by_trainable.items()}
    varying = list(dict.fromkeys(k for t in sorted(varying_of) for k in varying_of[t]))
    rows = []
    for key, (mtrain, mcfg) in configs.items():
        if mtrain == "zoo" and mcfg.get("name"):
            label = str(mcfg["name"])
        else:
            label = mtrain + "".join(f" {k}={mcfg[k]}" for k in varying_of[mtrain] if k in mcfg)
        out: dict[str, Any] = {"model": label, "model_trainable": mtrain, "dataset": str(mcfg.get("dataset", "")),
                               "arch": _arch(mtrain, mcfg)}
        out.update({f"model.{k}": mcfg.get(k) for k in varying if k not in ("dataset", "name")})
        out.update({m: float(np.mean(v)) for m, v in values[key].items()})
        out["audits"] = ",".join(sorted(groups[key]["audits"]))
        out["trials"] = groups[key]["trials"]
        rows.append(out)
    table = pd.DataFrame(rows)
    first = ["model", "model_trainable", "dataset", "arch", *(c for c in table.columns if c.startswith("model.")),
             *(f for f in FACTS if f in table.columns)]
    rest = [c for c in table.columns if c not in first]
    return table[first + rest].sort_values(["dataset", "model"]).reset_index(drop=True)


def pearson(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, int]:
    """Pearson's r of the finite pairs, its two-sided p-value and the number of pairs; NaN when
    fewer than MIN_MODELS pairs or either side is constant."""
    from scipy import stats

    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = int(keep.sum())
    if n < MIN_MODELS or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan"), n
    r, p = stats.pearsonr(a, b)
    return float(r), float(p), n


def attack_metrics(table: pd.DataFrame) -> list[str]:
    """The attack metrics present in the database table, in the module's order."""
    return [m for m in ATTACK_METRICS if m in table.columns] + sorted(
        c for c in table.columns if c.startswith(EVASION_PREFIX))


def _property_rows(table: pd.DataFrame, prop: str) -> pd.DataFrame:
    if prop == YEAR and "is_zoo" in table.columns:  # the year of a model trained here is 0, not a year
        return table[table["is_zoo"] == 1.0]
    return table


def correlations(table: pd.DataFrame) -> pd.DataFrame:
    """Pearson r of every attack metric with every property, over all models and per dataset."""
    rows = []
    if not len(table):
        return pd.DataFrame(columns=["dataset", "metric", "property", "pearson_r", "p_value", "n"])
    scopes = [("all", table)] + [(str(d), g) for d, g in table.groupby("dataset") if len(g) >= MIN_MODELS
                                 and table["dataset"].nunique() > 1]
    for scope, part in scopes:
        for metric in attack_metrics(table):
            for prop in PROPERTIES:
                if prop not in part.columns:
                    continue
                sub = _property_rows(part, prop)
                r, p, n = pearson(sub[prop], sub[metric])
                rows.append({"dataset": scope, "metric": metric, "property": prop, "pearson_r": r, "p_value": p, "n": n})
    return pd.DataFrame(rows)


def fpr_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per detector and dataset: FPR in per cent of the finished backdoor-detection trials (every
    audited model clean), mean runtime in seconds, models and trials; plus an "all" dataset."""
    ok = _finished(frame)
    ok = ok[ok[TRAINABLE_KEY] == FPR_TRAINABLE] if len(ok) else ok
    if not len(ok):
        return pd.DataFrame()
    models = [_model_of(r) for r in ok.to_dict("records")]
    data = ok.assign(_dataset=[str(c.get("dataset", "")) for _, c in models],
                     _model=[json.dumps({TRAINABLE_KEY: t, **c}, sort_keys=True, default=str) for t, c in models])
    rows = []
    scopes = [(str(d), g) for d, g in data.groupby("_dataset")] + ([("all", data)] if data["_dataset"].nunique() > 1 else [])
    for key, name in DETECTORS.items():
        flag, secs = f"{key}_flag", f"{key}_seconds"
        if flag not in data.columns:
            continue
        for scope, part in scopes:
            flags = pd.to_numeric(part[flag], errors="coerce").dropna()
            rows.append({"detector": name, "key": key, "dataset": scope, "fpr_percent": 100.0 * float(flags.mean())
                         if len(flags) else float("nan"),
                         "runtime_s": float(pd.to_numeric(part.get(secs), errors="coerce").mean())
                         if secs in part.columns else float("nan"),
                         "models": int(part["_model"].nunique()), "trials": int(len(flags))})
    return pd.DataFrame(rows)


def fpr_markdown(fpr: pd.DataFrame) -> str:
    """SecurityNet Tab. 1's layout: one row per detector, FPR per dataset, the mean runtime."""
    if not len(fpr):
        return "no finished backdoor-detection trials\n"
    datasets = [d for d in dict.fromkeys(fpr["dataset"]) if d != "all"]
    lines = ["| Detector | " + " | ".join(f"{d} FPR (n = {int(fpr[fpr.dataset == d].models.iloc[0])})" for d in datasets)
             + " | Runtime (s) |", "|---" * (len(datasets) + 2) + "|"]
    for name in dict.fromkeys(fpr["detector"]):
        sub = fpr[fpr.detector == name]
        cells = [f"{sub[sub.dataset == d].fpr_percent.iloc[0]:.1f} %" for d in datasets]
        overall = sub[sub.dataset == "all"] if (sub.dataset == "all").any() else sub
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {overall.runtime_s.iloc[0]:.1f} |")
    return "\n".join(lines) + ("\n\nFPR: per cent of the audited models (all assumed clean) the detector flags; "
                               "runtime: mean wall-clock seconds per model\n")


def plot_scatter(table: pd.DataFrame, corr: pd.DataFrame, prop: str, path: Path, title: str) -> Path | None:
    """One panel per attack metric against `prop`, a point per model (module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = attack_metrics(table)
    sub = _property_rows(table, prop)
    if not metrics or prop not in sub.columns or not len(sub):
        return None
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), dpi=110, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    datasets = sorted(sub["dataset"].astype(str).unique())
    for ax, metric in zip(axes.flat, metrics):
        for di, d in enumerate(datasets):
            part = sub[sub["dataset"].astype(str) == d]
            zoo_mask = part["is_zoo"].eq(1.0) if "is_zoo" in part.columns else pd.Series(False, index=part.index)
            for mask, marker, kind in ((~zoo_mask, "o", "trained"), (zoo_mask, "s", "registry")):
                if mask.any():
                    ax.scatter(part.loc[mask, prop], part.loc[mask, metric], marker=marker, s=36, alpha=0.85,
                               color=colours[di % len(colours)], edgecolors="k", linewidths=0.4, label=f"{d} ({kind})")
        hit = corr[(corr.dataset == "all") & (corr.metric == metric) & (corr.property == prop)]
        r = hit.pearson_r.iloc[0] if len(hit) else float("nan")
        ax.set_title(f"{metric}\nPearson r = {r:.3f} (n = {int(hit.n.iloc[0]) if len(hit) else 0})", fontsize=9)
        ax.set_xlabel(PROPERTIES[prop])
        if prop == "num_params":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower right", fontsize=8)
    fig.suptitle(f"{title}: attack metrics vs {PROPERTIES[prop]}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_audit_report(frame: pd.DataFrame, out_dir: Path, *, title: str = "audit") -> list[Path]:
    """Write the audit analysis files (module docstring) to `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    table = model_table(frame)
    if not len(table):
        return paths
    paths += [out_dir / "audit_models.csv", out_dir / "audit_models.md"]
    table.to_csv(paths[-2], index=False)
    paths[-1].write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")
    corr = correlations(table)
    paths += [out_dir / "audit_correlations.csv", out_dir / "audit_correlations.md"]
    corr.to_csv(paths[-2], index=False)
    shown = corr[corr.dataset == "all"].pivot(index="metric", columns="property", values="pearson_r") if len(corr) else corr
    text = (shown.reindex(columns=[p for p in PROPERTIES if p in shown.columns]).to_markdown(floatfmt=".3f")
            if len(corr) else "no attack metrics\n")
    n_models = len(table)
    paths[-1].write_text(f"Pearson r over {n_models} models (all datasets; year: registry models only; "
                         f"NaN: fewer than {MIN_MODELS} models or a constant column)\n\n{text}\n\n"
                         + (corr.to_markdown(index=False, floatfmt=".4g") if len(corr) else "") + "\n")
    for prop in PROPERTIES:
        p = plot_scatter(table, corr, prop, out_dir / f"audit_scatter_{prop}.png", title)
        if p is not None:
            paths.append(p)
    fpr = fpr_table(frame)
    if len(fpr):
        paths += [out_dir / "audit_fpr.csv", out_dir / "audit_fpr.md"]
        fpr.to_csv(paths[-2], index=False)
        paths[-1].write_text(fpr_markdown(fpr))
    return paths
