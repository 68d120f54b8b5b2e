"""`secsweep stages list` and `secsweep stages gc` on a temporary stage store."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from secsweep.cli import main
from secsweep.stages import MANIFEST, USAGE, StageStore, save_tensors, stage_key

DAY = 86400.0


@dataclasses.dataclass(frozen=True)
class Cfg:
    width: int = 4


def _compute(outdir: Path, workdir: Path):
    save_tensors(outdir, "model", {"w": torch.zeros(256)})  # 1 KiB of float32 + header
    return {"acc": 1.0}, {}


def _backdate(path: Path, created_days: float, used_days: list[float]) -> None:
    """Make a stage look created `created_days` ago and read by sweeps `used_days` ago."""
    m = json.loads((path / MANIFEST).read_text())
    m["created_unix"] = time.time() - created_days * DAY
    (path / MANIFEST).write_text(json.dumps(m))
    lines = [json.dumps({"sweep": f"sft_grid-{i}", "time": time.time() - d * DAY}) for i, d in enumerate(used_days)]
    (path / USAGE).write_text("".join(line + "\n" for line in lines))


@pytest.fixture
def store(tmp_path):
    """Under <storage>/stages: `old` (10 days, never used), `stale` (10 days, last used 8 days ago),
    `fresh` (today, used by two sweeps), and an unfinished computation of width 9."""
    root = tmp_path / "rr" / "stages"
    s = StageStore(root)
    paths = {}
    for name, width in (("old", 1), ("stale", 2), ("fresh", 3)):
        paths[name] = s.get_or_compute("badnets", Cfg(width), _compute).path
    _backdate(paths["old"], 10, [])
    _backdate(paths["stale"], 10, [9, 8])
    _backdate(paths["fresh"], 0, [0.01, 0.0])
    work = s.work_path("badnets", stage_key("badnets", Cfg(9)))
    work.mkdir()
    (work / "checkpoint.pt").write_bytes(b"x" * 100)
    return tmp_path / "rr", paths, work


def _keys(out: str) -> set[str]:
    return set(re.findall(r"^(?:removed|would remove) \w+/(\w+) ", out, flags=re.M))


def test_list_shows_size_age_usage_and_config(store, capsys):
    storage, paths, work = store
    assert main(["stages", "list", "--storage-path", str(storage)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("badnets")}
    assert set(rows) == {p.name for p in paths.values()} | {work.name[: -len(".work")]}
    assert "ok" in rows[paths["old"].name] and "10.0 d" in rows[paths["old"].name]
    assert rows[paths["old"].name].rstrip().endswith("-") and "never" in rows[paths["old"].name]
    assert "sft_grid-0, sft_grid-1" in rows[paths["fresh"].name]
    assert "8.0 d" in rows[paths["stale"].name]  # last used
    assert "KiB" in rows[paths["fresh"].name]
    assert "partial" in rows[work.name[: -len(".work")]]
    assert "config: width=1" in out  # non-default fields (an unknown stage config: all of them)
    assert "4 entries" in out


def test_gc_older_than_dry_run_then_for_real(store, capsys):
    storage, paths, work = store
    assert main(["stages", "gc", "--storage-path", str(storage), "--older-than", "5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert _keys(out) == {paths["old"].name, paths["stale"].name} and "would remove" in out
    assert all(p.is_dir() for p in paths.values())  # dry run: nothing gone
    assert main(["stages", "gc", "--storage-path", str(storage), "--older-than", "5"]) == 0
    assert not paths["old"].exists() and not paths["stale"].exists()
    assert paths["fresh"].is_dir() and work.is_dir()


def test_gc_unused_and_unused_for(store, capsys):
    storage, paths, work = store
    assert main(["stages", "gc", "--storage-path", str(storage), "--unused"]) == 0
    assert not paths["old"].exists() and not work.exists()  # never read by a sweep
    assert paths["stale"].is_dir() and paths["fresh"].is_dir()
    assert main(["stages", "gc", "--storage-path", str(storage), "--unused-for", "3"]) == 0
    assert not paths["stale"].exists() and paths["fresh"].is_dir()


def test_gc_skips_a_stage_being_computed_and_cleans_temporaries(store, capsys):
    storage, paths, work = store
    leftover = paths["old"].parent / f"{paths['old'].name}.tmp-999999999"  # pid beyond pid_max: dead
    leftover.mkdir()
    lock = FileLock(str(paths["old"]) + ".lock")
    with lock:
        assert main(["stages", "gc", "--storage-path", str(storage), "--older-than", "5"]) == 0
    out = capsys.readouterr().out
    assert f"skipped badnets/{paths['old'].name}: locked" in out
    assert paths["old"].is_dir() and not paths["stale"].exists() and not leftover.exists()


def test_gc_needs_a_criterion(store, capsys):
    storage, _, _ = store
    assert main(["stages", "gc", "--storage-path", str(storage)]) == 2
    assert "give at least one of" in capsys.readouterr().err
    assert main(["stages", "gc", "--storage-path", str(storage), "--older-than", "-1"]) == 2


def test_list_of_an_empty_store(tmp_path, capsys):
    assert main(["stages", "list", "--storage-path", str(tmp_path)]) == 0
    assert "no cached stages" in capsys.readouterr().out
