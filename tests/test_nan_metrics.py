"""An undefined metric is NaN everywhere: computed as NaN, kept by the runtime, stored by MLflow,
shown by the reports; never 0 and never dropped."""

from __future__ import annotations

import math

import pandas as pd

from secsweep.runtime import numeric_metrics


def test_numeric_metrics_keep_nan_and_inf_and_drop_only_non_metrics():
    result = {"asr": float("nan"), "clean_acc": 0.9, "ratio": float("inf"), "epoch": 2, "done": True,
              "trial_id": "abc", "time_this_iter_s": 1.0, "config": {"a": 1}}
    out = numeric_metrics(result)
    assert set(out) == {"asr", "clean_acc", "ratio", "epoch"}
    assert math.isnan(out["asr"]) and out["ratio"] == math.inf


def test_nan_metric_reaches_mlflow_as_nan(tmp_path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    run = client.create_run(client.create_experiment("nan"))
    metrics = numeric_metrics({"asr": float("nan"), "clean_acc": 0.5})
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 1) for k, v in metrics.items()])
    (point,) = client.get_metric_history(run.info.run_id, "asr")
    assert math.isnan(point.value)


def test_reports_show_nan_as_nan(tmp_path):
    from secsweep.report import write_report

    frame = pd.DataFrame([{"trial_id": "t1", "trainable": "sft", "attack": "badnets", "asr": float("nan"),
                           "clean_acc": 0.8, "status": "TERMINATED"}])
    write_report(frame, tmp_path, title="t")
    md = (tmp_path / "results.md").read_text()
    assert "nan" in md.lower() and "| 0 " not in md
    assert math.isnan(pd.read_csv(tmp_path / "results.csv")["asr"][0])


def test_der_of_an_undefined_asr_is_nan():
    from secsweep.ops.metrics import der, with_der

    assert math.isnan(der(0.9, float("nan"), 0.8, 0.8))
    assert math.isnan(der(float("nan"), 0.1, 0.8, 0.8))
    out = with_der({"asr_before": 0.9, "asr": float("nan"), "clean_acc_before": 0.8, "clean_acc": 0.8})
    assert math.isnan(out["der"])
