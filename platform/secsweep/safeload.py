"""Loading third-party weights, which are hostile until proven otherwise.

`load_weights(path)` returns a flat ``{name: Tensor}`` dict and never executes code from the file:

* ``.safetensors`` — read by `safetensors.torch.load_file` (a JSON header and raw buffers);
* ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` — only through ``torch.load(weights_only=True)``, whose
  unpickler admits tensors, containers and primitives and refuses every other global (a
  ``__reduce__`` that calls ``os.system`` is refused before it runs);
* ``.h5`` / ``.hdf5`` (Keras) — the numeric datasets only, read as arrays with h5py; attributes
  (where Keras keeps ``model_config`` and where pickled objects could hide) are never read;
* ``.tar`` / ``.zip`` — a torch.save file (itself a zip holding ``data.pkl``) goes through
  ``torch.load(weights_only=True)``; a real archive is extracted only after every member path is
  checked (no ``..``, no absolute path, no link or device), and must hold exactly one weights file.

What a file *is* is decided by its bytes, not its name: a torch pickle named ``.safetensors`` is
refused as mislabelled; a safetensors file named ``.pt`` is read as safetensors (that path runs no
code whatever the name says). Every format other than safetensors is converted once into a
content-addressed cache (``<cache>/<sha256 of the source>/weights.safetensors``, with
``convert.json`` recording the source's and the converted file's sha256), and later loads read the
converted file. A ``sha256`` given by a model card is checked before the file is parsed.

Every refusal is one line: ``weights=<file>: refused: <why>; accepted: <formats>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import torch

from .errors import ArtifactError

log = logging.getLogger(__name__)

ACCEPTED = ".safetensors, .pt/.pth (weights_only tensors), .h5/.hdf5 (arrays)"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
HDF5_SUFFIXES = (".h5", ".hdf5", ".keras_h5")
ARCHIVE_SUFFIXES = (".tar", ".zip", ".tgz", ".tar.gz")
CONVERTED = "weights.safetensors"
RECORD = "convert.json"
CACHE_ENV = "SECSWEEP_ZOO_CACHE"

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_SAFETENSORS_HEADER = 100 * 2**20  # bytes: safetensors itself refuses larger headers
MAX_EXTRACT_BYTES = 16 * 2**30  # bytes an archive may extract to (decompression bombs are refused)


class WeightsRefused(ArtifactError):
    """A weights file that is not accepted (format, content, archive members or sha256)."""


def refuse(path: Path | str, why: str) -> NoReturn:
    """Raise the one-line refusal naming the file, the reason and what is accepted."""
    why = " ".join(str(why).split())  # one line, whatever the underlying error printed
    raise WeightsRefused(f"weights={path}: refused: {why}; accepted: {ACCEPTED}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """$SECSWEEP_ZOO_CACHE, else ~/.cache/secsweep/zoo."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "secsweep" / "zoo"


# -- what the bytes say ---------------------------------------------------------------------------

def sniff(path: Path) -> str:
    """The format the file's bytes show: safetensors, torch-zip, zip, hdf5, tar, gzip, pickle or unknown."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(_HDF5_MAGIC):
        return "hdf5"
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip" if _is_torch_zip(path) else "zip"
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:  # pickle PROTO opcode (torch legacy format)
        return "pickle"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= _MAX_SAFETENSORS_HEADER and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def _is_torch_zip(path: Path) -> bool:
    """torch.save's zip layout: every member under one folder that holds data.pkl."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    tops = {n.split("/", 1)[0] for n in names}
    return len(tops) == 1 and f"{next(iter(tops))}/data.pkl" in names


# -- readers ------------------------------------------------------------------------------------

def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError derives from Exception only; any failure is a refusal
        refuse(path, f"not a readable safetensors file (truncated or corrupt: {e})")


def _flatten(obj: Any, prefix: str, out: dict[str, torch.Tensor], dropped: list[str]) -> None:
    """Nested dicts/lists of tensors -> {"a.b.0": tensor}; other leaves (epoch counters, names) dropped."""
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, dropped)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}" if prefix else str(i), out, dropped)
    else:
        dropped.append(prefix or "<root>")


def _unpickler_reason(e: Exception) -> str:
    """The informative part of torch's multi-line weights_only error (not its advice to turn it off)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # prefer the line that names what was refused; never relay the advice to disable the check
    picked = next((ln for ln in lines if "nsupported" in ln), None) or next(
        (ln for ln in lines if "weights_only" not in ln and not ln.startswith(("Weights only", "Check the", "Please"))), "")
    return picked.split(". ", 1)[0].rstrip(".") or type(e).__name__


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: the restricted unpickler refuses every global that is not a tensor type,
        # container or primitive, so a __reduce__ payload is refused before anything runs
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refuse(path, f"torch.load(weights_only=True) refused its pickle ({_unpickler_reason(e)})")
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError) as e:
        refuse(path, f"not a readable torch weights file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    tensors: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    _flatten(obj, "", tensors, dropped)
    if not tensors:
        refuse(path, "holds no tensors")
    if dropped:
        log.info("%s: ignored %d non-tensor entries (%s)", path, len(dropped), ", ".join(dropped[:5]))
    return tensors


def _read_hdf5(path: Path) -> dict[str, torch.Tensor]:
    """Keras HDF5: numeric datasets as {"<layer>/<weight>": tensor}; attributes are never read.

    Keras keeps a layer's weights at ``model_weights/<layer>/<scope>/<weight>:0``; the key is the
    layer and the weight's own name (``conv2d_1/kernel``). Files without ``model_weights`` (weights
    saved alone) give every dataset by its path. Optimizer state is skipped."""
    try:
        import h5py
        import numpy as np
    except ImportError:  # pragma: no cover - h5py is a declared dependency
        refuse(path, "reading HDF5 needs h5py (pip install h5py)")
    out: dict[str, torch.Tensor] = {}
    try:
        with h5py.File(path, "r") as h:
            root = h["model_weights"] if "model_weights" in h else h
            found: list[tuple[str, Any]] = []

            def visit(name: str, item: Any) -> None:
                if isinstance(item, h5py.Dataset):
                    found.append((name, item))

            root.visititems(visit)
            for name, ds in found:
                if name.startswith("optimizer_weights"):
                    continue
                if not (np.issubdtype(ds.dtype, np.number) or ds.dtype == np.bool_):
                    log.info("%s: skipped non-numeric dataset %s (%s)", path, name, ds.dtype)
                    continue
                parts = name.split("/")
                leaf = parts[-1].split(":")[0]
                key = f"{parts[0]}/{leaf}" if root is not h and len(parts) >= 2 else "/".join(parts[:-1] + [leaf])
                if key in out:  # two weights of one layer share a leaf name: keep the full path
                    key = "/".join(parts[:-1] + [leaf])
                out[key] = torch.from_numpy(np.array(ds[()]))
    except OSError as e:
        refuse(path, f"not a readable HDF5 file ({str(e).splitlines()[0]})")
    if not out:
        refuse(path, "HDF5 file holds no numeric datasets")
    return out


def _check_members(path: Path, members: list[tuple[str, str]]) -> None:
    """members: (name, kind) with kind file/dir/link/other; refuse traversal, absolute paths, links."""
    for name, kind in members:
        p = PurePosixPath(name.replace("\\", "/"))
        if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
            refuse(path, f"archive member {name!r} has an absolute path")
        if ".." in p.parts:
            refuse(path, f"archive member {name!r} escapes the archive (..)")
        if kind == "link":
            refuse(path, f"archive member {name!r} is a link")
        if kind == "other":
            refuse(path, f"archive member {name!r} is not a regular file or folder")


def _check_size(path: Path, total: int) -> None:
    if total > MAX_EXTRACT_BYTES:
        refuse(path, f"archive would extract {total} bytes, more than the {MAX_EXTRACT_BYTES}-byte limit")


def _extract_archive(path: Path, fmt: str, into: Path) -> Path:
    """Extract a checked tar/zip into `into`; return its single weights file."""
    if fmt in ("tar", "gzip"):
        try:
            with tarfile.open(path, "r:*") as t:
                infos = t.getmembers()
                _check_members(path, [(m.name, "file" if m.isfile() else "dir" if m.isdir()
                                       else "link" if (m.issym() or m.islnk()) else "other") for m in infos])
                _check_size(path, sum(m.size for m in infos if m.isfile()))
                for m in infos:
                    if m.isdir():
                        (into / m.name).mkdir(parents=True, exist_ok=True)
                        continue
                    target = into / m.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = t.extractfile(m)
                    assert src is not None  # regular file, checked above
                    with src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except (tarfile.TarError, EOFError, OSError) as e:
            refuse(path, f"not a readable tar archive ({e})")
    else:
        try:
            with zipfile.ZipFile(path) as z:
                infos = z.infolist()
                kinds = []
                for i in infos:
                    mode = (i.external_attr >> 16) & 0xFFFF
                    kind = ("dir" if i.is_dir() else "link" if stat.S_ISLNK(mode)
                            else "file" if (mode == 0 or stat.S_ISREG(mode)) else "other")
                    kinds.append((i.filename, kind))
                _check_members(path, kinds)
                _check_size(path, sum(i.file_size for i in infos))
                for i in infos:
                    target = into / i.filename
                    if i.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(i) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        except (zipfile.BadZipFile, OSError) as e:
            refuse(path, f"not a readable zip archive ({e})")
    weights = [p for p in sorted(into.rglob("*")) if p.is_file() and _suffix(p) in
               (".safetensors",) + TORCH_SUFFIXES + HDF5_SUFFIXES]
    if len(weights) != 1:
        refuse(path, f"archive must hold exactly one weights file, found {len(weights)}"
               + (f" ({', '.join(str(w.relative_to(into)) for w in weights[:5])})" if weights else ""))
    return weights[0]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".tar.gz" if name.endswith(".tar.gz") else path.suffix.lower()


# -- the entry point ----------------------------------------------------------------------------

def _parse(path: Path, scratch: Path, depth: int = 0) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, format) of a file that is not already a safetensors cache entry."""
    suffix = _suffix(path)
    if suffix not in (".safetensors",) + TORCH_SUFFIXES + HDF5_SUFFIXES + ARCHIVE_SUFFIXES:
        refuse(path, f"unknown extension {suffix or '(none)'!r}")
    fmt = sniff(path)
    if fmt == "safetensors":
        if suffix != ".safetensors":
            log.warning("%s: the content is safetensors although the name says %s; read as safetensors", path, suffix)
        return _read_safetensors(path), "safetensors"
    if suffix == ".safetensors":
        if fmt == "unknown":
            refuse(path, "not a readable safetensors file (truncated or corrupt header)")
        refuse(path, f"mislabelled: named .safetensors but the content is {fmt}")
    if suffix in HDF5_SUFFIXES:
        if fmt != "hdf5":
            refuse(path, f"mislabelled: named {suffix} but the content is {fmt}")
        return _read_hdf5(path), "hdf5"
    if fmt in ("torch-zip", "pickle"):
        return _read_torch(path), "torch"
    if fmt in ("tar", "zip", "gzip") and suffix in ARCHIVE_SUFFIXES + TORCH_SUFFIXES:
        if depth > 0:
            refuse(path, "nested archives are not accepted")
        into = scratch / "extracted"
        into.mkdir(parents=True, exist_ok=True)
        inner = _extract_archive(path, fmt, into)
        return _parse(inner, scratch, depth + 1)
    if fmt == "hdf5":
        refuse(path, f"mislabelled: named {suffix} but the content is hdf5")
    refuse(path, f"content is {fmt}, not a weights format")


def load_weights(path: str | os.PathLike, *, sha256: str | None = None,
                 cache_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, read without executing anything from it (see the module doc).

    `sha256`: the expected digest of `path` (a model card's), checked first; a mismatch is refused.
    `cache_dir`: where non-safetensors files are converted once (default `default_cache_dir()`)."""
    path = Path(path)
    if not path.is_file():
        refuse(path, "no such file")
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256.lower():
        refuse(path, f"sha256 {digest} does not match the expected {sha256.lower()}")
    if _suffix(path) == ".safetensors" and sniff(path) == "safetensors":
        return _read_safetensors(path)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = cache / digest
    converted = entry / CONVERTED
    record = entry / RECORD
    if converted.is_file() and record.is_file():
        try:
            meta = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
        if meta.get("source_sha256") == digest and meta.get("safetensors_sha256") == sha256_file(converted):
            return _read_safetensors(converted)
        log.warning("%s: cached conversion %s does not match its record; converting again", path, converted)
    entry.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=entry, prefix=".scratch-") as scratch:
        tensors, fmt = _parse(path, Path(scratch))
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # no shared storage
        tmp = Path(scratch) / CONVERTED
        from safetensors.torch import save_file

        save_file(tensors, str(tmp))
        converted_digest = sha256_file(tmp)
        os.replace(tmp, converted)  # atomic: concurrent workers converting the same file agree
    tmp_record = entry / f".{RECORD}.{os.getpid()}"
    tmp_record.write_text(json.dumps({"source": str(path), "source_sha256": digest, "format": fmt,
                                      "safetensors_sha256": converted_digest, "tensors": len(tensors)},
                                     indent=1, sort_keys=True))
    os.replace(tmp_record, record)
    log.info("%s (%s, sha256 %s) converted to %s (sha256 %s)", path, fmt, digest, converted, converted_digest)
    return tensors


def conversion_record(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The cache's record of `path`'s conversion (source and converted sha256), or None."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    record = cache / sha256_file(Path(path)) / RECORD
    return json.loads(record.read_text()) if record.is_file() else None
