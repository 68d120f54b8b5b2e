"""The trainable registry: every attack, defense, detector and sequela method, by name.

A trainable is `fn(cfg, ctx)` in `trainables/<kind>s/<name>.py`, registered with `@register`.
Discovery imports every module under the `trainables` package once, so adding a method touches no
other file.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

from . import config as _config
from .errors import ConfigError
from .names import ASR, CLEAN_ACC, DEVICE_HOURS

DEFAULT_METRICS = (ASR, CLEAN_ACC, DEVICE_HOURS)


@dataclasses.dataclass(frozen=True)
class KindContract:
    """What every trainable of a kind promises (checked at registration and by the contract test).

    hooks:      entry points it must register (an attack's `trigger`);
    outputs:    model artifacts (`secsweep.artifacts`) it must save, name -> role;
    objectives: what a search over it optimises unless the sweep says otherwise (validation metrics);
    selection:  the one metric ASHA and one-objective searches use, with its mode.
    """

    hooks: tuple[str, ...] = ()
    outputs: Mapping[str, str] = dataclasses.field(default_factory=dict)
    objectives: Mapping[str, str] = dataclasses.field(default_factory=dict)
    selection: tuple[str, str] | None = None


_BACKDOOR_OBJECTIVES = {"val_asr": "min", "val_clean_acc": "max"}
CONTRACTS: dict[str, KindContract] = {
    # a clean model trained as an upstream stage
    "model": KindContract(outputs={"model": "classifier"}, objectives={"val_clean_acc": "max"},
                          selection=("val_clean_acc", "max")),
    # a backdoored classifier: trained with a trigger the defenses and sequela rebuild
    "attack": KindContract(hooks=("trigger",), outputs={"model": "classifier"},
                           objectives={"val_asr": "max", "val_clean_acc": "max"}, selection=("val_clean_acc", "max")),
    "defense": KindContract(objectives=_BACKDOOR_OBJECTIVES, selection=("val_der", "max")),
    "detector": KindContract(objectives=_BACKDOOR_OBJECTIVES, selection=("val_der", "max")),
    # a backdoor-sample detector on an encoder (DeDe, ASSET, DECREE; secsweep.sample_detection): AUC on validation
    "sample_detector": KindContract(objectives={"val_auc": "max"}, selection=("val_auc", "max")),
    "sequela": KindContract(),
    # a pre-trained encoder (self-supervised or supervised): outputs the backbone
    "encoder": KindContract(outputs={"encoder": "encoder"}, objectives={"val_knn_acc": "max"},
                            selection=("val_knn_acc", "max")),
    # an attack on an encoder (BadEncoder, PoisonedEncoder): a backdoored encoder; patch attacks also
    # register `trigger`, targeted poisoning a `target` hook (the target input and class)
    "encoder_attack": KindContract(outputs={"encoder": "encoder"},
                                   objectives={"val_asr": "max", "val_clean_acc": "max"},
                                   selection=("val_clean_acc", "max")),
    # a classifier trained on top of an upstream encoder (the downstream user)
    "downstream": KindContract(outputs={"model": "classifier"}, objectives=_BACKDOOR_OBJECTIVES,
                               selection=("val_clean_acc", "max")),
    # attacks that query a model: stealing, membership inference on encoders, audits of public models
    "stealing": KindContract(),
    "inference": KindContract(),
    "audit": KindContract(),
    "generator": KindContract(outputs={"generator": "generator"}),
    # a fake-image corpus (DE-FAKE): real images and each generator's fakes with their prompts, as tensors
    "corpus": KindContract(),
    # a fake-image detector / attributor (DE-FAKE): saves the classifier, selected on validation accuracy
    "fake_detector": KindContract(outputs={"detector": "detector"}, objectives={"val_acc": "max"},
                                  selection=("val_acc", "max")),
    "analysis": KindContract(),  # reads trained stages and reports on them (DE-FAKE prompt analysis): no model
}
KINDS = tuple(CONTRACTS)


@dataclasses.dataclass(frozen=True)
class TrainableSpec:
    name: str
    kind: str
    fn: Callable[..., Any]
    config: type
    metrics: tuple[str, ...]   # metrics every report carries; the contract test checks them
    doc: str
    hooks: Mapping[str, Callable[..., Any]]  # extra entry points, e.g. an attack's "trigger"

    @property
    def contract(self) -> KindContract:
        return CONTRACTS[self.kind]

    def build_config(self, values: Mapping[str, Any]) -> Any:
        return _config.build(self.config, values, what=f"trainable {self.name!r}")


_REGISTRY: dict[str, TrainableSpec] = {}
_discovered = False


def register(name: str, *, kind: str, config: type, metrics: tuple[str, ...] = DEFAULT_METRICS, **hooks):
    """Decorator registering `fn(cfg, ctx)` under `name`.

    `hooks` are further functions of the method other trainables call; attacks give
    `trigger=fn(cfg, stage_output) -> Callable[[Tensor], Tensor]` (the trigger of a trained attack).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {', '.join(KINDS)}")
    missing = [h for h in CONTRACTS[kind].hooks if h not in hooks]
    if missing:
        raise TypeError(f"{kind} {name!r} must register a {missing[0]}= hook")
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config of {name!r} must be a dataclass")

    def deco(fn):
        prev = _REGISTRY.get(name)
        if prev is not None and prev.fn.__module__ != fn.__module__:
            raise ValueError(f"trainable {name!r} registered twice ({prev.fn.__module__}, {fn.__module__})")
        module_doc = (importlib.import_module(fn.__module__).__doc__ or "").strip()
        _REGISTRY[name] = TrainableSpec(name, kind, fn, config, tuple(metrics), module_doc, dict(hooks))
        return fn

    return deco


def discover() -> None:
    """Import every module of the `trainables` package (registration happens on import)."""
    global _discovered
    if _discovered:
        return
    import trainables

    for info in pkgutil.walk_packages(trainables.__path__, prefix="trainables."):
        importlib.import_module(info.name)
    _discovered = True


def get(name: str) -> TrainableSpec:
    discover()
    if name not in _REGISTRY:
        raise ConfigError(f"trainable={name!r}: unknown; choices: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def names(kind: str | None = None) -> tuple[str, ...]:
    discover()
    return tuple(sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind))
