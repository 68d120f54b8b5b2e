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

KINDS = ("model", "attack", "defense", "detector", "sequela")  # model: clean training, an upstream stage
DEFAULT_METRICS = (ASR, CLEAN_ACC, DEVICE_HOURS)


@dataclasses.dataclass(frozen=True)
class TrainableSpec:
    name: str
    kind: str
    fn: Callable[..., Any]
    config: type
    metrics: tuple[str, ...]   # metrics every report carries; the contract test checks them
    doc: str
    hooks: Mapping[str, Callable[..., Any]]  # extra entry points, e.g. an attack's "trigger"

    def build_config(self, values: Mapping[str, Any]) -> Any:
        return _config.build(self.config, values, what=f"trainable {self.name!r}")


_REGISTRY: dict[str, TrainableSpec] = {}
_discovered = False


def register(name: str, *, kind: str, config: type, metrics: tuple[str, ...] = DEFAULT_METRICS, **hooks):
    """Decorator registering `fn(cfg, ctx)` under `name`.

    `hooks` are further functions of the method other trainables call; attacks give
    `trigger=fn(cfg, stage_output) -> Callable[[Tensor], Tensor]` (the trigger of a trained attack).
    """
    if kind == "attack" and "trigger" not in hooks:
        raise TypeError(f"attack {name!r} must register a trigger= hook")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {', '.join(KINDS)}")
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
