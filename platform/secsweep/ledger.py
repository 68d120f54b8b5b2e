"""The sweep's own record of what its trials did, written by the driver and read on --resume.

Tune's experiment snapshot is taken every few seconds, so after the driver is killed it can lag
behind what the driver already saw: a trial that finished (and was logged to MLflow as FINISHED)
may be restored as still running, and a running trial may be restored without its newest checkpoint
or as never started. The driver therefore appends, in the experiment folder and synced to disk
before it goes on, every trial completion (`completed.jsonl`: trial id, status, final metrics) and
every checkpoint (`checkpoints.jsonl`: trial id, checkpoint path, epoch). A restarted trial reads
both (the storage path is shared by all nodes, as the stage cache already requires): a completed
trial reports its recorded result at once, and any other resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
COMPLETED_FILE = "completed.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"


def append_record(path: Path, record: Mapping[str, Any], *, sync: bool = True) -> None:
    """Append one JSON line; with `sync` it is on disk when this returns (a killed driver keeps it).
    One short write to a file opened for appending: a crash can only tear the last line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        if sync:
            os.fsync(f.fileno())


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of `path`; a torn line (the driver was killed while writing it) is skipped."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: skipping a torn line", path)
    return out


def completed(exp_dir: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
    """trial_id -> {"status": FINISHED|FAILED, "result": final metrics, ...} of trials already done."""
    if not exp_dir:
        return {}
    return {r["trial_id"]: r for r in read_records(Path(exp_dir) / COMPLETED_FILE) if "trial_id" in r}


def record_completion(exp_dir: str | os.PathLike, trial_id: str, status: str, result: Mapping[str, Any],
                      **extra: Any) -> dict[str, Any]:
    record = {"trial_id": trial_id, "status": status, "result": dict(result), **extra}
    append_record(Path(exp_dir) / COMPLETED_FILE, record)
    return record


def record_checkpoint(exp_dir: str | os.PathLike, trial_id: str, path: str, epoch: Any) -> None:
    append_record(Path(exp_dir) / CHECKPOINTS_FILE, {"trial_id": trial_id, "path": path, "epoch": epoch})


def latest_checkpoint(exp_dir: str | os.PathLike | None, trial_id: str) -> str | None:
    """The newest checkpoint the driver saw for `trial_id` that still exists, or None."""
    if not exp_dir:
        return None
    paths = [r["path"] for r in read_records(Path(exp_dir) / CHECKPOINTS_FILE) if r.get("trial_id") == trial_id]
    for p in reversed(paths):  # num_to_keep deletes older ones; the newest is kept while the trial runs
        if "://" in p or Path(p).is_dir():
            return p
    return None
