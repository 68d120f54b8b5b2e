"""secsweep.data: tiny fixtures in the real on-disk formats, loaded through the public API."""

from __future__ import annotations

import gzip
import os
import pathlib
import pickle
import struct

import numpy as np
import pytest
import torch

from secsweep import data
from secsweep.errors import ConfigError, DatasetMissingError, SecsweepError

SYSTEM_FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------- fixture writers


def write_idx(path: pathlib.Path, array: np.ndarray, compress: bool) -> None:
    """idx: 0, 0, type 0x08 (uint8), ndim, big-endian uint32 dims, uint8 payload."""
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def write_fmnist(directory: pathlib.Path, n_train: int = 20, n_test: int = 6, compress: bool = True, seed: int = 0):
    """Fashion-MNIST idx files; returns the train (images, labels) written."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels, compress)
        out[prefix] = (images, labels)
    return out["train"]


def write_cifar10(root: pathlib.Path, per_batch: int = 3) -> dict[str, np.ndarray]:
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(1)
    first = None
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch = {
            "batch_label": name,
            "data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            "labels": [(i + j) % 10 for j in range(per_batch)],
            "filenames": [f"img{j}.png" for j in range(per_batch)],
        }
        first = first or batch
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
    (directory / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(c) for c in range(10)]}))
    return first


def write_cifar100(root: pathlib.Path, n_train: int = 7, n_test: int = 4) -> None:
    directory = root / "cifar-100-python"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "fine_labels": [99 - j for j in range(n)],
            "coarse_labels": [j % 20 for j in range(n)],
        }
        (directory / name).write_bytes(pickle.dumps(batch, protocol=4))
    (directory / "meta").write_bytes(pickle.dumps({"fine_label_names": [str(c) for c in range(100)]}))


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No SECSWEEP_DATA, an empty user cache, no system locations, an empty decode cache."""
    monkeypatch.delenv("SECSWEEP_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(data, "_SYSTEM_ROOTS", (str(tmp_path / "system"),))
    data._clear_cache()
    yield tmp_path
    data._clear_cache()


# ----------------------------------------------------------------------------- fashion-mnist / idx


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx_gz_and_plain(isolated, compress):
    root = isolated / "root"
    images, labels = write_fmnist(root / "fashion-mnist", compress=compress)
    ds = data.load("fashion_mnist", "train", root)
    assert len(ds) == 20 and ds.shape == (1, 28, 28) and ds.num_classes == 10 and ds.name == "fashion_mnist"
    assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
    assert torch.allclose(ds.images[:, 0], torch.from_numpy(images).float() / 255)
    assert len(data.load("fashion_mnist", "test", root)) == 6


@pytest.mark.parametrize("layout", ["fashion_mnist", "FashionMNIST/raw"])
def test_fashion_mnist_other_layouts(isolated, layout):
    write_fmnist(isolated / "root" / layout, n_train=5)
    data.check_available("fashion_mnist", isolated / "root")
    assert len(data.load("fashion_mnist", root=isolated / "root")) == 5


def test_fashion_mnist_root_is_the_dataset_dir(isolated):
    write_fmnist(isolated / "fashion-mnist", n_train=4)
    assert len(data.load("fashion_mnist", root=isolated / "fashion-mnist")) == 4


def test_corrupt_idx_raises_one_line(isolated):
    directory = isolated / "root" / "fashion-mnist"
    write_fmnist(directory, compress=False)
    (directory / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")  # says 5, has 1
    with pytest.raises(SecsweepError, match="train-labels-idx1-ubyte") as info:
        data.load("fashion_mnist", root=isolated / "root")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not SYSTEM_FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_system_location(tmp_path, monkeypatch):
    monkeypatch.delenv("SECSWEEP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ds = data.load("fashion_mnist", "train")
    assert len(ds) == 60000 and ds.shape == (1, 28, 28) and ds.num_classes == 10
    assert torch.equal(torch.bincount(ds.labels), torch.full((10,), 6000))  # balanced, labels 0..9


# ----------------------------------------------------------------------------- search order


def test_search_order_explicit_then_env_then_cache(isolated, monkeypatch):
    explicit, env, cache = isolated / "explicit", isolated / "env", isolated / "xdg" / "secsweep" / "data"
    write_fmnist(explicit / "fashion-mnist", n_train=3)
    write_fmnist(env / "fashion-mnist", n_train=4)
    write_fmnist(cache / "fashion-mnist", n_train=5)
    monkeypatch.setenv("SECSWEEP_DATA", str(env))
    assert data.data_roots(explicit) == [explicit, env, cache, isolated / "system"]
    assert len(data.load("fashion_mnist", root=explicit)) == 3
    assert len(data.load("fashion_mnist")) == 4
    monkeypatch.delenv("SECSWEEP_DATA")
    assert len(data.load("fashion_mnist")) == 5


def test_user_cache_defaults_to_home(isolated, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.data_roots()[0] == isolated / "home" / ".cache" / "secsweep" / "data"
    write_fmnist(isolated / "home" / ".cache" / "secsweep" / "data" / "fashion-mnist", n_train=2)
    assert len(data.load("fashion_mnist")) == 2


def test_system_location_is_searched_last(isolated):
    write_fmnist(isolated / "system" / "fashion-mnist", n_train=6)
    assert data.data_roots()[-1] == isolated / "system"
    assert len(data.load("fashion_mnist")) == 6


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "svhn", "gtsrb"])
def test_missing_dataset_is_one_line(isolated, name):
    with pytest.raises(DatasetMissingError) as info:
        data.check_available(name, isolated / "nowhere")
    message = str(info.value)
    assert "\n" not in message and name in message and str(isolated / "nowhere") in message
    assert "--download" in message
    if name == "fashion_mnist":
        assert "apt-get install dataset-fashion-mnist" in message and "SECSWEEP_DATA" in message
    with pytest.raises(DatasetMissingError):
        data.load(name, "test", isolated / "nowhere")


def test_unknown_names_and_options_raise_config_error():
    with pytest.raises(ConfigError, match="mnist_typo.*fashion_mnist, digits, cifar10"):
        data.load("mnist_typo")
    with pytest.raises(ConfigError, match="must be one of"):
        data.check_available("imagenet")
    with pytest.raises(ConfigError, match="split='val'.*train, test"):
        data.load("digits", "val")
    with pytest.raises(ConfigError, match="image_size"):
        data.load("digits", image_size=0)
    with pytest.raises(ConfigError, match="channels"):
        data.load("digits", channels=2)
    with pytest.raises(ConfigError):
        data.num_classes("nope")


def test_num_classes_and_native_shape_cover_every_dataset():
    for name in data.DATASETS:
        assert data.num_classes(name) >= 10
        assert len(data.native_shape(name)) == 3
    assert data.num_classes("cifar100") == 100 and data.num_classes("gtsrb") == 43
    assert data.native_shape("stl10") == (3, 96, 96)


# ----------------------------------------------------------------------------- cifar


def test_cifar10_pickle_batches(isolated):
    first = write_cifar10(isolated / "root")
    data.check_available("cifar10", isolated / "root")
    train = data.load("cifar10", "train", isolated / "root")
    test = data.load("cifar10", "test", isolated / "root")
    assert len(train) == 15 and len(test) == 3 and train.shape == (3, 32, 32) and train.num_classes == 10
    assert train.labels[:3].tolist() == first["labels"]
    expected = torch.from_numpy(first["data"][0].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(train.images[0], expected)
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0


def test_cifar100_fine_labels(isolated):
    write_cifar100(isolated / "root")
    train = data.load("cifar100", "train", isolated / "root")
    assert len(train) == 7 and train.num_classes == 100 and train.labels.tolist() == [99, 98, 97, 96, 95, 94, 93]
    assert len(data.load("cifar100", "test", isolated / "root")) == 4


def test_cifar_pickle_cannot_run_code(isolated):
    write_cifar10(isolated / "root")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (isolated / "root" / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(SecsweepError, match="not allowed"):
        data.load("cifar10", "test", isolated / "root")


# ----------------------------------------------------------------------------- svhn / stl10 / gtsrb


def test_svhn_mat(isolated):
    scipy_io = pytest.importorskip("scipy.io")
    directory = isolated / "root" / "svhn"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for split, n in (("train", 5), ("test", 3)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [2], [9], [10]][:n], dtype=np.uint8)
        scipy_io.savemat(directory / f"{split}_32x32.mat", {"X": x, "y": y})
        if split == "train":
            x_train = x
    ds = data.load("svhn", "train", isolated / "root")
    assert len(ds) == 5 and ds.shape == (3, 32, 32) and ds.labels.tolist() == [0, 1, 2, 9, 0]
    assert torch.allclose(ds.images[1, 2], torch.from_numpy(x_train[:, :, 2, 1]).float() / 255)  # (H, W) of image 1, blue


def test_stl10_binary(isolated):
    directory = isolated / "root" / "stl10_binary"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(4)
    for split, n in (("train", 2), ("test", 3)):
        images = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)
        images.transpose(0, 1, 3, 2).tofile(directory / f"{split}_X.bin")  # STL-10 stores columns first
        np.arange(1, n + 1, dtype=np.uint8).tofile(directory / f"{split}_y.bin")  # labels 1..10 on disk
        if split == "train":
            expected = images
    ds = data.load("stl10", "train", isolated / "root")
    assert ds.shape == (3, 96, 96) and ds.labels.tolist() == [0, 1]
    assert torch.equal((ds.images * 255).round().to(torch.uint8), torch.from_numpy(expected))


def test_gtsrb_folders_resized(isolated):
    from PIL import Image

    base = isolated / "root" / "gtsrb" / "GTSRB"
    for class_id, size in ((0, (40, 35)), (2, (50, 52))):
        folder = base / "Training" / f"{class_id:05d}"
        folder.mkdir(parents=True)
        Image.new("RGB", size, (255, 0, 0)).save(folder / "00000_00000.ppm")
    test_dir = base / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    Image.new("RGB", (30, 31), (0, 255, 0)).save(test_dir / "00000.ppm")
    (isolated / "root" / "gtsrb" / "GT-final_test.csv").write_text(
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n00000.ppm;30;31;5;5;25;26;42\n"
    )
    data.check_available("gtsrb", isolated / "root")
    train = data.load("gtsrb", "train", isolated / "root")
    assert train.shape == (3, 32, 32) and train.labels.tolist() == [0, 2] and train.num_classes == 43
    assert torch.allclose(train.images[:, 0], torch.ones(2, 32, 32))  # pure red stays pure red
    test = data.load("gtsrb", "test", isolated / "root", image_size=48)
    assert test.shape == (3, 48, 48) and test.labels.tolist() == [42]


# ----------------------------------------------------------------------------- digits, transforms, cache


def test_digits_split_is_fixed_and_disjoint():
    train, test = data.load("digits", "train"), data.load("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert train.shape == (1, 8, 8) and train.num_classes == 10 and set(train.labels.tolist()) == set(range(10))
    assert 0.0 <= train.images.min() and train.images.max() == 1.0
    flat_train = {tuple(x) for x in train.images.flatten(1).tolist()}
    flat_test = [tuple(x) for x in test.images.flatten(1).tolist()]
    assert sum(x in flat_train for x in flat_test) < 10  # the dataset has a few duplicate images, no more
    from sklearn.datasets import load_digits

    index = np.random.default_rng(0).permutation(1797)[1437:]
    assert test.labels.tolist() == load_digits().target[index].tolist()


def test_resize_and_channels():
    grey = data.load("digits", "test", image_size=16, channels=3)
    assert grey.shape == (3, 16, 16) and grey.images.dtype == torch.float32
    assert torch.equal(grey.images[:, 0], grey.images[:, 2]) and 0.0 <= grey.images.min() and grey.images.max() <= 1.0
    same = data.load("digits", "test", channels=1)
    assert same.shape == (1, 8, 8)


def test_colour_to_grey_averages(isolated):
    write_cifar10(isolated / "root")
    colour = data.load("cifar10", "test", isolated / "root")
    grey = data.load("cifar10", "test", isolated / "root", channels=1, image_size=28)
    assert grey.shape == (1, 28, 28)
    unresized = data.load("cifar10", "test", isolated / "root", channels=1)
    assert torch.allclose(unresized.images[:, 0], colour.images.mean(dim=1))


def test_loads_are_independent_copies():
    first = data.load("digits", "test")
    first.images.zero_()
    first.labels.fill_(3)
    second = data.load("digits", "test")
    assert second.images.max() == 1.0 and set(second.labels.tolist()) == set(range(10))


def test_imageset_subset_and_validation():
    ds = data.load("digits", "test")
    sub = ds.subset(torch.tensor([0, 2, 4]))
    assert len(sub) == 3 and sub.shape == (1, 8, 8) and sub.num_classes == 10
    assert torch.equal(sub.labels, ds.labels[[0, 2, 4]])
    assert len(ds.subset(ds.labels == 1)) == int((ds.labels == 1).sum())
    with pytest.raises(ValueError, match="labels.shape"):
        data.ImageSet(torch.zeros(2, 1, 8, 8), torch.zeros(3, dtype=torch.int64), 10, "x")


# ----------------------------------------------------------------------------- downloads (faked: tests are offline)


def test_download_goes_to_first_root_once(isolated, monkeypatch):
    calls = []

    def fake_download(name, target):
        calls.append((name, target))
        write_cifar10(target)

    monkeypatch.setattr(data, "_download_unlocked", fake_download)
    monkeypatch.setenv("SECSWEEP_DATA", str(isolated / "env"))
    data.check_available("cifar10", download=True)
    assert calls == [("cifar10", isolated / "env")]
    assert len(data.load("cifar10", "test", download=True)) == 3
    assert len(calls) == 1  # found on disk the second time


def test_failed_download_is_one_line(isolated, monkeypatch):
    def no_internet(name, target):
        raise OSError("[Errno -3] Temporary failure in name resolution\nsecond line")

    monkeypatch.setattr(data, "_download_unlocked", no_internet)
    with pytest.raises(DatasetMissingError, match="cifar100.*download into.*failed") as info:
        data.load("cifar100", root=isolated / "root", download=True)
    assert "\n" not in str(info.value)
