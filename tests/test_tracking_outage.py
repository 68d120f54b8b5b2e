"""A tracking outage costs nothing: a real MLflow server is killed mid-sweep and restarted later.

MLflow's own HTTP retries are set small here (1 retry, 2 s timeout: they give up after a few seconds),
and the server stays down for much longer than that, so only the driver's buffered writes
(secsweep.tracking.TrackingQueue) can get every metric through. On main such an outage ended the
sweep with `MlflowException ... Max retries exceeded`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from mlflow.tracking import MlflowClient

from conftest import ROOT, processes_after

PY = sys.executable
MIN_OUTAGE_S = 10.0   # MLflow's own retries with the settings below give up after ~3 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, store: Path, artifacts: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return subprocess.Popen(
        [PY, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store}", "--artifacts-destination", str(artifacts)],
        env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(port: int, server: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert server.poll() is None, "the MLflow server exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError("the MLflow server did not come up")


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_sweep_survives_a_tracking_server_outage(tmp_path, sweep_env):
    port, store, arts = free_port(), tmp_path / "mlflow.db", tmp_path / "artifacts"
    server_log = tmp_path / "server.log"
    server = start_server(port, store, arts, server_log)
    sweep = None
    token = f"SECSWEEP_TEST_{uuid.uuid4().hex}"
    try:
        wait_healthy(port, server)
        env = {**sweep_env, token: "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
        out = open(tmp_path / "sweep.log", "w")
        sweep = subprocess.Popen(
            [PY, str(ROOT / "tests/scripts/tiny_sweep.py"), "--tracking-uri", f"http://127.0.0.1:{port}",
             "--storage-path", str(tmp_path / "rr"), "--max-concurrent", "1", "--set", "attack_epochs=10",
             "--set", "attack_batch_size=8", "--tracking-drain-timeout", "180"],
            env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        local = MlflowClient(f"sqlite:///{store}")  # read the store directly: never through the outage

        def children():
            exp = local.get_experiment_by_name("tiny_sweep")
            runs = local.search_runs([exp.experiment_id]) if exp else []
            return [r for r in runs if "mlflow.parentRunId" in r.data.tags]

        deadline = time.time() + 180
        while not any(c.data.metrics for c in children()):
            assert sweep.poll() is None and time.time() < deadline, (tmp_path / "sweep.log").read_text()[-3000:]
            time.sleep(0.5)
        kill_group(server)  # down once the first metrics arrived
        down = time.time()
        time.sleep(MIN_OUTAGE_S)
        server = start_server(port, store, arts, server_log)  # same port and store; up after its start-up
        wait_healthy(port, server)
        outage = time.time() - down
        code = sweep.wait(timeout=300)
        log = (tmp_path / "sweep.log").read_text()
        assert code == 0, log[-4000:]
    finally:
        if sweep is not None and sweep.poll() is None:
            kill_group(sweep)
        kill_group(server)
    assert outage >= MIN_OUTAGE_S, outage
    assert "MLflow unreachable" in log and "MLflow reachable again" in log  # the outage hit the sweep
    assert "Traceback" not in log

    local = MlflowClient(f"sqlite:///{store}")
    exp = local.get_experiment_by_name("tiny_sweep")
    runs = local.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(kids) == 3 and all(k.info.status == "FINISHED" for k in kids)
    for k in kids:
        for key in k.data.metrics:
            steps = sorted(m.step for m in local.get_metric_history(k.info.run_id, key))
            assert steps == list(range(1, 11)), (k.info.run_name, key, steps)  # every epoch, exactly once
    # the final report reached the parent run's artifacts, which the server stores under `arts`
    assert list(arts.glob(f"**/{parents[0].info.run_id}/artifacts/results.csv")), sorted(arts.rglob("*"))
    assert not processes_after(token), "Ray left running"


def test_writes_a_killed_driver_left_are_replayed_once(tmp_path, monkeypatch):
    """The queue's journal: writes that never reached MLflow (the server was down when the driver
    died) are applied by the next driver (`--resume`), in order and once; epochs already queued are
    not queued again. No Ray, no server: a dead URL, then the real SQLite store."""
    from secsweep.tracking import JOURNAL_FILE, TrackingQueue

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    store = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = store.create_experiment("replay")
    parent = store.create_run(exp_id).info.run_id
    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()

    dead = TrackingQueue(f"http://127.0.0.1:{free_port()}", exp_dir, exp_id, parent)
    dead.ensure_child("t1", "badnets-t1", {"mlflow.parentRunId": parent, "trial_id": "t1"}, {"lr": 0.1})
    for epoch in (1, 2):
        assert dead.log_metrics("t1", {"asr": 0.5 / epoch}, epoch) == 1
    dead.terminate("FINISHED", trial="t1")
    assert not dead.drain(2.0) and dead.pending() == 5  # never raises; nothing lost
    dead.close()

    live = TrackingQueue(f"sqlite:///{tmp_path}/mlflow.db", exp_dir, exp_id, parent)  # the resumed driver
    assert live.log_metrics("t1", {"asr": 0.9}, 2) == 0   # epoch 2 was queued before the crash
    assert live.drain(60) and live.failures == 0
    live.close()
    (child,) = [r for r in store.search_runs([exp_id]) if r.info.run_id != parent]
    assert child.info.status == "FINISHED" and child.data.params == {"lr": "0.1"}
    assert [(m.step, m.value) for m in store.get_metric_history(child.info.run_id, "asr")] == [(1, 0.5), (2, 0.25)]
    again = TrackingQueue(f"sqlite:///{tmp_path}/mlflow.db", exp_dir, exp_id, parent)  # all marked done
    assert again.pending() == 0
    again.close()
    assert (exp_dir / JOURNAL_FILE).is_file()


def test_server_down_at_the_start_is_one_line_before_launch(tmp_path, monkeypatch, capsys):
    """Before launch the parent run must be created; a server that does not answer is one line and
    exit 2, and nothing is launched (after launch, nothing fails because of tracking)."""
    from secsweep.sweep import Sweep, grid, run

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    sweep = Sweep(name="down_sweep", trainable="badnets", fixed={"dataset": "digits"}, grid=grid(poison_ratio=[0.1]))
    code = run(sweep, ["--storage-path", str(tmp_path / "rr"), "--tracking-uri", f"http://127.0.0.1:{free_port()}"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --tracking-uri="), err
    assert not list((tmp_path / "rr").glob("down_sweep-*"))
