"""Cached stage artifacts (docs/design.md "Stages and their artifacts").

An upstream stage (e.g. training the backdoored model) runs once per distinct config *and code* and
is reused by every downstream trial, in this sweep and in later ones that share the storage path.
Layout under `<root>/<stage>/`:

    <key>/manifest.json     config, code fingerprint (a sha256 per source file), provenance,
                            metrics, sha256 of every output file
    <key>/<name>.safetensors
    <key>/usage.jsonl       one line per sweep trial that read the stage (for `secsweep stages`)
    <key>.lock              held while the stage is computed; <key>.owner says by whom
    <key>.work/             the computation in progress: `checkpoint.pt` (the last epoch's resume
                            state), `out/` (files being written); removed once the stage is done

`key` hashes the stage name, its full config and the fingerprint of the code that computes it: the
`secsweep` package and the trainable's module with every `trainables.*` module it imports, so an
edit to a trigger, the training loop or a model recomputes the stage instead of reusing stale
weights. The first trial to need a stage computes it under a file lock; parallel trials block on the
lock (logging what they wait for, failing after `lock_timeout_s`) and then read the result. A
computation killed midway leaves its `.work/` folder behind, and the next attempt resumes from its
last checkpoint. Every read re-hashes the files, and a stage whose files do not match the manifest is
recomputed, never silently used. Locks need a file system shared by the trials (a local disk, or NFS
on a cluster).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file

from . import __version__
from .config import to_dict
from .errors import ArtifactError, SecsweepError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
USAGE = "usage.jsonl"
CHECKPOINT = "checkpoint.pt"      # inside <key>.work/: the resume state of the last epoch
WORK_SUFFIX = ".work"
TMP_MARK = ".tmp-"                # <key>.tmp-<host>-<pid>: temporary folders (older versions used .tmp-<pid>)
LOCK_TIMEOUT_ENV = "SECSWEEP_STAGE_LOCK_TIMEOUT_S"
DEFAULT_LOCK_TIMEOUT_S = 6 * 3600.0   # a 200-epoch backdoor on one GPU takes hours; waiting longer means a hang
LOCK_POLL_S = 60.0                    # how often a waiting trial logs what it waits for

PACKAGE_DIR = Path(__file__).resolve().parent   # platform/secsweep: hashed into every stage key
TRAINABLES_PACKAGE = "trainables"


class StageLockTimeoutError(SecsweepError):
    """A stage stayed locked (computed by another trial) longer than the configured timeout."""


def lock_timeout_from_env() -> float:
    """Seconds a trial waits for another trial's stage computation ($SECSWEEP_STAGE_LOCK_TIMEOUT_S)."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise SecsweepError(f"{LOCK_TIMEOUT_ENV}={raw!r}: must be a number of seconds > 0") from None
    if not value > 0:
        raise SecsweepError(f"{LOCK_TIMEOUT_ENV}={raw!r}: must be a number of seconds > 0")
    return value


# -- code fingerprint -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Fingerprint:
    """sha256 over the source files a stage's code consists of."""

    digest: str
    files: Mapping[str, str] = field(default_factory=dict)  # relative path -> sha256 of its bytes

    def as_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.digest, "files": dict(self.files)}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _package_digests(package_dir: str) -> tuple[tuple[str, str], ...]:
    root = Path(package_dir)
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    return tuple((f"{root.name}/{p.relative_to(root).as_posix()}", sha256_file(p)) for p in files)


def _origin(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _imported_modules(module: str, path: Path) -> set[str]:
    """Names of the modules `path` (the source of `module`) imports, resolved to absolute names."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return found


@functools.lru_cache(maxsize=None)
def _module_files(module: str) -> tuple[tuple[str, str], ...]:
    """(module name, file) of `module`, its parent packages and every `trainables.*` module it
    imports, transitively."""
    out: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        path = _origin(name)
        if path is None:
            continue
        out[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages' __init__.py run too
        todo += [m for m in _imported_modules(name, path)
                 if m == TRAINABLES_PACKAGE or m.startswith(TRAINABLES_PACKAGE + ".")]
    return tuple(sorted((n, str(p)) for n, p in out.items()))


def _module_relpath(name: str, path: str) -> str:
    p = Path(path)
    stem = name.replace(".", "/")
    return f"{stem}/__init__.py" if p.name == "__init__.py" else f"{stem}.py"


def code_fingerprint(modules: Iterable[str] = ()) -> Fingerprint:
    """Fingerprint of the `secsweep` package plus `modules` (a trainable's module, with the
    `trainables.*` modules it imports). Files are hashed once per process (cached)."""
    files = dict(_package_digests(str(PACKAGE_DIR)))
    for module in sorted(set(modules)):
        for name, path in _module_files(module):
            files[_module_relpath(name, path)] = _file_digest(path)
    payload = json.dumps(sorted(files.items()))
    return Fingerprint(hashlib.sha256(payload.encode()).hexdigest(), files)


@functools.lru_cache(maxsize=None)
def _file_digest(path: str) -> str:
    return sha256_file(Path(path))


def clear_fingerprint_cache() -> None:
    """Forget hashed files (tests; a long-lived process that reloads code)."""
    _package_digests.cache_clear()
    _module_files.cache_clear()
    _file_digest.cache_clear()


def stage_key(stage: str, cfg: Any, code: Fingerprint | str = "") -> str:
    """Hash of the stage name, the fingerprint of its code and its full config (20 hex digits)."""
    digest = code.digest if isinstance(code, Fingerprint) else str(code)
    payload = json.dumps({"stage": stage, "code": digest, "config": to_dict(cfg)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


# -- reading --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StageOutput:
    """A verified stage directory: its manifest and its tensors."""

    path: Path
    manifest: dict[str, Any]

    @property
    def metrics(self) -> dict[str, float]:
        return self.manifest.get("metrics", {})

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.get("meta", {})

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / f"{name}.safetensors"))


def save_tensors(directory: Path, name: str, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write tensors as `<directory>/<name>.safetensors` (contiguous CPU copies)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    return path


def verify(directory: Path) -> StageOutput:
    """Read a stage directory, checking every file against the manifest; ArtifactError if not intact."""
    mpath = directory / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"stage {directory}: unreadable manifest ({e})") from None
    for fname, digest in manifest.get("files", {}).items():
        fpath = directory / fname
        if not fpath.is_file() or sha256_file(fpath) != digest:
            raise ArtifactError(f"stage {directory}: file {fname} is missing or does not match its sha256")
    return StageOutput(directory, manifest)


def read_usage(directory: Path) -> list[dict[str, Any]]:
    """The usage records of a stage directory (one per trial that read it); bad lines are skipped."""
    try:
        lines = (directory / USAGE).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash: the others still count
    return out


def record_usage(directory: Path, sweep: str) -> None:
    """Append that `sweep` (the sweep's results folder name) read this stage. Under a lock of its
    own, so concurrent trials (also over NFS, where O_APPEND is not atomic) never interleave lines."""
    line = json.dumps({"sweep": sweep, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()})
    with FileLock(str(directory / (USAGE + ".lock")), timeout=60):
        with open(directory / USAGE, "a") as f:
            f.write(line + "\n")


# -- temporaries ----------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _tmp_owner(name: str) -> tuple[str | None, int] | None:
    """(host, pid) of a `<key>.tmp-<host>-<pid>[...]` folder name (host None for the old
    `<key>.tmp-<pid>` form), or None if `name` is not a temporary folder."""
    if TMP_MARK not in name:
        return None
    tail = name.split(TMP_MARK, 1)[1]
    tail = tail[: -len("-work")] if tail.endswith("-work") else tail
    host, _, pid = tail.rpartition("-")
    if not pid.isdigit():
        return None
    return (host or None), int(pid)


def cleanup_temporaries(stage_dir: Path, *, locked_key: str | None = None) -> list[Path]:
    """Remove temporary folders under one stage's directory that no live process is writing:

    - `<key>.tmp-<host>-<pid>` of a dead process on this host (or any, for `locked_key`, whose
      lock the caller holds; also the older `<key>.tmp-<pid>` folders);
    - `<key>.work` of a stage that has since been completed.
    Returns the removed paths."""
    removed: list[Path] = []
    if not stage_dir.is_dir():
        return removed
    here = socket.gethostname()
    for p in stage_dir.iterdir():
        if not p.is_dir():
            continue
        owner = _tmp_owner(p.name)
        if owner is not None:
            host, pid = owner
            mine = locked_key is not None and p.name.startswith(locked_key + TMP_MARK)
            dead = (host in (None, here)) and not _pid_alive(pid)
            if mine or dead:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        elif p.name.endswith(WORK_SUFFIX):
            key = p.name[: -len(WORK_SUFFIX)]
            if (stage_dir / key / MANIFEST).is_file():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    for p in removed:
        log.info("removed leftover temporary stage folder %s", p)
    return removed


# -- the store ------------------------------------------------------------------------------------

class StageStore:
    """Stage artifacts under one root directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def work_path(self, stage: str, key: str) -> Path:
        """Where a computation of the stage keeps its checkpoint (stable across attempts)."""
        return self.root / stage / (key + WORK_SUFFIX)

    def _acquire(self, lock: FileLock, stage: str, key: str, owner_file: Path, timeout_s: float,
                 poll_s: float) -> None:
        start = time.monotonic()
        while True:
            remaining = timeout_s - (time.monotonic() - start)
            try:
                lock.acquire(timeout=max(0.0, min(poll_s, remaining)))
                return
            except Timeout:
                waited = time.monotonic() - start
                holder = _describe_owner(owner_file, self.work_path(stage, key))
                if waited >= timeout_s:
                    raise StageLockTimeoutError(
                        f"stage {stage}/{key}: still being computed by {holder} after {waited:.0f} s; "
                        f"raise {LOCK_TIMEOUT_ENV} (now {timeout_s:g} s) if that computation is alive, "
                        f"else remove {lock.lock_file}") from None
                log.info("waiting %.0f s for stage %s/%s, computed by %s", waited, stage, key, holder)

    def get_or_compute(
        self,
        stage: str,
        cfg: Any,
        compute: Callable[[Path, Path], tuple[Mapping[str, float], Mapping[str, Any]]],
        *,
        code: Fingerprint | str = "",
        usage: str | None = None,
        provenance: Mapping[str, Any] | None = None,
        lock_timeout_s: float | None = None,
        poll_s: float = LOCK_POLL_S,
    ) -> StageOutput:
        """Return the verified stage output for `cfg` and `code`, computing it if needed.

        `compute(outdir, workdir)` writes its files into `outdir` (fresh on every attempt) and may
        keep resume state in `workdir` (kept across attempts until the stage is complete); it returns
        (metrics, meta). `usage` (a sweep's results folder name) is recorded for `secsweep stages`.
        Waiting for another process's computation fails after `lock_timeout_s` seconds (default
        $SECSWEEP_STAGE_LOCK_TIMEOUT_S, else 6 h) with StageLockTimeoutError.
        """
        key = stage_key(stage, cfg, code)
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        out = self._read(final) if (final / MANIFEST).exists() else None  # fast path: no lock to read
        if out is None:
            out = self._compute(stage, key, cfg, compute, code, usage, provenance,
                                lock_timeout_from_env() if lock_timeout_s is None else lock_timeout_s, poll_s)
        if usage:
            try:
                record_usage(out.path, usage)
            except (OSError, Timeout) as e:  # bookkeeping only: never fail a trial over it
                log.warning("could not record usage of stage %s/%s: %s", stage, key, e)
        return out

    @staticmethod
    def _read(final: Path) -> StageOutput | None:
        try:
            return verify(final)
        except ArtifactError as e:
            log.warning("%s; recomputing", e)
            return None

    def _compute(self, stage, key, cfg, compute, code, usage, provenance, timeout_s, poll_s) -> StageOutput:
        final = self.path(stage, key)
        lock = FileLock(str(final) + ".lock")
        owner_file = final.with_name(key + ".owner")
        waited = time.monotonic()
        self._acquire(lock, stage, key, owner_file, timeout_s, poll_s)
        try:
            if time.monotonic() - waited > 1:
                log.info("waited %.0f s for stage %s/%s", time.monotonic() - waited, stage, key)
            if final.exists():
                done = self._read(final)
                if done is not None:
                    return done
                shutil.rmtree(final)
            owner_file.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                              "since": time.time(), "sweep": usage}))
            cleanup_temporaries(final.parent, locked_key=key)
            work = self.work_path(stage, key)
            outdir = work / "out"
            shutil.rmtree(outdir, ignore_errors=True)  # half-written files of a killed attempt
            outdir.mkdir(parents=True)
            start = time.time()
            metrics, meta = compute(outdir, work)
            files = {p.name: sha256_file(p) for p in sorted(outdir.iterdir()) if p.is_file()}
            fingerprint = code if isinstance(code, Fingerprint) else Fingerprint(str(code))
            manifest = {
                "stage": stage,
                "key": key,
                "code": fingerprint.as_dict(),
                "secsweep_version": __version__,
                "config": to_dict(cfg),
                "provenance": dict(provenance or {}),
                "sweep": usage,
                "metrics": dict(metrics),
                "meta": dict(meta),
                "files": files,
                "seconds": round(time.time() - start, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "created_unix": time.time(),
            }
            (outdir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            os.replace(outdir, final)
            shutil.rmtree(work, ignore_errors=True)
            return verify(final)
        finally:
            owner_file.unlink(missing_ok=True)
            lock.release()


def _describe_owner(owner_file: Path, work: Path) -> str:
    """Who computes a stage and how far it got, for the log of a trial waiting on it."""
    try:
        info = json.loads(owner_file.read_text())
        who = f"pid {info.get('pid')} on {info.get('host')}"
        if info.get("sweep"):
            who += f" (sweep {info['sweep']})"
        who += f" for {time.time() - float(info.get('since', time.time())):.0f} s"
    except (OSError, ValueError, TypeError):
        who = "another process"
    ckpt = work / CHECKPOINT
    if ckpt.is_file():
        who += f", last checkpoint {time.time() - ckpt.stat().st_mtime:.0f} s ago"
    return who
