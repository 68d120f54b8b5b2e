"""secsweep.stages: cached stage artifacts computed once under a lock, verified on every read."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch

from secsweep.errors import ArtifactError
from secsweep.stages import MANIFEST, StageStore, save_tensors, stage_key, verify

torch.set_num_threads(1)


@dataclasses.dataclass(frozen=True)
class Cfg:
    width: int = 4
    scale: float = 1.0


def expected(cfg: Cfg) -> torch.Tensor:
    return torch.arange(cfg.width * cfg.width, dtype=torch.float32).reshape(cfg.width, cfg.width) * cfg.scale


class Counter:
    """A compute function that writes `model.safetensors` and counts its calls."""

    def __init__(self, cfg: Cfg):
        self.cfg = cfg
        self.calls = 0

    def __call__(self, directory: Path, workdir: Path | None = None):
        self.calls += 1
        save_tensors(directory, "model", {"w": expected(self.cfg), "b": torch.ones(3)})
        return {"acc": 0.5 * self.calls}, {"note": "hello"}


def get(store: StageStore, cfg: Cfg, counter: Counter):
    return store.get_or_compute("attack", cfg, counter)


def test_second_call_reuses(tmp_path):
    store, cfg = StageStore(tmp_path), Cfg()
    counter = Counter(cfg)
    first = get(store, cfg, counter)
    second = get(store, cfg, counter)
    assert counter.calls == 1
    assert first.path == second.path == store.path("attack", stage_key("attack", cfg))
    assert torch.equal(first.tensors("model")["w"], expected(cfg))
    assert torch.equal(second.tensors("model")["w"], first.tensors("model")["w"])
    assert torch.equal(second.tensors("model")["b"], torch.ones(3))
    assert second.metrics == {"acc": 0.5}
    assert second.meta == {"note": "hello"}
    assert second.manifest["config"] == {"width": 4, "scale": 1.0}
    assert set(second.manifest["files"]) == {"model.safetensors"}


def test_reuse_across_store_instances(tmp_path):
    cfg = Cfg()
    counter = Counter(cfg)
    get(StageStore(tmp_path), cfg, counter)
    out = get(StageStore(tmp_path), cfg, counter)
    assert counter.calls == 1 and torch.equal(out.tensors("model")["w"], expected(cfg))


def test_different_config_computes_again(tmp_path):
    store = StageStore(tmp_path)
    a, b = Cfg(), Cfg(scale=2.0)
    ca, cb = Counter(a), Counter(b)
    out_a = get(store, a, ca)
    out_b = get(store, b, cb)
    assert ca.calls == 1 and cb.calls == 1
    assert out_a.path != out_b.path
    assert torch.equal(out_b.tensors("model")["w"], expected(b))
    assert torch.equal(get(store, a, ca).tensors("model")["w"], expected(a))
    assert ca.calls == 1


def test_key_depends_on_stage_config_and_code():
    cfg = Cfg()
    assert stage_key("attack", cfg) == stage_key("attack", Cfg())
    assert stage_key("attack", cfg) != stage_key("defense", cfg)
    assert stage_key("attack", cfg) != stage_key("attack", Cfg(width=5))
    assert stage_key("attack", cfg) != stage_key("attack", cfg, code="2")


def test_code_change_recomputes(tmp_path):
    store, cfg = StageStore(tmp_path), Cfg()
    counter = Counter(cfg)
    store.get_or_compute("attack", cfg, counter)
    store.get_or_compute("attack", cfg, counter, code="2")
    assert counter.calls == 2


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8:] = b"\xff" * 8  # inside the tensor payload: the file still parses, only the hash tells
    path.write_bytes(bytes(data))


def test_corrupted_tensor_file_is_recomputed(tmp_path):
    store, cfg = StageStore(tmp_path), Cfg()
    counter = Counter(cfg)
    out = get(store, cfg, counter)
    _corrupt(out.path / "model.safetensors")
    with pytest.raises(ArtifactError, match="model.safetensors"):
        verify(out.path)
    again = get(store, cfg, counter)
    assert counter.calls == 2
    assert torch.equal(again.tensors("model")["w"], expected(cfg))
    verify(again.path)  # intact again


def test_truncated_tensor_file_is_recomputed(tmp_path):
    store, cfg = StageStore(tmp_path), Cfg()
    counter = Counter(cfg)
    out = get(store, cfg, counter)
    (out.path / "model.safetensors").write_bytes(b"garbage")
    again = get(store, cfg, counter)
    assert counter.calls == 2
    assert torch.equal(again.tensors("model")["w"], expected(cfg))


def test_missing_manifest_is_recomputed(tmp_path):
    store, cfg = StageStore(tmp_path), Cfg()
    counter = Counter(cfg)
    out = get(store, cfg, counter)
    (out.path / MANIFEST).unlink()
    again = get(store, cfg, counter)
    assert counter.calls == 2
    assert (again.path / MANIFEST).is_file()
    assert torch.equal(again.tensors("model")["w"], expected(cfg))


def test_unreadable_manifest_is_recomputed(tmp_path):
    store, cfg = StageStore(tmp_path), Cfg()
    counter = Counter(cfg)
    out = get(store, cfg, counter)
    (out.path / MANIFEST).write_text("{not json")
    get(store, cfg, counter)
    assert counter.calls == 2


def test_deleted_tensor_file_is_recomputed(tmp_path):
    store, cfg = StageStore(tmp_path), Cfg()
    counter = Counter(cfg)
    out = get(store, cfg, counter)
    (out.path / "model.safetensors").unlink()
    with pytest.raises(ArtifactError):
        verify(out.path)
    assert torch.equal(get(store, cfg, counter).tensors("model")["w"], expected(cfg))
    assert counter.calls == 2


def test_verify_raises_on_tampered_file_and_manifest(tmp_path):
    store, cfg = StageStore(tmp_path), Cfg()
    out = get(store, cfg, Counter(cfg))
    assert verify(out.path).manifest == out.manifest
    # tamper by rewriting valid tensors with other values
    save_tensors(out.path, "model", {"w": expected(cfg) + 1, "b": torch.ones(3)})
    with pytest.raises(ArtifactError):
        verify(out.path)
    with pytest.raises(ArtifactError, match="manifest"):
        verify(tmp_path / "does-not-exist")


def test_no_temp_dirs_left_behind(tmp_path):
    store, cfg = StageStore(tmp_path), Cfg()
    out = get(store, cfg, Counter(cfg))
    siblings = sorted(p.name for p in out.path.parent.iterdir())
    assert siblings == sorted([out.path.name, out.path.name + ".lock"]) or siblings == [out.path.name]
    assert json.loads((out.path / MANIFEST).read_text())["key"] == out.path.name


# ----------------------------------------------------------------------------- lock across processes


def _slow_compute_factory(counter_file: str):
    def compute(directory: Path):
        with open(counter_file, "a") as f:
            f.write(f"start {time.time()}\n")
        time.sleep(1.0)
        save_tensors(directory, "model", {"w": expected(Cfg())})
        with open(counter_file, "a") as f:
            f.write(f"end {time.time()}\n")
        return {}, {}

    return compute


class SlowCompute:
    """A module-level class, so it also pickles under the 'spawn' start method."""

    def __init__(self, counter_file: str):
        self.counter_file = counter_file

    def __call__(self, directory: Path, workdir: Path | None = None):
        return _slow_compute_factory(self.counter_file)(directory)


def _worker(root: str, counter_file: str, barrier, results) -> None:
    barrier.wait(timeout=30)  # both processes have imported everything: start together
    out = StageStore(root).get_or_compute("attack", Cfg(), SlowCompute(counter_file))
    w = out.tensors("model")["w"]
    results.put((str(out.path), bool(torch.equal(w, expected(Cfg()))), time.time()))


def test_concurrent_processes_compute_once(tmp_path):
    # fork: the workers inherit the imported torch; spawn/forkserver import torch again (about 3 s on
    # the shared CI box). Safe here: the parent runs torch single-threaded and the workers do no
    # parallel tensor work.
    ctx = mp.get_context("fork")
    counter_file = str(tmp_path / "calls.txt")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "store"), counter_file, barrier, results))
             for _ in range(2)]
    try:
        for p in procs:
            p.start()
        got = [results.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(timeout=10)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    lines = Path(counter_file).read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["start", "end"], lines  # compute ran exactly once
    end = float(lines[1].split()[1])
    assert got[0][0] == got[1][0]
    assert all(ok for _, ok, _ in got)
    # both returned only after the single compute had finished: the second waited on the lock
    assert all(t >= end for _, _, t in got)


# ----------------------------------------------------------------------------- code fingerprint

import os
import shutil
import signal
import subprocess
import sys

from secsweep import registry, stages
from secsweep.context import LocalContext
from secsweep.errors import SecsweepError
from secsweep.stages import (CHECKPOINT, StageLockTimeoutError, cleanup_temporaries,
                             code_fingerprint, read_usage)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_fingerprints():
    stages.clear_fingerprint_cache()
    yield
    stages.clear_fingerprint_cache()


def test_fingerprint_covers_package_and_imported_trainables(fresh_fingerprints):
    fp = code_fingerprint(["trainables.attacks.lf"])
    assert {"secsweep/stages.py", "secsweep/training.py", "secsweep/ops/triggers.py"} <= set(fp.files)
    # the trainable, its packages and the trainables module it imports (LF trains a clean surrogate)
    assert {"trainables/attacks/lf.py", "trainables/models/clean.py", "trainables/__init__.py",
            "trainables/attacks/__init__.py"} <= set(fp.files)
    assert "trainables/attacks/badnets.py" not in fp.files  # another attack's edit does not invalidate LF
    assert fp.files["secsweep/stages.py"] == stages.sha256_file(ROOT / "platform/secsweep/stages.py")
    assert code_fingerprint(["trainables.attacks.lf"]) == fp  # stable
    assert code_fingerprint(["trainables.attacks.badnets"]).digest != fp.digest


@dataclasses.dataclass(frozen=True)
class StageCfg:
    n: int = 3


CALLS: list[int] = []


def counting_stage(cfg: StageCfg, ctx) -> None:
    """A stage trainable (registered for these tests only) that counts its runs."""
    CALLS.append(1)
    ctx.save_output("model", {"w": torch.full((cfg.n,), float(len(CALLS)))})
    ctx.report({"epoch": 1, "acc": 0.5}, state={"epoch": 1})


@pytest.fixture
def counting_trainable(monkeypatch):
    registry.discover()
    spec = registry.TrainableSpec("counting_stage", "model", counting_stage, StageCfg, (), "", {})
    monkeypatch.setitem(registry._REGISTRY, "counting_stage", spec)
    CALLS.clear()
    return spec


def test_editing_source_recomputes_stage_and_unchanged_tree_reuses_it(tmp_path, monkeypatch, fresh_fingerprints,
                                                                        counting_trainable):
    pkg = tmp_path / "src" / "secsweep"
    shutil.copytree(ROOT / "platform/secsweep", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(stages, "PACKAGE_DIR", pkg)
    ctx = LocalContext(workdir=tmp_path / "trial", stage_root=tmp_path / "stages")

    first = ctx.stage("counting_stage", StageCfg())
    again = ctx.stage("counting_stage", StageCfg())
    stages.clear_fingerprint_cache()  # a new process, same files
    third = ctx.stage("counting_stage", StageCfg())
    assert len(CALLS) == 1 and first.path == again.path == third.path

    code = first.manifest["code"]
    assert code["fingerprint"] == code_fingerprint(["test_stages"]).digest
    assert code["files"]["secsweep/training.py"] == stages.sha256_file(pkg / "training.py")
    assert "test_stages.py" in code["files"]  # the trainable's own module
    assert first.manifest["config"] == {"n": 3} and "commit" in first.manifest["provenance"]

    with open(pkg / "training.py", "a") as f:  # an edit to the training loop
        f.write("\n# edited\n")
    stages.clear_fingerprint_cache()
    edited = ctx.stage("counting_stage", StageCfg())
    assert len(CALLS) == 2 and edited.path != first.path
    assert edited.manifest["code"]["files"]["secsweep/training.py"] != code["files"]["secsweep/training.py"]
    assert torch.equal(edited.tensors("model")["w"], torch.full((3,), 2.0))
    assert (first.path / MANIFEST).is_file()  # the old stage stays until `secsweep stages gc`


def test_usage_is_recorded_per_read(tmp_path, monkeypatch, counting_trainable):
    ctx = LocalContext(workdir=tmp_path / "trial", stage_root=tmp_path / "stages")
    monkeypatch.setenv("SECSWEEP_SWEEP", "sweep_a-1")
    out = ctx.stage("counting_stage", StageCfg())
    ctx.stage("counting_stage", StageCfg())
    monkeypatch.setenv("SECSWEEP_SWEEP", "sweep_b-2")
    ctx.stage("counting_stage", StageCfg())
    assert [u["sweep"] for u in read_usage(out.path)] == ["sweep_a-1", "sweep_a-1", "sweep_b-2"]
    assert out.manifest["sweep"] == "sweep_a-1"
    verify(out.path)  # the usage file is not part of the verified outputs


# ----------------------------------------------------------------------------- lock wait and timeout


def test_waiting_trial_logs_holder_and_times_out(tmp_path, caplog):
    store, cfg = StageStore(tmp_path), Cfg()
    key = stage_key("attack", cfg)
    (tmp_path / "attack").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); "
         "l.acquire(); print('held', flush=True); time.sleep(60)", str(store.path("attack", key)) + ".lock"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / "attack" / f"{key}.owner").write_text(json.dumps(
            {"host": "nodeA", "pid": holder.pid, "since": time.time(), "sweep": "sft_grid-1"}))
        counter = Counter(cfg)
        caplog.set_level("INFO", logger="secsweep.stages")
        t0 = time.monotonic()
        with pytest.raises(StageLockTimeoutError, match=rf"stage attack/{key}: still being computed by pid "
                                                        rf"{holder.pid} on nodeA \(sweep sft_grid-1\)"):
            store.get_or_compute("attack", cfg, counter, lock_timeout_s=1.0, poll_s=0.3)
        assert 1.0 <= time.monotonic() - t0 < 10
        assert counter.calls == 0
        waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting")]
        assert len(waits) >= 2 and all(f"attack/{key}" in w and str(holder.pid) in w for w in waits)
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock went with it, and the stage is computed
    assert store.get_or_compute("attack", cfg, Counter(cfg), lock_timeout_s=5).metrics == {"acc": 0.5}


def test_lock_timeout_from_environment(monkeypatch):
    monkeypatch.delenv("SECSWEEP_STAGE_LOCK_TIMEOUT_S", raising=False)
    assert stages.lock_timeout_from_env() == 6 * 3600
    monkeypatch.setenv("SECSWEEP_STAGE_LOCK_TIMEOUT_S", "90")
    assert stages.lock_timeout_from_env() == 90.0
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv("SECSWEEP_STAGE_LOCK_TIMEOUT_S", bad)
        with pytest.raises(SecsweepError, match="SECSWEEP_STAGE_LOCK_TIMEOUT_S"):
            stages.lock_timeout_from_env()


# ----------------------------------------------------------------------------- temporary folders


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftover_temporary_folders_are_cleaned_up(tmp_path):
    import socket

    store, cfg = StageStore(tmp_path), Cfg()
    key = stage_key("attack", cfg)
    sdir = tmp_path / "attack"
    host, dead = socket.gethostname(), _dead_pid()
    leftovers = [sdir / f"{key}.tmp-{dead}", sdir / f"{key}.tmp-{dead}-work",  # an older version's, same key
                 sdir / f"otherkey.tmp-{host}-{dead}",                       # a dead process's, another key
                 sdir / "finished.work"]                                    # a completed stage's work folder
    alive = [sdir / f"otherkey.tmp-{host}-{os.getpid()}",                    # a live process is writing it
             sdir / f"otherkey.tmp-elsewhere-{dead}",                        # another host: cannot tell
             sdir / "unfinished.work"]                                       # resume state of an unfinished stage
    for p in leftovers + alive:
        p.mkdir(parents=True)
        (p / "junk").write_text("x")
    (sdir / "finished").mkdir()
    (sdir / "finished" / MANIFEST).write_text("{}")
    store.get_or_compute("attack", cfg, Counter(cfg))  # computing a stage cleans its stage folder
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in alive)
    assert cleanup_temporaries(sdir) == []


# ----------------------------------------------------------------------------- resume after SIGKILL

KILLED_STAGE = """
import sys, time
sys.path[:0] = [sys.argv[2] + "/platform", sys.argv[2]]
import torch
torch.set_num_threads(1)
from secsweep import context
from trainables.attacks.badnets import Config
emit = context.LocalContext._emit

def slow_emit(self, metrics, state):  # leaves the test time to kill us between two epochs
    emit(self, metrics, state)
    time.sleep(1.5)

context.LocalContext._emit = slow_emit
ctx = context.LocalContext(workdir=sys.argv[1] + "/trial", stage_root=sys.argv[1] + "/stages")
ctx.stage("badnets", Config(**eval(sys.argv[3])))
print("finished", flush=True)
"""

BADNETS = {"dataset": "digits", "model": "smallcnn", "attack_epochs": 3, "attack_batch_size": 64}


def test_stage_killed_midway_resumes_from_its_last_epoch(tmp_path):
    from trainables.attacks.badnets import Config

    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'platform'}{os.pathsep}{ROOT}"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_STAGE, str(tmp_path), str(ROOT), repr(BADNETS)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "stages").glob(f"badnets/*.work/{CHECKPOINT}")):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert "finished" not in proc.stdout.read()
    (ckpt,) = (tmp_path / "stages").glob(f"badnets/*.work/{CHECKPOINT}")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["state"]["epoch"] == 1 and [h["epoch"] for h in saved["history"]] == [1]
    assert not list((tmp_path / "stages").glob(f"badnets/*/{MANIFEST}"))

    ctx = LocalContext(workdir=tmp_path / "trial2", stage_root=tmp_path / "stages")
    out = ctx.stage("badnets", Config(**BADNETS))
    assert out.path.name == ckpt.parent.name[: -len(".work")]  # the same stage key
    assert out.meta["resumed"] == {"reports": 1, "epoch": 1}   # continued at epoch 2, not from scratch
    assert [h["epoch"] for h in out.meta["history"]] == [1, 2, 3]
    assert not ckpt.parent.exists()  # the work folder goes once the stage is complete
    assert 0.0 <= out.metrics["asr"] <= 1.0
