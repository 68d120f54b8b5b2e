"""End-to-end sweeps on a local Ray: MLflow structure, failed trials, bad input, resume."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import FASHION, ROOT, processes_after

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
    assert (table["backdoor_implanted"] == 1.0).all(), "the smoke backdoor must implant"  # else nothing is shown
    assert table["val_asr"].between(0, 1).all() and table["val_clean_acc"].between(0, 1).all()

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
        assert params["attack"] == "blended" and params["dataset"] == "fashion_mnist"
        assert {"poison_ratio", "epochs", "clean_fraction", "seed", "batch_size"} <= set(params)  # full resolved config
        if params["trainable"] == "sft":
            assert float(params["lr_max1"]) == 0.1 and float(params["lr_max2"]) == 0.001
        for metric in ("asr", "clean_acc", "device_hours"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, metric)]
            assert sorted(steps) == [0, 1], (metric, steps)  # epoch 0 = before the defense, epoch 1
        assert "lr_schedule.png" in {a.path for a in client.list_artifacts(child.info.run_id)}

    # provenance: every run names the code (git commit, dirty flag) and MLflow's Source/Version/User
    # columns fill in; each trial's datasets are MLflow dataset inputs; the experiment opens on runs
    head = parent.data.tags["git_commit"]
    assert len(head) == 40 and subprocess.run(["git", "merge-base", "--is-ancestor", head, "HEAD"], cwd=ROOT).returncode == 0
    for run in [parent, *children]:
        tags = run.data.tags
        assert tags["mlflow.source.name"] == "sweeps/sft_grid.py" and tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.git.commit"] == tags["git_commit"] == head
        assert tags["git_dirty"] in ("true", "false") and tags["mlflow.user"]
    for child in children:
        inputs = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"])
                  for d in child.inputs.dataset_inputs}
        assert inputs == {("fashion_mnist/train", "training"), ("fashion_mnist/test", "evaluation")}
    exp = client.get_experiment_by_name("sft_grid")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"/#/experiments/{exp.experiment_id}?workflowType=machine_learning" in proc.stderr  # the UI link
    # the backdoored model's stage: keyed by code, provenance from the driver (runtime_env), usage recorded
    (manifest,) = (tmp_path / "rr" / "stages" / "blended").glob("*/manifest.json")
    m = json.loads(manifest.read_text())
    assert "secsweep/training.py" in m["code"]["files"] and "trainables/attacks/blended.py" in m["code"]["files"]
    assert m["provenance"]["commit"] == head and m["provenance"]["source"] == "env"
    sweeps_used = {json.loads(line)["sweep"] for line in (manifest.parent / "usage.jsonl").read_text().splitlines()}
    assert sweeps_used == {parent.info.run_name}  # the sweep's results folder name

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
    assert (table["backdoor_implanted"] == 1.0).all(), "the smoke backdoor must implant"
    assert table["pareto"].any()  # the front over val_asr / val_clean_acc
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


def test_resume_replays_the_saved_command_line_and_refuses_conflicts(tmp_path, capsys):
    """`--resume` takes the sweep-defining flags from the saved command line (secsweep.json); this
    invocation may add only flags about itself (--address, --tracking-uri, --results-csv, ...) or
    repeat saved values; any other flag is one line, exit 2, before anything starts."""
    from secsweep.sweep import STATE_FILE, Sweep, build_parser, grid, resume_args, run

    sweep = Sweep(name="replay_sweep", trainable="badnets", fixed={"dataset": "digits"},
                  grid=grid(poison_ratio=[0.1]))
    rr = tmp_path / "rr"
    exp = rr / "replay_sweep-20260101-000000"
    exp.mkdir(parents=True)
    saved = ["--storage-path", "rr", "--max-concurrent", "1", "--set", "attack_epochs=3", "--data-root", "data"]
    (exp / STATE_FILE).write_text(json.dumps({"sweep": "replay_sweep", "parent_run_id": "0" * 32, "argv": saved,
                                              "tracking_uri": "sqlite:///unused.db", "cwd": str(tmp_path)}))

    def resumed(*flags):
        argv = ["--storage-path", str(rr), *flags]
        return resume_args(sweep, argv, build_parser(sweep).parse_args(argv))

    args = resumed("--resume")  # nothing but --resume: the saved sweep as it was
    assert (args.max_concurrent, args.set, args.resume) == (1, ["attack_epochs=3"], str(exp))
    assert args.data_root == str(tmp_path / "data") and args.storage_path == str(rr)  # saved cwd's paths
    args = resumed("--resume", str(exp), "--max-concurrent", "1", "--set", "attack_epochs=3", "--address", "auto")
    assert args.address == "auto" and args.max_concurrent == 1

    for flags, name in [(["--max-concurrent", "2"], "--max-concurrent"), (["--set", "attack_epochs=4"], "--set"),
                        (["--smoke-test"], "--smoke-test"), (["--data-root", str(tmp_path / "other")], "--data-root")]:
        code = run(sweep, ["--storage-path", str(rr), "--resume", *flags])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: {name}=") and "conflicts with the resumed sweep" in err[0], err[0]
    assert [p.name for p in exp.iterdir()] == [STATE_FILE]  # nothing launched: no Tune state, no journal


def metric_points(client, run) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
            for k in run.data.metrics}


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, sweep_env):
    """Ctrl-C (SIGINT to the driver) once a trial finished: exit 130, the resume command printed, the
    parent run KILLED (not FAILED), the finished trial's run FINISHED, and no Ray process left."""
    db, rr = tmp_path / "mlflow.db", tmp_path / "rr"
    token = f"SECSWEEP_TEST_{uuid.uuid4().hex}"
    proc = subprocess.Popen([PY, str(ROOT / "tests/scripts/tiny_sweep.py"), "--storage-path", str(rr),
                             "--tracking-uri", f"sqlite:///{db}", "--max-concurrent", "2", "--preset", "uneven"],
                            cwd=tmp_path, env={**sweep_env, token: "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, finished = time.time() + 240, []
        while time.time() < deadline and proc.poll() is None and not finished:
            time.sleep(0.5)
            if any(rr.glob("tiny_sweep-*/secsweep.json")):
                try:
                    finished = [c for c in runs_of(db, "tiny_sweep")[2] if c.info.status == "FINISHED"]
                except AssertionError:
                    continue
        assert finished, "no trial finished before the deadline"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out[-3000:]
    assert "--resume" in out
    _, parents, children = runs_of(db, "tiny_sweep")
    assert [p.info.status for p in parents] == ["KILLED"]
    assert any(c.info.status == "FINISHED" for c in children)
    assert not processes_after(token), "Ray left running after Ctrl-C"


def test_resume_after_sigkill_of_the_driver_group_is_faithful(tmp_path, sweep_env):
    """SIGKILL of the driver's whole process group (local Ray included) as soon as MLflow shows a
    trial FINISHED (Tune's snapshot then usually still has it running) while another is mid-way,
    then `--resume` with no other flags (the saved command line is replayed): the same trials, no
    duplicate child runs, the finished trial not run again, the interrupted one continued from its
    last checkpoint, no epoch logged twice, no Ray process left over."""
    db, rr = tmp_path / "mlflow.db", tmp_path / "rr"
    token = f"SECSWEEP_TEST_{uuid.uuid4().hex}"
    env = {**sweep_env, token: "1"}
    args = ["--storage-path", str(rr), "--tracking-uri", f"sqlite:///{db}", "--max-concurrent", "2",
            "--preset", "uneven"]  # trials of 10, 5, 5 (slow) epochs
    log_file = open(tmp_path / "first.log", "w")
    # Tune snapshots only when checkpoints force it (no timed snapshots), as in a large sweep whose
    # snapshots take long: the finished trial's end is then not in the snapshot at the kill
    proc = subprocess.Popen([PY, str(ROOT / "tests/scripts/tiny_sweep.py"), *args], cwd=tmp_path,
                            env={**env, "TUNE_GLOBAL_CHECKPOINT_S": "3600"}, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
    finished: list = []
    midway_seen: list = []
    try:
        deadline = time.time() + 240
        # kill once one trial is FINISHED and another has logged epochs without finishing: on a loaded
        # machine the short trial can finish before the slow one's first epoch, so wait for both
        while time.time() < deadline and proc.poll() is None and not (finished and midway_seen):
            time.sleep(0.2)
            # the state file is written after the driver created the MLflow store and parent run;
            # reading the store earlier would race with its table creation
            if any(rr.glob("tiny_sweep-*/secsweep.json")):
                try:
                    client, _, children = runs_of(db, "tiny_sweep")
                except AssertionError:
                    continue
                finished = [c for c in children if c.info.status == "FINISHED"]
                if finished:
                    midway_seen = [c for c in children if c.info.status != "FINISHED"
                                   and client.get_metric_history(c.info.run_id, "asr")]
        assert finished and midway_seen, ("no trial finished while another was mid-way before the deadline: "
                                          + (tmp_path / "first.log").read_text()[-3000:])
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray (raylet, GCS, workers)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log_file.close()
    assert not processes_after(token), "Ray processes survived the driver's process group"

    client, _, children = runs_of(db, "tiny_sweep")
    before = {c.data.tags["trial_id"]: c for c in children}
    done_before = {t: metric_points(client, c) for t, c in before.items() if c.info.status == "FINISHED"}
    assert 1 <= len(done_before) < 3
    # interrupted after the driver had seen (and logged) some of its epochs
    midway = [t for t, c in before.items() if c.info.status != "FINISHED" and metric_points(client, c).get("asr")]
    assert midway, "no trial was mid-way at the kill"

    again = run_script(ROOT / "tests/scripts/tiny_sweep.py", ["--storage-path", str(rr), "--resume"], env, tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert not processes_after(token), "Ray left running after the resumed sweep"
    client, parents, children = runs_of(db, "tiny_sweep")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    ids = [c.data.tags["trial_id"] for c in children]
    assert len(children) == 3 and len(set(ids)) == 3, ids   # no duplicate child runs
    assert set(before) <= set(ids)                           # the trials of the first run continued
    (exp_dir,) = rr.glob("tiny_sweep-*")
    assert set(pd.read_csv(exp_dir / "results.csv")["trial_id"]) == set(ids)  # Tune's trials are MLflow's
    for c in children:
        assert c.info.status == "FINISHED"
        points = metric_points(client, c)
        for key, pts in points.items():
            steps = [s for s, _ in pts]
            assert len(steps) == len(set(steps)), (c.data.tags["trial_id"], key, steps)  # no epoch twice
        assert [s for s, _ in points["asr"]] == list(range(1, int(c.data.params["attack_epochs"]) + 1))
        if c.data.tags["trial_id"] in done_before:  # finished before the kill: not one new point
            assert points == done_before[c.data.tags["trial_id"]]
    # the trial interrupted mid-way resumed from its last checkpoint, not from epoch 1 (Tune starts a
    # trial its snapshot had not seen running in a new folder; the newest holds the resumed run)
    for t in midway:
        trial_dir = max(exp_dir.glob(f"trial_entry_{t}_*"), key=lambda d: d.stat().st_mtime)
        last = json.loads((trial_dir / "result.json").read_text().splitlines()[-1])
        assert last["epoch"] == 5 and last["iterations_since_restore"] < 5, last
    # the finished trial did not train again: either Tune's snapshot already had it terminated (no new
    # row), or the snapshot still had it running, Tune restarted it, and it reported its recorded
    # result at once (one row, iteration 1 since restore)
    for t in done_before:
        rows = [json.loads(ln) for d in exp_dir.glob(f"trial_entry_{t}_*") if (d / "result.json").is_file()
                for ln in (d / "result.json").read_text().splitlines()]
        n = int(before[t].data.params["attack_epochs"])
        assert [r["iterations_since_restore"] for r in rows[n:]] in ([], [1]), rows[n:]


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
    if script == "ft_lr":  # a floor no backdoor reaches: every row, the table and the runs say so
        proc = run_script(ROOT / f"sweeps/{script}.py", ["--smoke-test", "--storage-path", str(tmp_path / "rr"),
                          "--tracking-uri", f"sqlite:///{tmp_path}/floor.db", "--results-csv", str(tmp_path / "f.csv"),
                          "--set", "min_asr_before=1.0"], sweep_env, tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "backdoor not implanted" in proc.stdout
        assert (pd.read_csv(tmp_path / "f.csv")["backdoor_implanted"] == 0.0).all()
        _, _, children = runs_of(tmp_path / "floor.db", script)
        assert all("backdoor not implanted" in c.data.tags.get("warning", "") for c in children)
        assert all(np.isnan(c.data.metrics["val_der"]) for c in children)  # no objective can select them
