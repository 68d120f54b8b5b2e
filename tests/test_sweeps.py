"""End-to-end sweeps on a local Ray: MLflow structure, failed trials, bad input, resume."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import FASHION, ROOT

PY = sys.executable


def run_script(script, args, env, cwd, timeout=420):
    return subprocess.run([PY, str(script), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def runs_of(db: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs apt-get install dataset-fashion-mnist")
def test_sft_grid_smoke_logs_structure_to_mlflow(tmp_path, sweep_env):
    csv = tmp_path / "out.csv"
    proc = run_script(ROOT / "sweeps/sft_grid.py", ["--smoke-test", "--storage-path", str(tmp_path / "rr"),
                      "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--results-csv", str(csv)],
                      sweep_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for col in ("trainable", "attack", "lr_max1", "lr_max2", "asr", "clean_acc", "device_hours", "asr_before"):
        assert col in proc.stdout
    table = pd.read_csv(csv)
    assert set(table["trainable"]) == {"sft", "ft"} and (table["status"] == "TERMINATED").all()
    assert table["asr_before"].between(0, 1).all()

    client, parents, children = runs_of(tmp_path / "mlflow.db", "sft_grid")
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    for tag in ("git_commit", "sweep_script", "search_space"):
        assert parent.data.tags.get(tag), tag
    assert "lr_max1" in parent.data.tags["search_space"]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "asr_vs_clean_acc.png", "sft_grid.py"} <= arts
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["trial_id"]
        params = child.data.params
        assert params["attack"] == "badnets" and params["dataset"] == "fashion_mnist"
        assert {"poison_ratio", "epochs", "clean_fraction", "seed", "batch_size"} <= set(params)  # full resolved config
        if params["trainable"] == "sft":
            assert float(params["lr_max1"]) == 0.1 and float(params["lr_max2"]) == 0.001
        for metric in ("asr", "clean_acc", "device_hours"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, metric)]
            assert sorted(steps) == [0, 1], (metric, steps)  # epoch 0 = before the defense, epoch 1
        assert "lr_schedule.png" in {a.path for a in client.list_artifacts(child.info.run_id)}

    # `secsweep report` rebuilds the table from MLflow and attaches it to the parent run
    from secsweep.cli import main as cli_main

    assert cli_main(["report", "sft_grid", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                     "--out", str(tmp_path / "rep")]) == 0
    per_defense = pd.read_csv(tmp_path / "rep" / "per_defense.csv")
    assert set(per_defense["trainable"]) == {"sft", "ft"} and per_defense["der"].between(0, 1).all()
    assert (tmp_path / "rep" / "device_hours.png").stat().st_size > 1000
    assert "per_defense.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs apt-get install dataset-fashion-mnist")
def test_sft_search_optuna_two_objectives(tmp_path, sweep_env):
    proc = run_script(ROOT / "sweeps/sft_search.py", ["--smoke-test", "--storage-path", str(tmp_path / "rr"),
                      "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--results-csv", str(tmp_path / "r.csv")],
                      sweep_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "r.csv")
    assert len(table) == 2 and (table["status"] == "TERMINATED").all()
    assert table["pareto"].any()
    # Optuna sampled the learning rates inside the declared ranges
    assert table["lr_max1"].between(0.03, 0.3).all() and table["clean_fraction"].between(0.1, 1.0).all()
    _, parents, children = runs_of(tmp_path / "mlflow.db", "sft_search")
    assert len(parents) == 1 and len(children) == 2


def write_corrupt_cifar(root: Path) -> None:
    """CIFAR-10 files that exist (so the pre-launch check passes) but whose pixels are truncated."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)


def test_crashing_trial_is_failed_run_and_others_finish(tmp_path, sweep_env):
    from secsweep.sweep import Sweep, grid, run

    write_corrupt_cifar(tmp_path / "data")
    sweep = Sweep(name="crash_sweep", trainable="badnets",
                  fixed={"model": "smallcnn", "attack_epochs": 2, "attack_batch_size": 64},
                  grid=grid(dataset=["digits", "cifar10"]), columns=("dataset", "asr", "clean_acc"))
    code = run(sweep, ["--storage-path", str(tmp_path / "rr"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                       "--data-root", str(tmp_path / "data"), "--results-csv", str(tmp_path / "r.csv")])
    assert code == 0
    table = pd.read_csv(tmp_path / "r.csv").set_index("dataset")
    assert table.loc["digits", "status"] == "TERMINATED" and table.loc["cifar10", "status"] == "ERROR"
    client, parents, children = runs_of(tmp_path / "mlflow.db", "crash_sweep")
    status = {c.data.params["dataset"]: c for c in children}
    assert status["digits"].info.status == "FINISHED"
    failed = status["cifar10"]
    assert failed.info.status == "FAILED"
    assert "Error" in failed.data.tags["error"] and "cifar" in failed.data.tags["error"].lower()
    assert "error.txt" in {a.path for a in client.list_artifacts(failed.info.run_id)}
    assert parents[0].data.tags["failed_trials"] == "1"


# the corpus of bad inputs runs in-process (tests/test_bad_inputs.py); this proves the script's own path
@pytest.mark.parametrize("args, needle", [
    (["--set", "lr_max1=0.001", "--set", "lr_max2=0.01"], "lr_max1"),
])
def test_bad_input_is_one_line_exit_2_before_any_trial(tmp_path, sweep_env, args, needle):
    env = {**sweep_env, "SECSWEEP_DATA": str(tmp_path / "nodata"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = run_script(ROOT / "sweeps/sft_grid.py", ["--storage-path", str(tmp_path / "rr"), *args], env, tmp_path,
                      timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0]
    assert not (tmp_path / "rr").exists() or not any((tmp_path / "rr").glob("sft_grid-*"))  # nothing launched
    assert not (tmp_path / "mlflow.db").exists()


def test_resume_finishes_without_redoing_finished_trials(tmp_path, sweep_env):
    db = tmp_path / "mlflow.db"
    args = ["--storage-path", str(tmp_path / "rr"), "--tracking-uri", f"sqlite:///{db}", "--max-concurrent", "1",
            "--set", "attack_epochs=40"]
    proc = subprocess.Popen([PY, str(ROOT / "tests/scripts/tiny_sweep.py"), *args], env=sweep_env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    finished: list = []
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(1)
            # the state file is written after the driver created the MLflow store and parent run;
            # reading the store earlier would race with its table creation
            if any((tmp_path / "rr").glob("tiny_sweep-*/secsweep.json")):
                try:
                    _, _, children = runs_of(db, "tiny_sweep")
                except AssertionError:
                    continue
                finished = [c for c in children if c.info.status == "FINISHED"]
                if finished:
                    break
        assert finished, "no trial finished before the deadline"
        proc.send_signal(signal.SIGINT)  # Ctrl-C on the driver
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    client, _, children = runs_of(db, "tiny_sweep")
    done_before = {c.data.tags["trial_id"]: len(client.get_metric_history(c.info.run_id, "asr"))
                   for c in children if c.info.status == "FINISHED"}
    assert 1 <= len(done_before) < 3

    again = run_script(ROOT / "tests/scripts/tiny_sweep.py", [*args, "--resume"], sweep_env, tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    client, parents, children = runs_of(db, "tiny_sweep")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 3, [c.data.tags["trial_id"] for c in children]  # no duplicate child runs
    assert all(c.info.status == "FINISHED" for c in children)
    for c in children:
        if c.data.tags["trial_id"] in done_before:  # not run again: no new metric points
            assert len(client.get_metric_history(c.info.run_id, "asr")) == done_before[c.data.tags["trial_id"]]


def test_multi_worker_trial_runs_ray_train_ddp(tmp_path):
    """--num-workers 2: each trial is a Ray Train TorchTrainer (DDP over gloo on CPU) launched from the
    Tune trial; its reports reach Tune and MLflow like a single-process trial's, and it trains the
    1-worker recipe (batch_size is global): final clean_acc within 0.05 and ASR within 0.1 of the same
    config run in one process."""
    from secsweep import registry
    from secsweep.context import LocalContext
    from secsweep.sweep import Sweep, grid, run

    fixed = {"dataset": "digits", "model": "smallcnn", "attack_epochs": 2, "attack_batch_size": 32}
    sweep = Sweep(name="ddp_sweep", trainable="badnets", fixed=fixed,
                  grid=grid(poison_ratio=[0.1]), columns=("poison_ratio", "asr", "clean_acc"))
    one = LocalContext(workdir=tmp_path / "one", stage_root=tmp_path / "one-stages")
    registry.get("badnets").fn(registry.get("badnets").build_config({**fixed, "poison_ratio": 0.1}), one)
    code = run(sweep, ["--storage-path", str(tmp_path / "rr"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                       "--num-workers", "2", "--cpus-per-trial", "0.5", "--results-csv", str(tmp_path / "r.csv")])
    assert code == 0
    table = pd.read_csv(tmp_path / "r.csv")
    assert (table["status"] == "TERMINATED").all() and table["clean_acc"].between(0, 1).all()
    print("2 workers:", table[["clean_acc", "asr"]].to_dict("records"), "1 worker:", one.history[-1])
    assert abs(table["clean_acc"][0] - one.history[-1]["clean_acc"]) <= 0.05
    assert abs(table["asr"][0] - one.history[-1]["asr"]) <= 0.1
    client, _, children = runs_of(tmp_path / "mlflow.db", "ddp_sweep")
    assert len(children) == 1
    steps = sorted(m.step for m in client.get_metric_history(children[0].info.run_id, "asr"))
    assert steps == [1, 2]
    assert list((tmp_path / "rr" / "train").glob("train-*")), "no Ray Train run was launched"


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("script, trials", [
    ("defense_comparison", 2), ("sft_ablation", 2), ("ft_lr", 2), ("poison_ratio", 1), ("transfer", 1), ("sequela", 3),
])
def test_every_sweep_script_smoke_runs_and_logs(script, trials, tmp_path, sweep_env):
    """Each sweep script's --smoke-test runs its trainables through Tune and MLflow end to end."""
    proc = run_script(ROOT / f"sweeps/{script}.py", ["--smoke-test", "--storage-path", str(tmp_path / "rr"),
                      "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--results-csv", str(tmp_path / "r.csv")],
                      sweep_env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "r.csv")
    assert len(table) == trials and (table["status"] == "TERMINATED").all(), table.to_string()
    _, parents, children = runs_of(tmp_path / "mlflow.db", script)
    assert len(parents) == 1 and len(children) == trials
    assert all(c.info.status == "FINISHED" and "asr" in c.data.metrics for c in children)
