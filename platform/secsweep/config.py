"""Frozen-dataclass configs: building them from dicts and `--set` strings, and validating fields.

Every trainable declares a frozen dataclass `Config`. Values come from the sweep's fixed settings,
the search space and `--set key=value`; all of them go through `build()` so that an unknown key or
a value of the wrong type fails before any trial starts, with a one-line message that names the
field, the value and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from . import refs
from .errors import ConfigError
from .refs import StageRef

C = TypeVar("C")
SEED_LIMIT = 2**31  # seeds are scaled (x 100_003, secsweep.training.epoch_order) and must stay in int64
INT_LIMIT = 2**63


def fail(field: str, value: Any, allowed: str) -> typing.NoReturn:
    """Raise the one-line error every config check uses: `field=value: allowed`."""
    raise ConfigError(f"{field}={value!r}: {allowed}")


def require(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        fail(field, value, allowed)


def positive(field: str, value: float) -> None:
    require(value > 0, field, value, "must be > 0")


def in_open_unit(field: str, value: float) -> None:
    require(0.0 < value < 1.0, field, value, "must be in (0, 1)")


def in_half_open_unit(field: str, value: float) -> None:
    require(0.0 < value <= 1.0, field, value, "must be in (0, 1]")


def one_of(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    require(value in choices, field, value, "must be one of " + ", ".join(map(str, choices)))


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def parse_value(text: str) -> Any:
    """Parse a `--set` value: a Python literal (number, bool, list, dict, quoted string) or a bare string."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_assignments(pairs: Iterable[str]) -> dict[str, Any]:
    """`["a=1", "b=x"]` -> `{"a": 1, "b": "x"}`; a pair without '=' is an error."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail("--set", pair, "must look like key=value")
        out[key.strip()] = parse_value(value)
    return out


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`, converting only where it loses nothing (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError as e:
                errors.append(e)
        fail(name, value, f"must be {tp}")
    if tp is Any:
        return value
    if tp is StageRef:
        return refs.coerce(name, value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(name, value, "must be a number")
        if not math.isfinite(value):  # e.g. --set lr=1e999: no setting of a method is infinite
            fail(name, value, "must be a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                fail(name, value, "must be an integer")
        if name == "seed" or name.endswith("_seed"):  # seeds feed torch generators (64-bit, scaled)
            require(0 <= value < SEED_LIMIT, name, value, f"must be in 0..{SEED_LIMIT - 1}")
        elif not -INT_LIMIT <= value < INT_LIMIT:
            fail(name, value, "must fit in 64 bits")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            fail(name, value, "must be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            fail(name, value, "must be a string")
        return value
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            fail(name, value, "must be a list")
        args = typing.get_args(tp)
        if args and args[-1] is Ellipsis:
            return tuple(_coerce(name, v, args[0]) for v in value)
        return tuple(value)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            fail(name, value, "must be a mapping")
        return dict(value)
    return value


def build(cls: type[C], values: Mapping[str, Any], *, what: str = "config",
          nested: tuple[str, Iterable[str]] | None = None) -> C:
    """Construct `cls` from `values`: unknown keys, wrong types and invalid values raise ConfigError.

    `nested=(field, keys)`: `values` came partly from the nested mapping `field` of an outer config
    (e.g. a defense's `attack_options`); an error about one of its `keys` names it `field.key`.
    """
    if nested is None:
        return _build(cls, values, what)
    field, keys = nested[0], set(nested[1])
    try:
        return _build(cls, values, what)
    except ConfigError as e:
        name = str(e).split("=", 1)[0]
        if name in keys:
            raise ConfigError(f"{field}.{e}") from None
        raise


def is_ref_field(tp: Any) -> bool:
    return tp is StageRef


def split_dotted(key: str, types_: Mapping[str, Any]) -> tuple[str, str] | None:
    """("encoder", "epochs") for the key "encoder.epochs" when `encoder` is a StageRef field."""
    head, sep, rest = key.partition(".")
    if sep and rest and is_ref_field(types_.get(head)):
        return head, rest
    return None


def _merge_dotted(cls: type, values: Mapping[str, Any], types_: Mapping[str, Any]) -> dict[str, Any]:
    """Fold `ref.field=value` keys into the StageRef field `ref` (its given value or its default)."""
    out: dict[str, Any] = {}
    dotted: dict[str, dict[str, Any]] = {}
    for k, v in values.items():
        split = split_dotted(k, types_)
        if split:
            dotted.setdefault(split[0], {})[split[1]] = v
        else:
            out[k] = v
    for head, sub in dotted.items():
        if head in out:
            base = out[head]
        else:
            f = next(f for f in dataclasses.fields(cls) if f.name == head)
            base = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(base, StageRef):
            base = base.as_value()
        elif isinstance(base, str):
            base = {"trainable": base}
        elif not isinstance(base, Mapping):
            fail(head, base, "must be a trainable name or a mapping {'trainable': NAME, ...}")
        out[head] = {**base, **sub}
    return out


def _build(cls: type[C], values: Mapping[str, Any], what: str) -> C:
    types_ = field_types(cls)
    values = _merge_dotted(cls, values, types_)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        fail(unknown[0], values[unknown[0]], f"unknown key for {what}; allowed: {', '.join(sorted(types_))}")
    kwargs = {k: _coerce(k, v, types_[k]) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a check inside __post_init__ that did not use fail()
        raise ConfigError(f"{what}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (tuples kept), for hashing, logging and MLflow params; a
    StageRef field becomes {"trainable": ..., "config": <its resolved config>}, recursively."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = v.as_dict() if isinstance(v, StageRef) else v
    return out
