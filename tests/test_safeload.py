"""Hostile weights: a corpus of malicious and broken files, built in tmp_path (nothing executable is
committed), each refused with one line and none of it run; and the accepted formats read correctly."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from secsweep import safeload
from secsweep.safeload import WeightsRefused, load_weights

torch.set_num_threads(1)


class _RunsCode:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:  # an arbitrary class: weights_only refuses to rebuild it
    def __init__(self):
        self.w = torch.ones(2)


def _one_line_refusal(excinfo, path: Path, *words: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"weights={path}: refused: "), msg
    assert msg.endswith("accepted: .safetensors, .pt/.pth (weights_only tensors), .h5/.hdf5 (arrays)"), msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(4, 1, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g)}


# -- code execution ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,protocol", [("evil.pt", 2), ("evil.pth", 4), ("evil.bin", 2)])
def test_raw_pickle_with_reduce_is_refused_and_never_runs(tmp_path, cache, name, protocol):
    marker = tmp_path / "PWNED"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"w": _RunsCode(marker)}, protocol=protocol))
    with pytest.raises(WeightsRefused) as e:
        load_weights(path, cache_dir=cache)
    msg = _one_line_refusal(e, path, "torch.load(weights_only=True) refused its pickle")
    assert "weights_only` set to `False`" not in msg  # torch's advice to disable the check is not relayed
    if protocol == 2:
        assert "posix.system" in msg, msg
    assert not marker.exists()
    # the payload is real: an unrestricted unpickler would have run it
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_torch_save_with_reduce_payload_is_refused_and_never_runs(tmp_path, cache):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(1), "payload": _RunsCode(marker)}, path)  # torch's zip format
    assert safeload.sniff(path) == "torch-zip"
    with pytest.raises(WeightsRefused) as e:
        load_weights(path, cache_dir=cache)
    _one_line_refusal(e, path, "weights_only=True")
    assert not marker.exists()


def test_torch_save_of_a_custom_class_is_refused(tmp_path, cache):
    path = tmp_path / "custom.pt"
    torch.save({"model": _Custom()}, path)
    with pytest.raises(WeightsRefused) as e:
        load_weights(path, cache_dir=cache)
    _one_line_refusal(e, path, "weights_only=True", "_Custom")


def test_pickle_named_safetensors_is_refused_as_mislabelled(tmp_path, cache):
    marker = tmp_path / "PWNED"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(_RunsCode(marker), protocol=4))
    with pytest.raises(WeightsRefused) as e:
        load_weights(path, cache_dir=cache)
    _one_line_refusal(e, path, "mislabelled", "pickle")
    assert not marker.exists()


def test_unknown_extension_is_refused_unread(tmp_path, cache):
    marker = tmp_path / "PWNED"
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(_RunsCode(marker), protocol=4))
    with pytest.raises(WeightsRefused) as e:
        load_weights(path, cache_dir=cache)
    _one_line_refusal(e, path, "unknown extension '.pkl'")
    assert not marker.exists()
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))


# -- archives -------------------------------------------------------------------------------------

def _tar_with(path: Path, name: str, data: bytes = b"x", *, symlink_to: str | None = None) -> None:
    with tarfile.open(path, "w") as t:
        info = tarfile.TarInfo(name)
        if symlink_to is not None:
            info.type = tarfile.SYMTYPE
            info.linkname = symlink_to
            t.addfile(info)
        else:
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("member,why", [
    ("../evil", "escapes the archive (..)"),
    ("ok/../../evil", "escapes the archive (..)"),
    ("/tmp/secsweep-evil-absolute", "absolute path"),
])
def test_tar_with_traversal_or_absolute_member_is_refused(tmp_path, cache, member, why):
    work = tmp_path / "work"
    work.mkdir()
    path = work / "weights.tar"
    _tar_with(path, member)
    with pytest.raises(WeightsRefused) as e:
        load_weights(path, cache_dir=cache)
    _one_line_refusal(e, path, why)
    assert not (tmp_path / "evil").exists() and not (work / "evil").exists()
    assert not Path("/tmp/secsweep-evil-absolute").exists()
    assert not (cache / "evil").exists() and not (cache.parent / "evil").exists()
    assert not list(cache.rglob("evil"))


def test_tar_with_symlink_is_refused(tmp_path, cache):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    path = tmp_path / "weights.tar"
    _tar_with(path, "model.pt", symlink_to=str(outside))
    with pytest.raises(WeightsRefused) as e:
        load_weights(path, cache_dir=cache)
    _one_line_refusal(e, path, "is a link")
    assert not [p for p in cache.rglob("*") if p.is_symlink()]
    assert outside.read_text() == "secret"


def test_zip_with_traversal_is_refused(tmp_path, cache):
    path = tmp_path / "weights.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("../evil", b"x")
    with pytest.raises(WeightsRefused) as e:
        load_weights(path, cache_dir=cache)
    _one_line_refusal(e, path, "escapes the archive")
    assert not (tmp_path / "evil").exists() and not list(cache.rglob("evil"))


def test_tar_holding_a_malicious_pickle_is_extracted_then_refused(tmp_path, cache):
    marker = tmp_path / "PWNED"
    path = tmp_path / "bundle.tar"
    _tar_with(path, "inner/model.pt", pickle.dumps(_RunsCode(marker), protocol=4))
    with pytest.raises(WeightsRefused) as e:
        load_weights(path, cache_dir=cache)
    msg = str(e.value)
    assert "\n" not in msg and "model.pt: refused: torch.load(weights_only=True)" in msg, msg
    assert not marker.exists()
    assert not list(cache.rglob("model.pt"))  # the scratch extraction is gone


def test_clean_tar_of_one_safetensors_file_is_read(tmp_path, cache):
    inner = tmp_path / "w.safetensors"
    save_file(_state(), str(inner))
    path = tmp_path / "bundle.tar"
    with tarfile.open(path, "w") as t:
        t.add(inner, arcname="model/w.safetensors")
    got = load_weights(path, cache_dir=cache)
    assert set(got) == set(_state()) and torch.equal(got["conv.weight"], _state()["conv.weight"])


# -- truncated and mislabelled --------------------------------------------------------------------

def test_truncated_safetensors_is_refused(tmp_path, cache):
    whole = tmp_path / "whole.safetensors"
    save_file(_state(), str(whole))
    data = whole.read_bytes()
    for cut, name in [(len(data) - 7, "cut_data.safetensors"), (20, "cut_header.safetensors"), (4, "cut_len.safetensors")]:
        path = tmp_path / name
        path.write_bytes(data[:cut])
        with pytest.raises(WeightsRefused) as e:
            load_weights(path, cache_dir=cache)
        _one_line_refusal(e, path, "safetensors")


def test_truncated_torch_file_is_refused(tmp_path, cache):
    whole = tmp_path / "whole.pt"
    torch.save(_state(), whole)
    path = tmp_path / "cut.pt"
    path.write_bytes(whole.read_bytes()[:300])
    with pytest.raises(WeightsRefused) as e:
        load_weights(path, cache_dir=cache)
    _one_line_refusal(e, path)


def test_pt_renamed_safetensors_is_refused_as_mislabelled(tmp_path, cache):
    path = tmp_path / "model.safetensors"
    torch.save(_state(), path)
    with pytest.raises(WeightsRefused) as e:
        load_weights(path, cache_dir=cache)
    _one_line_refusal(e, path, "mislabelled", "torch-zip")


def test_safetensors_renamed_pt_is_read_as_safetensors(tmp_path, cache):
    """Decision: the bytes decide; reading safetensors runs no code whatever the name says."""
    path = tmp_path / "model.pt"
    save_file(_state(), str(path))
    got = load_weights(path, cache_dir=cache)
    assert torch.equal(got["conv.bias"], _state()["conv.bias"])


def test_hdf5_named_pt_and_pt_named_h5_are_refused(tmp_path, cache):
    h5 = tmp_path / "model.pt"
    with h5py.File(h5, "w") as f:
        f["w"] = np.ones(3, dtype=np.float32)
    with pytest.raises(WeightsRefused) as e:
        load_weights(h5, cache_dir=cache)
    _one_line_refusal(e, h5, "mislabelled", "hdf5")
    pt = tmp_path / "model.h5"
    torch.save(_state(), pt)
    with pytest.raises(WeightsRefused) as e:
        load_weights(pt, cache_dir=cache)
    _one_line_refusal(e, pt, "mislabelled")


# -- HDF5 -----------------------------------------------------------------------------------------

def test_hdf5_arrays_are_read_and_pickled_attributes_ignored(tmp_path, cache):
    marker = tmp_path / "PWNED"
    path = tmp_path / "keras.h5"
    kernel = np.arange(3 * 3 * 1 * 4, dtype=np.float32).reshape(3, 3, 1, 4)
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps({"class_name": "Lambda", "config": {"function": "os.system"}})
        f.attrs["evil"] = np.void(pickle.dumps(_RunsCode(marker), protocol=4))
        g = f.create_group("model_weights/conv2d_1/conv2d_1")
        g["kernel:0"] = kernel
        g["bias:0"] = np.zeros(4, dtype=np.float32)
        g.attrs["evil"] = np.void(pickle.dumps(_RunsCode(marker), protocol=4))
        f["model_weights/conv2d_1"].attrs["weight_names"] = [b"conv2d_1/kernel:0", b"conv2d_1/bias:0"]
        f["optimizer_weights/Adam/conv2d_1/kernel/m:0"] = np.ones_like(kernel)
        f.create_dataset("model_weights/notes/text", data=np.array([b"hello"], dtype=object),
                         dtype=h5py.string_dtype())
    got = load_weights(path, cache_dir=cache)
    assert set(got) == {"conv2d_1/kernel", "conv2d_1/bias"}  # optimizer state and strings left out
    assert torch.equal(got["conv2d_1/kernel"], torch.from_numpy(kernel))
    assert not marker.exists()


def test_hdf5_without_model_weights_group_gives_dataset_paths(tmp_path, cache):
    path = tmp_path / "plain.hdf5"
    with h5py.File(path, "w") as f:
        f["dense/kernel:0"] = np.ones((2, 3), dtype=np.float32)
    assert set(load_weights(path, cache_dir=cache)) == {"dense/kernel"}


# -- sha256 and the conversion cache --------------------------------------------------------------

def test_sha256_mismatch_is_refused_before_parsing(tmp_path, cache):
    path = tmp_path / "model.safetensors"
    save_file(_state(), str(path))
    right = safeload.sha256_file(path)
    assert set(load_weights(path, sha256=right, cache_dir=cache)) == set(_state())
    wrong = "0" * 64
    with pytest.raises(WeightsRefused) as e:
        load_weights(path, sha256=wrong, cache_dir=cache)
    _one_line_refusal(e, path, f"sha256 {right} does not match the expected {wrong}")


def test_pt_is_converted_once_to_safetensors_with_both_digests(tmp_path, cache):
    path = tmp_path / "model.pth"
    torch.save({"state_dict": _state(), "epoch": 7}, path)
    first = load_weights(path, cache_dir=cache)
    assert set(first) == {"state_dict.conv.weight", "state_dict.conv.bias"}  # non-tensor leaves dropped
    record = safeload.conversion_record(path, cache)
    src = safeload.sha256_file(path)
    converted = cache / src / safeload.CONVERTED
    assert record["source_sha256"] == src and record["format"] == "torch"
    assert record["safetensors_sha256"] == safeload.sha256_file(converted)
    assert safeload.sniff(converted) == "safetensors"
    # the second load reads the converted file (left untouched), not the pickle
    mtime = converted.stat().st_mtime_ns
    second = load_weights(path, cache_dir=cache)
    assert converted.stat().st_mtime_ns == mtime
    assert all(torch.equal(first[k], second[k]) for k in first)
    # a tampered conversion is not trusted: it is converted again
    converted.write_bytes(b"garbage")
    third = load_weights(path, cache_dir=cache)
    assert all(torch.equal(first[k], third[k]) for k in first)
    assert safeload.sha256_file(converted) == record["safetensors_sha256"]


def test_missing_file_is_one_line(tmp_path, cache):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsRefused) as e:
        load_weights(path, cache_dir=cache)
    _one_line_refusal(e, path, "no such file")


def test_archive_larger_than_the_extraction_limit_is_refused_unextracted(tmp_path, cache, monkeypatch):
    inner = tmp_path / "w.safetensors"
    save_file(_state(), str(inner))
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w") as t:
        t.add(inner, arcname="w.safetensors")
    monkeypatch.setattr(safeload, "MAX_EXTRACT_BYTES", inner.stat().st_size - 1)  # a lower limit, same code path
    with pytest.raises(WeightsRefused) as e:
        load_weights(path, cache_dir=cache)
    _one_line_refusal(e, path, "more than the", "byte limit")
    assert not list(cache.rglob("w.safetensors"))
