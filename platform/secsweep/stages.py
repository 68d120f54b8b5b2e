"""Cached stage artifacts (DESIGN.md "Stages and their artifacts").

An upstream stage (e.g. training the backdoored model) runs once per distinct config and is reused
by every downstream trial, in this sweep and in later ones that share the storage path. Layout:

    <root>/<stage>/<key>/manifest.json     config, metrics, code version, sha256 of every file
    <root>/<stage>/<key>/<name>.safetensors
    <root>/<stage>/<key>.lock              held while the stage is computed

`key` hashes exactly the stage's config. The first trial to need a stage computes it under a file
lock; parallel trials block on the lock and then read the result. Every read re-hashes the files, and
a stage whose files do not match the manifest is recomputed, never silently used. Locks need a file
system shared by the trials (a local disk, or NFS on a cluster).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from . import __version__
from .config import to_dict
from .errors import ArtifactError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def stage_key(stage: str, cfg: Any, code_version: str = "1") -> str:
    """Hash of the stage name, its code version and its full config (20 hex digits)."""
    payload = json.dumps({"stage": stage, "code": code_version, "config": to_dict(cfg)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


class StageStore:
    """Stage artifacts under one root directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get_or_compute(
        self,
        stage: str,
        cfg: Any,
        compute: Callable[[Path], tuple[Mapping[str, float], Mapping[str, Any]]],
        *,
        code_version: str = "1",
    ) -> StageOutput:
        """Return the verified stage output for `cfg`, computing it with `compute(tmpdir)` if needed.

        `compute` writes its files into the directory it is given and returns (metrics, meta).
        """
        key = stage_key(stage, cfg, code_version)
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(final) + ".lock")
        if (final / MANIFEST).exists():
            try:  # fast path: no lock needed to read a finished stage
                return verify(final)
            except ArtifactError as e:
                log.warning("%s; recomputing", e)
        waited = time.monotonic()
        with lock:
            if time.monotonic() - waited > 1:
                log.info("waited %.0f s for stage %s/%s", time.monotonic() - waited, stage, key)
            if final.exists():
                try:
                    return verify(final)
                except ArtifactError as e:
                    log.warning("%s; recomputing", e)
                    shutil.rmtree(final)
            tmp = final.with_name(f"{key}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            start = time.time()
            metrics, meta = compute(tmp)
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {
                "stage": stage,
                "key": key,
                "code_version": code_version,
                "secsweep_version": __version__,
                "config": to_dict(cfg),
                "metrics": dict(metrics),
                "meta": dict(meta),
                "files": files,
                "seconds": round(time.time() - start, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            os.replace(tmp, final)
            return verify(final)
