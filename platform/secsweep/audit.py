"""The shared core of every audit of a model (SecurityNet-style audits; docs/methods.md, "Audits of
public models").

An audit attacks or inspects one classifier it did not train: a model trained here (the `clean`
model stage, the default) or a published registry model (the `zoo` model stage, `secsweep.zoo`:
`--set model=zoo:NAME` (or `--set model=zoo --set model.name=NAME`), or `{"trainable": "zoo", "name": NAME}` in a sweep). Its
config extends `AuditConfig`, whose `model` field is a stage reference of kind "model".

`load_target(cfg, ctx)` gives the audit everything it needs of that model as a `Target`: the module
(eval mode, on the trial's device, parameters frozen), its model card, and its data taken from the
MODEL STAGE'S config (dataset, train_size, image_size, channels, val_fraction, seed), split as
`secsweep.backdoor.load_split` splits it:

* `members`    — the stage's "train" split: what a `clean` model trained on;
* `nonmembers` — the dataset's test split;
* `val`        — the stratified hold-out of the training data (neither trained on nor reported).

For a registry model the "train" split is the named dataset's training split here, not the
publisher's (often unstated) training set: membership there means "from the training distribution
split", which is what SecurityNet's adversary assumes of public models too (it holds part of the
training set). docs/zoo.md says, per card, what is known of that set.

Each model's weights and data are loaded once per process: targets are cached (least recently used,
`CACHE_SIZE` of them) under the stage's output folder (its key covers config and code), the device
and the data root, so a worker that runs several audits of a model pays once. Audits must not
modify the cached module (its parameters do not require gradients; FGSM takes gradients with
respect to the input only).

`model_facts(target)` are the card-like columns every audit reports with its own metrics (the
correlation analysis joins on them): train and test accuracy and the overfit gap measured here on
the members / non-members, the parameter count, whether it is a registry model, and for registry
models the card's year, venue and architecture (0 / "" / the architecture for models trained here).
Numeric facts are metrics (`FACT_METRICS`, declared by every audit); string facts (`FACT_STRINGS`)
ride along in the same report (results tables keep them; MLflow's metrics skip strings).
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import data as data_mod
from . import refs
from .artifacts import ModelCard
from .backdoor import load_split
from .config import require
from .names import EPOCH
from .ops.metrics import accuracy
from .refs import StageRef
from .training import predict, probabilities

MODEL_KINDS = ("model",)
# the default audited model: a clean small CNN on the offline MNIST digits (4,000 training images
# less the 10 % validation hold-out), the data of the registry's MNIST CNN. Measured on this 2-core
# machine (shared): 5 epochs at SGD lr 0.05, batch 64 train in about 30 s to train / test accuracy
# 0.968 / 0.945; the `clean` stage's own defaults (3 epochs, lr 0.01, batch 128) reach only 0.51.
DEFAULT_MODEL = {"dataset": "mnist", "model": "smallcnn", "epochs": 5, "lr": 0.05, "batch_size": 64}
DEFAULT_MAX_SAMPLES = 2000   # images per split an audit uses at most (0 = all)
FACTS_MAX_SAMPLES = 10_000   # images per split the train / test accuracy of model_facts is measured on
CACHE_SIZE = 4               # targets (weights + data) kept per process

# numeric facts (metrics)
TRAIN_ACC = "train_acc"             # accuracy on the members (the stage's training split)
TEST_ACC = "test_acc"               # accuracy on the non-members (the dataset's test split)
OVERFIT_GAP = "overfit_gap"         # TRAIN_ACC - TEST_ACC (SecurityNet's overfitting level)
NUM_PARAMS = "num_params"           # parameters of the module
YEAR = "year"                       # publication year of a registry model; 0 for a model trained here
IS_ZOO = "is_zoo"                   # 1.0 for a registry model, 0.0 for one trained here
MODEL_TRAIN_SIZE = "model_train_size"  # member images (the training split the facts are measured on)
# string facts
MODEL_NAME = "model_name"           # the registry name, or the trainable that trained it ("clean")
ARCH = "arch"                       # architecture (secsweep.models name)
VENUE = "venue"                     # where a registry model was published; "" for a model trained here
DATASET = "model_dataset"           # the data the model is audited on

FACT_METRICS = (TRAIN_ACC, TEST_ACC, OVERFIT_GAP, NUM_PARAMS, YEAR, IS_ZOO, MODEL_TRAIN_SIZE)
FACT_STRINGS = (MODEL_NAME, ARCH, VENUE, DATASET)


def default_model() -> StageRef:
    return StageRef("clean", DEFAULT_MODEL)


def zoo_model(name: str, **options: Any) -> StageRef:
    """The stage reference of the registry model `name` (its data options, e.g. train_size)."""
    return StageRef("zoo", {"name": name, **options})


@dataclass(frozen=True)
class AuditConfig:
    """Fields every audit has. Subclasses call `super().__post_init__()` first."""

    # the audited classifier: a model stage (`clean` trains one, `zoo` loads a registry model)
    model: StageRef = field(default_factory=default_model)
    max_samples: int = DEFAULT_MAX_SAMPLES   # images per split the audit uses at most, 0 = all
    seed: int = 0                            # the audit's own seed (subsets, attack models)

    def __post_init__(self) -> None:
        refs.check(self, "model", kinds=MODEL_KINDS)
        require(self.max_samples >= 0, "max_samples", self.max_samples, "must be >= 0 (0 = all)")


@dataclass
class Target:
    """The audited model and its data (see the module docstring). Do not modify `module`."""

    module: nn.Module
    card: ModelCard
    ref: StageRef
    config: Any                  # the model stage's config (cfg.model.config())
    members: data_mod.ImageSet   # the stage's training split
    nonmembers: data_mod.ImageSet  # the dataset's test split
    val: data_mod.ImageSet       # the training data's validation hold-out
    device: torch.device
    zoo_card: Any = None         # the secsweep.zoo.ZooCard of a registry model, else None
    stage_metrics: dict = field(default_factory=dict)  # the model stage's last report
    _facts: dict = field(default_factory=dict, repr=False)
    _probs: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.zoo_card.name if self.zoo_card is not None else self.ref.trainable

    @property
    def dataset(self) -> str:
        return str(self.config.dataset)

    @property
    def num_classes(self) -> int:
        return int(self.card.num_classes or self.members.num_classes)

    @property
    def input_shape(self) -> tuple[int, int]:
        """(channels, size) of the images the model takes."""
        c, h, _ = self.members.shape
        return int(c), int(h)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(N, K) softmax posteriors of the target on `images` (CPU tensor): a black-box query."""
        return probabilities(self.module, images, self.device).cpu()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) predicted labels (CPU tensor)."""
        return predict(self.module, images, self.device).cpu()

    def split_probabilities(self, split: str) -> torch.Tensor:
        """Posteriors on a whole split ("members", "nonmembers", "val"), computed once."""
        if split not in self._probs:
            self._probs[split] = self.probabilities(getattr(self, split).images)
        return self._probs[split]


def cap(ds: data_mod.ImageSet, n: int, seed: int, salt: int = 0) -> data_mod.ImageSet:
    """A seeded random subset of at most `n` images of `ds` (all of them when n is 0 or >= len),
    in their original order; `salt` draws an independent subset with the same seed."""
    if not n or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(salt))
    return ds.subset(torch.randperm(len(ds), generator=g)[:n].sort().values)


_CACHE: "collections.OrderedDict[tuple, Target]" = collections.OrderedDict()
_LOCK = threading.Lock()


def _load(ref: StageRef, ctx, out) -> Target:
    mcfg = ref.config()
    module, card = ctx.load_model(out, "model", role="classifier")
    module.eval().requires_grad_(False)
    members, val, nonmembers = (load_split(mcfg, ctx, s) for s in ("train", "val", "test"))
    if card.input is not None:
        card.input.check(nonmembers.images[:1], what=f"model={ref.trainable} on dataset={mcfg.dataset!r}")
    zoo_card = None
    if ref.trainable == "zoo":
        from . import zoo

        zoo_card = zoo.get(mcfg.name)
    return Target(module, card, ref, mcfg, members, nonmembers, val, ctx.device, zoo_card, dict(out.metrics))


def load_target(cfg: AuditConfig, ctx) -> Target:
    """The audited model of `cfg.model` and its data (module docstring), cached per process."""
    out = ctx.stage(cfg.model)  # computed once and cached on disk; this only reads the manifest
    key = (str(out.path), out.manifest.get("created_unix"), str(ctx.device), str(ctx.data_root))
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    target = _load(cfg.model, ctx, out)
    with _LOCK:
        _CACHE[key] = target
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return target


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


def model_facts(target: Target, max_samples: int = FACTS_MAX_SAMPLES) -> dict[str, Any]:
    """The card-like columns of `target` (module docstring): FACT_METRICS as floats, FACT_STRINGS
    as strings. Accuracies are measured here on at most `max_samples` seeded images per split
    (seed 0: the same images for every audit), once per target and cap."""
    if max_samples not in target._facts:
        members, nonmembers = cap(target.members, max_samples, 0), cap(target.nonmembers, max_samples, 0, 1)
        train_acc = accuracy(target.predict(members.images), members.labels)
        test_acc = accuracy(target.predict(nonmembers.images), nonmembers.labels)
        zc = target.zoo_card
        target._facts[max_samples] = {
            TRAIN_ACC: float(train_acc),
            TEST_ACC: float(test_acc),
            OVERFIT_GAP: float(train_acc - test_acc),
            NUM_PARAMS: float(sum(p.numel() for p in target.module.parameters())),
            YEAR: float(zc.year) if zc is not None else 0.0,
            IS_ZOO: 1.0 if zc is not None else 0.0,
            MODEL_TRAIN_SIZE: float(len(target.members)),
            MODEL_NAME: target.name,
            ARCH: str(zc.architecture if zc is not None else target.card.arch),
            VENUE: str(zc.venue) if zc is not None else "",
            DATASET: target.dataset,
        }
    return dict(target._facts[max_samples])


def report(ctx, target: Target, metrics: dict[str, Any], epoch: int = 1) -> dict[str, Any]:
    """Report an audit's one result: its `metrics` with the target's `model_facts`."""
    out = {EPOCH: epoch, **model_facts(target), **metrics}
    ctx.report(out)
    return out
