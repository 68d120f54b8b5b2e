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

    def __call__(self, directory: Path):
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


def test_key_depends_on_stage_config_and_code_version():
    cfg = Cfg()
    assert stage_key("attack", cfg) == stage_key("attack", Cfg())
    assert stage_key("attack", cfg) != stage_key("defense", cfg)
    assert stage_key("attack", cfg) != stage_key("attack", Cfg(width=5))
    assert stage_key("attack", cfg) != stage_key("attack", cfg, code_version="2")


def test_code_version_change_recomputes(tmp_path):
    store, cfg = StageStore(tmp_path), Cfg()
    counter = Counter(cfg)
    store.get_or_compute("attack", cfg, counter)
    store.get_or_compute("attack", cfg, counter, code_version="2")
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

    def __call__(self, directory: Path):
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
