"""The trainable registry contract (secsweep.registry), parametrized over every registered trainable."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from secsweep import registry
from secsweep.errors import ConfigError

torch.set_num_threads(1)

NAMES = registry.names()


def test_known_trainables_are_registered():
    assert {"badnets", "blended", "ft", "sft"} <= set(NAMES)
    assert {"badnets", "blended"} <= set(registry.names("attack"))
    assert {"ft", "sft"} <= set(registry.names("defense"))
    assert not set(registry.names("attack")) & set(registry.names("defense"))
    assert list(NAMES) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_spec_is_consistent(name):
    spec = registry.get(name)
    assert spec.name == name
    assert spec.kind in registry.KINDS
    assert callable(spec.fn)
    assert spec.doc, f"{name}: module docstring (paper and section) is missing"
    assert spec.metrics and all(isinstance(m, str) for m in spec.metrics)


@pytest.mark.parametrize("name", registry.names("attack"))
def test_every_attack_has_a_trigger_hook(name):
    spec = registry.get(name)
    assert callable(spec.hooks.get("trigger"))
    trigger = spec.hooks["trigger"](spec.build_config({}), None)
    x = torch.rand(2, 1, 28, 28) * 0.5  # the default dataset's shape: Fashion-MNIST
    out = trigger(x)
    assert out.shape == x.shape
    assert not torch.equal(out, x)  # the trigger changes the input


@pytest.mark.parametrize("name", NAMES)
def test_config_defaults_build_and_are_frozen(name):
    spec = registry.get(name)
    assert dataclasses.is_dataclass(spec.config)
    assert spec.config.__dataclass_params__.frozen, f"{name}: Config must be a frozen dataclass"
    cfg = spec.build_config({})
    assert isinstance(cfg, spec.config)
    assert cfg == spec.config()
    field = dataclasses.fields(cfg)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, field, getattr(cfg, field))


@pytest.mark.parametrize("name", NAMES)
def test_config_rejects_unknown_keys(name):
    with pytest.raises(ConfigError, match="unknown"):
        registry.get(name).build_config({"definitely_not_a_field": 1})


def test_unknown_trainable_lists_choices():
    with pytest.raises(ConfigError) as info:
        registry.get("nope")
    msg = str(info.value)
    assert "nope" in msg and "\n" not in msg
    for name in ("badnets", "blended", "ft", "sft"):
        assert name in msg


def test_attack_must_register_a_trigger_and_kind_is_checked():
    @dataclasses.dataclass(frozen=True)
    class C:
        x: int = 0

    with pytest.raises(TypeError, match="trigger"):
        registry.register("_test_attack_without_trigger", kind="attack", config=C)
    with pytest.raises(ValueError, match="kind"):
        registry.register("_test_bad_kind", kind="optimizer", config=C)
    with pytest.raises(TypeError, match="dataclass"):
        registry.register("_test_not_a_dataclass", kind="defense", config=dict)
    assert "_test_attack_without_trigger" not in registry.names()
