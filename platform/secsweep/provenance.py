"""Provenance: which code produced a result (git commit, dirty tree) and which data it saw.

The sweep driver computes `current()` once and tags every MLflow parent and child run with it
(`git_commit`, `git_dirty`, and MLflow's own `mlflow.source.*` / `mlflow.user` tags that fill the
UI's Source and Version columns); stage manifests record it too. Where the code has no `.git`
(a Ray cluster: `ray up` syncs the repo with `.git` excluded), the information comes, in order, from

1. `$SECSWEEP_PROVENANCE`: JSON the driver puts into the Ray job's runtime_env, so every trial
   process sees the driver's answer;
2. `git` in the repository;
3. `.secsweep-provenance.json` at the repository root, written on the user's machine by
   `secsweep provenance --write` before `ray up` and carried to every node by cluster.yaml's
   file_mounts. It also records the code fingerprint of that moment: if the code on the node differs
   (edited after the file was written), the tree counts as dirty.

No ray or mlflow here: tracking.py turns these plain values into MLflow entities.
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
ENV = "SECSWEEP_PROVENANCE"          # JSON of Provenance.as_dict(), set by the driver for the trials
SWEEP_ENV = "SECSWEEP_SWEEP"         # the sweep's results folder name, set by the driver for the trials
FILE_NAME = ".secsweep-provenance.json"
FORWARDED_ENV = ("SECSWEEP_STAGE_LOCK_TIMEOUT_S",)  # driver environment variables trials also need
REPO_ROOT = Path(__file__).resolve().parents[2]  # platform/secsweep/provenance.py -> the repository
UNKNOWN = "unknown"

TAG_GIT_COMMIT = "git_commit"
TAG_GIT_DIRTY = "git_dirty"
TAG_PROVENANCE_SOURCE = "provenance_source"
# MLflow's system tags (mlflow.utils.mlflow_tags); the UI shows them as the run's Source and Version
MLFLOW_SOURCE_NAME = "mlflow.source.name"
MLFLOW_SOURCE_TYPE = "mlflow.source.type"
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
MLFLOW_USER = "mlflow.user"

# config fields that define which data a trial trains and evaluates on (the dataset input's digest)
DATA_FIELDS = ("dataset", "train_size", "image_size", "val_fraction", "clean_fraction", "seed",
               "target_dataset", "target_train_size")


@dataclass(frozen=True)
class Provenance:
    commit: str = UNKNOWN       # 40-hex git commit, or "unknown"
    dirty: bool | None = None   # uncommitted changes to tracked or untracked (not ignored) files; None: unknown
    source: str = "none"        # where it came from: git, env, file, none

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def run_tags(self, source_name: str = "") -> dict[str, str]:
        """MLflow tags of a parent or child run: ours and MLflow's system tags."""
        tags = {
            TAG_GIT_COMMIT: self.commit,
            TAG_GIT_DIRTY: UNKNOWN if self.dirty is None else str(self.dirty).lower(),
            TAG_PROVENANCE_SOURCE: self.source,
            MLFLOW_SOURCE_TYPE: "LOCAL",
            MLFLOW_USER: _user(),
        }
        if source_name:
            tags[MLFLOW_SOURCE_NAME] = source_name
        if self.commit != UNKNOWN:
            tags[MLFLOW_GIT_COMMIT] = self.commit
        return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers) and no $USER
        return UNKNOWN


def _git(args: list[str], root: Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def from_git(root: Path = REPO_ROOT) -> Provenance | None:
    """Commit and dirty flag from git, or None where `root` is not in a git work tree."""
    commit = (_git(["rev-parse", "HEAD"], root) or "").strip()
    if not commit:
        return None
    # our own provenance file is not a change to the code
    status = _git(["status", "--porcelain", "--", ".", f":(exclude){FILE_NAME}"], root)
    return Provenance(commit, None if status is None else bool(status.strip()), "git")


def from_env() -> Provenance | None:
    raw = os.environ.get(ENV)
    if not raw:
        return None
    try:
        d = json.loads(raw)
        return Provenance(str(d["commit"]), d.get("dirty"), "env")
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring unreadable $%s", ENV)
        return None


def _code_digest() -> str:
    from .stages import code_fingerprint  # the secsweep package; trainables via their modules

    files = dict(code_fingerprint().files)
    trainables = REPO_ROOT / "trainables"
    for p in sorted(trainables.rglob("*.py")) if trainables.is_dir() else []:
        if "__pycache__" not in p.parts:
            files[p.relative_to(REPO_ROOT).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


def from_file(root: Path = REPO_ROOT) -> Provenance | None:
    path = root / FILE_NAME
    try:
        d = json.loads(path.read_text())
        prov = Provenance(str(d["commit"]), d.get("dirty"), "file")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if d.get("code") and d["code"] != _code_digest():
        log.warning("%s: the code changed since the file was written; counting the tree as dirty", path)
        prov = Provenance(prov.commit, True, "file")
    return prov


def write_file(root: Path = REPO_ROOT) -> Path:
    """Write `.secsweep-provenance.json` from git (run before `ray up`); SecsweepError without git."""
    from .errors import SecsweepError

    prov = from_git(root)
    if prov is None:
        raise SecsweepError(f"provenance: {root} is not a git work tree (nothing to record)")
    path = root / FILE_NAME
    path.write_text(json.dumps({"commit": prov.commit, "dirty": prov.dirty, "code": _code_digest(),
                                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")
    return path


def compute(root: Path = REPO_ROOT) -> Provenance:
    """Provenance from the environment, git or the provenance file, in that order (not cached)."""
    return from_env() or from_git(root) or from_file(root) or Provenance()


@functools.lru_cache(maxsize=1)
def current() -> Provenance:
    """`compute()` once per process."""
    prov = compute()
    if prov.source == "none":
        log.warning("no git commit known: no .git, no $%s and no %s (run `secsweep provenance --write` "
                    "before `ray up`)", ENV, FILE_NAME)
    return prov


def script_name(path: str | os.PathLike) -> str:
    """A sweep script as runs name it (mlflow.source.name): relative to the repository if inside it."""
    p = Path(path).resolve() if path else Path("")
    try:
        return p.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(p)


def worker_env(sweep: str | None = None, prov: Provenance | None = None) -> dict[str, str]:
    """Environment variables the driver gives every trial process (Ray runtime_env env_vars)."""
    prov = prov or current()
    env = {ENV: json.dumps({"commit": prov.commit, "dirty": prov.dirty})}
    if sweep:
        env[SWEEP_ENV] = sweep
    for name in FORWARDED_ENV:  # settings the user gave the driver reach trials on every node too
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def sweep_label() -> str | None:
    """The sweep this process runs trials of (its results folder name), if a driver said so."""
    return os.environ.get(SWEEP_ENV) or None


def dataset_inputs(params: Mapping[str, Any]) -> list[dict[str, str]]:
    """The datasets a trial with resolved config `params` uses, as plain MLflow-dataset fields:
    name (e.g. `fashion_mnist/train`), digest (of the data-defining config fields), source, context."""
    dataset = params.get("dataset")
    if not dataset:
        return []
    data_cfg = {k: params[k] for k in DATA_FIELDS if k in params}
    digest = hashlib.sha256(json.dumps(data_cfg, sort_keys=True, default=str).encode()).hexdigest()[:20]
    source = json.dumps({"uri": f"secsweep-dataset:{dataset}", "config": data_cfg}, sort_keys=True, default=str)
    out = [{"name": f"{dataset}/{split}", "digest": digest, "source_type": "secsweep", "source": source,
            "context": context} for split, context in (("train", "training"), ("test", "evaluation"))]
    target = params.get("target_dataset")
    if target and target != dataset:
        out.append({"name": f"{target}/train", "digest": digest, "source_type": "secsweep", "source": source,
                    "context": "training"})
    return out
