"""The audit analysis (secsweep.audit_report) on synthetic audit runs in a real local MLflow file
store: one sweep parent run and a child run per (model, audit) trial with the params a sweep logs
(the resolved config, the model stage reference flattened to model.trainable / model.config.*) and
made-up metrics. Checks the database table, the Pearson correlations against numpy, the FPR /
runtime table, and that `secsweep report` writes them through its hook."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from secsweep import audit_report, registry
from secsweep.config import to_dict
from secsweep.report import frame_from_mlflow

AUDITS = ("audit_stealing", "audit_mia", "audit_evasion", "audit_backdoor_fpr")
# (model ref, test_acc, overfit_gap, num_params, year, is_zoo, nc_flag, strip_flag, neo_flag)
MNIST = {"trainable": "clean", "dataset": "mnist", "model": "smallcnn", "lr": 0.05, "batch_size": 64}
DIGITS = {"trainable": "clean", "dataset": "digits", "model": "smallcnn"}
MODELS = [
    ({"trainable": "zoo", "name": "digit-recognizer-mnist-cnn", "dataset": "mnist"}, 0.995, 0.003, 390410, 2021, 1, 0, 0, 0),
    ({**MNIST, "train_size": 500, "epochs": 2}, 0.62, 0.05, 24058, 0, 0, 1, 0, 0),
    ({**MNIST, "train_size": 500, "epochs": 30}, 0.81, 0.19, 24058, 0, 0, 1, 0, 1),
    ({**MNIST, "train_size": 2000, "epochs": 5}, 0.90, 0.07, 24058, 0, 0, 0, 0, 0),
    ({**MNIST, "train_size": 4000, "epochs": 10}, 0.95, 0.04, 24058, 0, 0, 0, 0, 0),
    ({**DIGITS, "train_size": 300, "epochs": 2}, 0.55, 0.02, 24058, 0, 0, 0, 0, 0),
    ({**DIGITS, "train_size": 600, "epochs": 10}, 0.85, 0.10, 24058, 0, 0, 1, 0, 0),
    ({**DIGITS, "train_size": 1200, "epochs": 30}, 0.93, 0.06, 24058, 0, 0, 0, 1, 0),
]
EXPERIMENT = "audit_zoo"


def _metrics(i: int, model) -> dict[str, dict[str, float]]:
    """Made-up per-audit metrics of model i: attack metrics are fixed functions of its facts plus a
    deterministic wobble, so the correlations are far from 0 and +-1."""
    _, acc, gap, params, year, is_zoo, nc, strip, neo = model
    wobble = [0.01, -0.02, 0.015, 0.0, -0.01, 0.02, -0.005, 0.01][i]
    facts = {"train_acc": acc + gap, "test_acc": acc, "overfit_gap": gap, "num_params": float(params),
             "year": float(year), "is_zoo": float(is_zoo), "model_train_size": 450.0 * (i + 1)}
    return {
        "audit_stealing": {**facts, "agreement": 0.9 * acc + wobble, "steal_acc": 0.8 * acc - wobble,
                           "device_hours": 0.01},
        "audit_mia": {**facts, "mia_auc_mentr": 0.5 + 0.6 * gap + wobble, "mia_auc_mlp": 0.52 + wobble,
                      "mia_auc_correctness": 0.5 + gap / 2, "device_hours": 0.002},
        "audit_evasion": {**facts, "evasion_drop_white_0.03": 0.3 - 0.2 * acc + wobble,
                          "evasion_drop_black_0.03": 0.1 + wobble, "device_hours": 0.003},
        "audit_backdoor_fpr": {**facts, "nc_flag": float(nc), "strip_flag": float(strip), "neo_flag": float(neo),
                               "nc_seconds": 10.0 + i, "strip_seconds": 2.0, "neo_seconds": 1.0 + 0.5 * i,
                               "device_hours": 0.004},
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A file store with one sweep: every (model, audit) trial finished, plus one FAILED trial."""
    from mlflow.tracking import MlflowClient

    from secsweep.tracking import flat_params

    root = tmp_path_factory.mktemp("mlruns")
    uri = f"file:{root}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=uri)
        exp = client.create_experiment(EXPERIMENT)
        parent = client.create_run(exp, tags={"sweep_script": "sweeps/audit_zoo.py"})
        n = 0
        for i, model in enumerate(MODELS):
            for audit_name, metrics in _metrics(i, model).items():
                cfg = registry.get(audit_name).build_config({"model": model[0]})
                run = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id, "trial_id": f"t{n:03d}"})
                params = flat_params({"trainable": audit_name, **to_dict(cfg)})
                client.log_batch(run.info.run_id, params=params)
                for k, v in metrics.items():
                    client.log_metric(run.info.run_id, k, v)
                client.set_terminated(run.info.run_id, "FINISHED")
                n += 1
        failed = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id, "trial_id": "t999"})
        cfg = registry.get("audit_backdoor_fpr").build_config({"model": MODELS[1][0]})
        client.log_batch(failed.info.run_id, params=flat_params({"trainable": "audit_backdoor_fpr", **to_dict(cfg)}))
        client.log_metric(failed.info.run_id, "nc_flag", 0.0)  # would lower NC's FPR if it counted
        client.set_terminated(failed.info.run_id, "FAILED")
        client.set_terminated(parent.info.run_id, "FINISHED")
        frame, _, _ = frame_from_mlflow(client, EXPERIMENT)
        yield uri, frame


def test_the_database_table_has_one_row_per_model_with_every_audit(store):
    _, frame = store
    assert audit_report.is_audit_frame(frame)
    table = audit_report.model_table(frame)
    assert len(table) == len(MODELS)
    assert set(table["dataset"]) == {"mnist", "digits"}
    assert (table["audits"] == ",".join(sorted(AUDITS))).all() and (table["trials"] == 4).all()
    zoo_row = table[table["model"] == "digit-recognizer-mnist-cnn"].iloc[0]
    assert zoo_row["arch"] == "zoo_mnist_cnn" and zoo_row["year"] == 2021 and zoo_row["nc_flag"] == 0.0
    clean = table[(table["model.train_size"] == 500) & (table["model.epochs"] == 30)].iloc[0]
    assert clean["arch"] == "smallcnn" and clean["test_acc"] == pytest.approx(0.81)
    assert clean["neo_flag"] == 1.0 and clean["mia_auc_mentr"] == pytest.approx(0.5 + 0.6 * 0.19 + 0.015)
    assert clean["device_hours_audit_mia"] == pytest.approx(0.002)
    assert "train_size=500" in clean["model"] and "epochs=30" in clean["model"]


def test_correlations_match_numpy(store):
    _, frame = store
    table = audit_report.model_table(frame)
    corr = audit_report.correlations(table)
    ms = [_metrics(i, m) for i, m in enumerate(MODELS)]
    acc = np.array([m[1] for m in MODELS])
    gap = np.array([m[2] for m in MODELS])
    agreement = np.array([x["audit_stealing"]["agreement"] for x in ms])
    mentr = np.array([x["audit_mia"]["mia_auc_mentr"] for x in ms])

    def r(metric, prop, dataset="all"):
        hit = corr[(corr.dataset == dataset) & (corr.metric == metric) & (corr.property == prop)]
        assert len(hit) == 1, (metric, prop, dataset)
        return hit.iloc[0]

    assert r("agreement", "test_acc").pearson_r == pytest.approx(np.corrcoef(acc, agreement)[0, 1], abs=1e-9)
    assert r("mia_auc_mentr", "overfit_gap").pearson_r == pytest.approx(np.corrcoef(gap, mentr)[0, 1], abs=1e-9)
    assert r("agreement", "test_acc").n == len(MODELS)
    digits = [i for i, m in enumerate(MODELS) if m[0]["dataset"] == "digits"]
    assert r("agreement", "test_acc", "digits").pearson_r == pytest.approx(
        np.corrcoef(acc[digits], agreement[digits])[0, 1], abs=1e-9)
    assert set(corr.metric) >= {"agreement", "steal_acc", "mia_auc_mlp", "evasion_drop_white_0.03",
                                "evasion_drop_black_0.03"}
    # the year is correlated over registry models only: one here, so no correlation
    assert np.isnan(r("agreement", "year").pearson_r) and r("agreement", "year").n == 1


def test_pearson_edge_cases():
    assert np.isnan(audit_report.pearson([1, 2], [3, 4])[0])  # fewer than 3 models
    assert np.isnan(audit_report.pearson([1, 1, 1], [3, 4, 5])[0])  # a constant property
    r, p, n = audit_report.pearson([1, 2, 3, float("nan"), 5], [2, 4, 7, 0, 9])
    assert n == 4 and r == pytest.approx(np.corrcoef([1, 2, 3, 5], [2, 4, 7, 9])[0, 1]) and 0 < p < 1


def test_the_fpr_table_counts_finished_trials_per_detector_and_dataset(store):
    _, frame = store
    fpr = audit_report.fpr_table(frame).set_index(["key", "dataset"])
    # mnist: NC flags 2 of 5, STRIP 0, NEO 1; digits: NC 1 of 3, STRIP 1, NEO 0 (the FAILED run ignored)
    assert fpr.loc[("nc", "mnist"), "fpr_percent"] == pytest.approx(40.0)
    assert fpr.loc[("nc", "mnist"), "models"] == 5 and fpr.loc[("nc", "mnist"), "trials"] == 5
    assert fpr.loc[("strip", "mnist"), "fpr_percent"] == 0.0
    assert fpr.loc[("neo", "mnist"), "fpr_percent"] == pytest.approx(20.0)
    assert fpr.loc[("strip", "digits"), "fpr_percent"] == pytest.approx(100 / 3)
    assert fpr.loc[("nc", "all"), "fpr_percent"] == pytest.approx(300 / 8)
    assert fpr.loc[("nc", "all"), "runtime_s"] == pytest.approx(np.mean([10.0 + i for i in range(8)]))
    assert fpr.loc[("neo", "mnist"), "runtime_s"] == pytest.approx(np.mean([1.0 + 0.5 * i for i in range(5)]))
    text = audit_report.fpr_markdown(audit_report.fpr_table(frame))
    assert "| Neural Cleanse | 33.3 % | 40.0 % | 13.5 |" in text  # digits, mnist (sorted), mean runtime


def test_the_detector_names_are_the_audits(store):
    from trainables.audits import backdoor_fpr

    for key in audit_report.DETECTORS:
        assert f"{key}_flag" in backdoor_fpr.METRICS and f"{key}_seconds" in backdoor_fpr.METRICS
    assert audit_report.FPR_TRAINABLE == "audit_backdoor_fpr"


def test_secsweep_report_writes_the_audit_analysis(store, tmp_path):
    from secsweep.cli import main

    uri, _ = store
    out = tmp_path / "rep"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        assert main(["report", EXPERIMENT, "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    for name in ("audit_models.csv", "audit_models.md", "audit_correlations.csv", "audit_correlations.md",
                 "audit_fpr.csv", "audit_fpr.md", "audit_scatter_test_acc.png", "audit_scatter_overfit_gap.png"):
        assert (out / name).is_file(), name
    models = pd.read_csv(out / "audit_models.csv")
    assert len(models) == len(MODELS)
    corr = pd.read_csv(out / "audit_correlations.csv")
    assert len(corr) and corr["pearson_r"].notna().any()
    assert "Neural Cleanse" in (out / "audit_fpr.md").read_text()
    assert (out / "audit_scatter_test_acc.png").read_bytes()[:4] == b"\x89PNG"


def test_a_frame_without_audits_is_left_alone(tmp_path):
    frame = pd.DataFrame({"trainable": ["sft"], "asr": [0.1], "clean_acc": [0.9], "status": ["TERMINATED"]})
    assert not audit_report.is_audit_frame(frame)
