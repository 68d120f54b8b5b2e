"""Stage references: a config field that names an upstream stage (a trainable and its config).

A method that starts from another method's output declares a field of type `StageRef`:

    @dataclass(frozen=True)
    class Config:
        encoder: StageRef = field(default_factory=lambda: StageRef("simclr"))

and obtains the output with `ctx.stage(cfg.encoder)` or the model with `ctx.load_model(cfg.encoder)`.
A reference is written in a sweep or on the command line as the trainable's name
(`--set encoder=byol`), as a mapping (`{"trainable": "byol", "epochs": 5}`) or field by field
(`--set encoder.epochs=5`); the referenced config is built and validated with the referencing one,
so a bad upstream value fails before any trial starts, named by its path (`encoder.epochs=-1`).

Chains of any depth are references inside references (a downstream classifier refers to a
BadEncoder, which refers to a SimCLR encoder). Stage keys hash a reference as its trainable and its
fully resolved config, recursively (`secsweep.config.to_dict`); the sweep orders trials by their
upstream stages through `upstream()`, without knowing what kind of method a stage is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError


class StageRef:
    """An upstream stage: the trainable `trainable` with config values `options` (the rest default)."""

    __slots__ = ("trainable", "options", "_config")

    def __init__(self, trainable: str, options: Mapping[str, Any] | None = None, **kw: Any):
        object.__setattr__(self, "trainable", str(trainable))
        object.__setattr__(self, "options", dict(options or {}, **kw))
        object.__setattr__(self, "_config", None)

    def __setattr__(self, name, value):  # immutable, like the frozen configs it sits in
        raise AttributeError("StageRef is immutable")

    def __repr__(self) -> str:
        return f"StageRef({self.trainable!r}, {self.options!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StageRef) and (self.trainable, self.options) == (other.trainable, other.options)

    def __hash__(self) -> int:
        return hash((self.trainable, repr(sorted(self.options.items()))))

    def __reduce__(self):  # picklable (Ray ships configs to workers)
        return (StageRef, (self.trainable, self.options))

    def spec(self):
        from . import registry

        return registry.get(self.trainable)

    def config(self, path: str = "") -> Any:
        """The referenced trainable's config, built (and validated) once."""
        if self._config is None:
            from .config import build

            spec = self.spec()
            cfg = build(spec.config, self.options, what=f"trainable {self.trainable!r}"
                        + (f" ({path})" if path else ""), nested=(path, self.options) if path else None)
            object.__setattr__(self, "_config", cfg)
        return self._config

    def with_options(self, **updates: Any) -> "StageRef":
        return StageRef(self.trainable, {**self.options, **updates})

    def as_dict(self) -> dict[str, Any]:
        """Trainable and fully resolved config (references inside resolved too): what keys hash."""
        from .config import to_dict

        return {"trainable": self.trainable, "config": to_dict(self.config())}

    def as_value(self) -> dict[str, Any]:
        """The plain mapping a sweep or `--set` writes ({"trainable": ..., **options})."""
        return {"trainable": self.trainable, **self.options}


def coerce(name: str, value: Any) -> StageRef:
    """A StageRef from what a sweep or `--set` gives: a StageRef, a trainable name, TRAINABLE:NAME
    (the stage's `name` field: `zoo:NAME` is a registry model) or a mapping with a "trainable" key;
    the referenced config is validated here, errors named `name.field`."""
    from .config import fail

    if isinstance(value, StageRef):
        ref = value
    elif isinstance(value, str) and ":" in value:
        # "TRAINABLE:NAME" sets the stage's `name` field: zoo:NAME is a registry model (bring your own model)
        trainable, _, label = value.partition(":")
        if not label:
            fail(name, value, "must be TRAINABLE or TRAINABLE:NAME (e.g. zoo:NAME, a registry model)")
        ref = StageRef(trainable, {"name": label})
    elif isinstance(value, str):
        ref = StageRef(value)
    elif isinstance(value, Mapping):
        if "trainable" not in value:
            fail(name, dict(value), "must name its trainable: {'trainable': NAME, field: value, ...}")
        opts = {k: v for k, v in value.items() if k != "trainable"}
        ref = StageRef(value["trainable"], opts)
    else:
        fail(name, value, "must be a trainable name or a mapping {'trainable': NAME, ...}")
    try:
        ref.spec()
    except ConfigError:
        from . import registry

        fail(name, ref.trainable, "must be a trainable: " + ", ".join(registry.names()))
    ref.config(name)
    return ref


def ref_fields(cfg: Any) -> list[tuple[str, StageRef]]:
    """(field name, reference) of every StageRef field of a config dataclass."""
    if not dataclasses.is_dataclass(cfg):
        return []
    return [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
            if isinstance(getattr(cfg, f.name, None), StageRef)]


def upstream(cfg: Any) -> list[tuple[str, Any]]:
    """The upstream stages a trial of `cfg` needs first, as (trainable, config): its StageRef
    fields, and what a config declares through an `upstream_stages()` method (the defenses'
    attack, from `attack` + `attack_options`)."""
    out = [(ref.trainable, ref.config()) for _, ref in ref_fields(cfg)]
    extra = getattr(cfg, "upstream_stages", None)
    if callable(extra):
        out.extend(extra())
    return out


def check(cfg: Any, field: str, kinds: tuple[str, ...] | None = None) -> StageRef:
    """Validate the StageRef field `field` of a config in its `__post_init__`: a name or mapping
    becomes a StageRef (configs built in Python, not through `secsweep.config.build`), its config is
    built, and its trainable must be of one of `kinds` (e.g. ("encoder", "encoder_attack"))."""
    from . import registry
    from .config import fail

    ref = coerce(field, getattr(cfg, field))
    object.__setattr__(cfg, field, ref)
    if kinds is not None:
        kind = ref.spec().kind
        if kind not in kinds:
            allowed = [n for k in kinds for n in registry.names(k)]
            fail(field, ref.trainable, f"is a {kind}; must be one of {', '.join(sorted(allowed)) or '(none registered)'}")
    return ref


def upstream_modules(cfg: Any, _seen: set[str] | None = None) -> list[str]:
    """The modules of every trainable upstream of `cfg`, recursively: a stage's code fingerprint
    covers the code of the stages it consumes, so editing an upstream method re-keys its consumers."""
    from . import registry

    seen = _seen if _seen is not None else set()
    out: list[str] = []
    for trainable, ucfg in upstream(cfg):
        module = registry.get(trainable).fn.__module__
        if module not in seen:
            seen.add(module)
            out.append(module)
        out.extend(upstream_modules(ucfg, seen))
    return out
