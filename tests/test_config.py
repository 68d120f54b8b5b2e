"""secsweep.config (build / parse_value / parse_assignments) and validation of the real trainable configs.

Every invalid value must fail with a ConfigError whose message is one line naming the field and value.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch

from secsweep import registry
from secsweep.config import build, parse_assignments, parse_value, to_dict
from secsweep.errors import ConfigError

torch.set_num_threads(1)


def build_cfg(name: str, values: dict):
    return registry.get(name).build_config(values)


def config_error(name: str, values: dict) -> str:
    with pytest.raises(ConfigError) as info:
        build_cfg(name, values)
    msg = str(info.value)
    assert "\n" not in msg, f"message is not one line: {msg!r}"
    return msg


# ----------------------------------------------------------------------------- parse_value / assignments


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0.1", 0.1),
        ("3", 3),
        ("true", True),
        ("True", True),
        ("false", False),
        ("badnets", "badnets"),
        ("[1,2]", [1, 2]),
        ("1e-3", 1e-3),
        ("-2", -2),
        ("'quoted'", "quoted"),
        ("{'alpha': 0.3}", {"alpha": 0.3}),
        ("none", None),
    ],
)
def test_parse_value(text, expected):
    out = parse_value(text)
    assert out == expected
    assert type(out) is type(expected)


def test_parse_assignments():
    assert parse_assignments(["lr_max1=0.3", "attack=blended", "epochs=4", " shape=sawtooth"]) == {
        "lr_max1": 0.3, "attack": "blended", "epochs": 4, "shape": "sawtooth",
    }
    assert parse_assignments(["a=x=y"]) == {"a": "x=y"}  # only the first '=' splits
    assert parse_assignments(["attack_options={'alpha': 0.1}"]) == {"attack_options": {"alpha": 0.1}}
    assert parse_assignments([]) == {}


def test_parse_value_strips_bare_strings_like_numbers():
    assert parse_value(" 0.3 ") == 0.3
    assert parse_value(" badnets ") == "badnets"
    assert parse_assignments(["attack = blended"]) == {"attack": "blended"}


@pytest.mark.parametrize("bad", ["lr_max1", "=3", ""])
def test_parse_assignments_rejects_pairs_without_key_or_equals(bad):
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignments([bad])


# ----------------------------------------------------------------------------- build on a toy dataclass


@dataclasses.dataclass(frozen=True)
class Toy:
    lr: float = 0.1
    epochs: int = 2
    name: str = "a"
    flag: bool = False
    sizes: tuple[int, ...] = (1, 2)
    maybe: Optional[int] = None


def test_build_toy_coerces_losslessly():
    cfg = build(Toy, {"lr": 1, "epochs": 3.0, "sizes": [4, 5], "maybe": 7})
    assert cfg == Toy(lr=1.0, epochs=3, sizes=(4, 5), maybe=7)
    assert type(cfg.lr) is float and type(cfg.epochs) is int and type(cfg.sizes) is tuple
    assert build(Toy, {"maybe": None}).maybe is None
    assert build(Toy, {}) == Toy()


@pytest.mark.parametrize(
    "values, field",
    [
        ({"lr": "abc"}, "lr"),
        ({"lr": True}, "lr"),
        ({"epochs": 1.5}, "epochs"),
        ({"epochs": "2"}, "epochs"),
        ({"name": 3}, "name"),
        ({"flag": 1}, "flag"),
        ({"sizes": 3}, "sizes"),
        ({"sizes": ["x"]}, "sizes"),
        ({"maybe": "x"}, "maybe"),
    ],
)
def test_build_toy_rejects_wrong_types(values, field):
    with pytest.raises(ConfigError) as info:
        build(Toy, values)
    msg = str(info.value)
    assert msg.startswith(f"{field}=") and "\n" not in msg


def test_build_toy_unknown_key_lists_allowed():
    with pytest.raises(ConfigError) as info:
        build(Toy, {"lrr": 0.1})
    msg = str(info.value)
    assert "lrr" in msg and "unknown" in msg
    for name in ("lr", "epochs", "name", "flag", "sizes", "maybe"):
        assert name in msg


def test_to_dict_round_trips():
    cfg = Toy(lr=0.5)
    assert build(Toy, to_dict(cfg)) == cfg


# ----------------------------------------------------------------------------- real trainable configs


def test_defaults_and_overrides_build():
    cfg = build_cfg("sft", {"lr_max1": 0.3, "lr_max2": 0.01, "epochs": 4, "attack": "blended"})
    assert (cfg.lr_max1, cfg.lr_max2, cfg.epochs, cfg.attack) == (0.3, 0.01, 4, "blended")
    assert build_cfg("ft", {"lr": 0}).lr == 0.0
    assert build_cfg("badnets", {"poison_ratio": 0.05}).poison_ratio == 0.05


def test_int_accepted_for_float_fields():
    cfg = build_cfg("sft", {"lr_max1": 1})
    assert cfg.lr_max1 == 1.0 and type(cfg.lr_max1) is float
    cfg = build_cfg("ft", {"lr": 1, "clean_fraction": 1})
    assert type(cfg.lr) is float and type(cfg.clean_fraction) is float
    assert type(build_cfg("badnets", {"attack_lr": 1}).attack_lr) is float


@pytest.mark.parametrize("values", [{"lr_max1": 0.001, "lr_max2": 0.01}, {"lr_max1": 0.01, "lr_max2": 0.01}])
def test_sft_lr_max1_must_exceed_lr_max2(values):
    msg = config_error("sft", values)
    assert f"lr_max1={values['lr_max1']}" in msg
    assert "lr_max2" in msg


@pytest.mark.parametrize(
    "name, field, value",
    [
        ("sft", "lr_base", 0),
        ("sft", "lr_max1", -1),
        ("sft", "lr_max2", 0),
        ("badnets", "attack_lr", 0),
        ("blended", "attack_lr", -0.1),
        ("sft", "attack_lr", 0),
        ("ft", "lr", -1),
    ],
)
def test_non_positive_learning_rate(name, field, value):
    msg = config_error(name, {field: value})
    assert msg.startswith(f"{field}=")
    assert f"{field}={float(value)!r}" in msg or f"{field}={value!r}" in msg


@pytest.mark.parametrize("name", ["badnets", "blended", "sft", "ft"])
@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1])
def test_poison_ratio_outside_open_unit(name, ratio):
    msg = config_error(name, {"poison_ratio": ratio})
    assert msg.startswith("poison_ratio=") and "(0, 1)" in msg


@pytest.mark.parametrize("name", ["sft", "ft"])
@pytest.mark.parametrize("fraction", [0, 1.2, -0.5])
def test_clean_fraction_outside_half_open_unit(name, fraction):
    msg = config_error(name, {"clean_fraction": fraction})
    assert msg.startswith("clean_fraction=") and "(0, 1]" in msg


@pytest.mark.parametrize("name", ["sft", "ft"])
def test_clean_fraction_one_allowed(name):
    assert build_cfg(name, {"clean_fraction": 1.0}).clean_fraction == 1.0
    assert build_cfg(name, {"clean_fraction": 0.1}).clean_fraction == 0.1


@pytest.mark.parametrize("name", ["sft", "ft"])
def test_unknown_attack_lists_attacks(name):
    msg = config_error(name, {"attack": "nope"})
    assert "attack='nope'" in msg
    assert "badnets" in msg and "blended" in msg
    assert "sft" not in msg.split(":", 1)[1]  # only attacks are offered


@pytest.mark.parametrize("name", ["badnets", "sft", "ft"])
def test_unknown_dataset_lists_datasets(name):
    msg = config_error(name, {"dataset": "imagenet_nope"})
    assert "dataset='imagenet_nope'" in msg and "fashion_mnist" in msg


@pytest.mark.parametrize("name", ["badnets", "sft", "ft"])
def test_unknown_model_lists_models(name):
    msg = config_error(name, {"model": "bignet"})
    assert "model='bignet'" in msg and "smallcnn" in msg


@pytest.mark.parametrize("name", ["badnets", "sft", "ft"])
def test_unknown_key_lists_allowed(name):
    msg = config_error(name, {"lr_maxx": 0.1})
    assert "lr_maxx" in msg and "unknown" in msg
    assert "poison_ratio" in msg and "seed" in msg
    if name == "sft":
        assert "lr_max1" in msg and "ramp_steps" in msg


@pytest.mark.parametrize(
    "name, values, field",
    [
        ("sft", {"lr_max1": "abc"}, "lr_max1"),
        ("sft", {"epochs": 1.5}, "epochs"),
        ("ft", {"epochs": "3"}, "epochs"),
        ("badnets", {"patch": 2.5}, "patch"),
        ("badnets", {"include_target_class": "yes"}, "include_target_class"),
        ("sft", {"attack_options": [1, 2]}, "attack_options"),
    ],
)
def test_wrong_type(name, values, field):
    msg = config_error(name, values)
    assert msg.startswith(f"{field}=")
    assert repr(values[field]) in msg


def test_float_with_integer_value_accepted_for_int_field():
    assert build_cfg("sft", {"epochs": 3.0}).epochs == 3


@pytest.mark.parametrize("name", ["sft", "ft"])
def test_attack_options_bad_value(name):
    msg = config_error(name, {"attack": "blended", "attack_options": {"alpha": 2}})
    assert "alpha=2" in msg and "(0, 1]" in msg


@pytest.mark.parametrize("name", ["sft", "ft"])
def test_attack_options_unknown_key(name):
    msg = config_error(name, {"attack": "badnets", "attack_options": {"alpha": 0.3}})  # alpha is blended's
    assert "alpha" in msg and "unknown" in msg and "patch" in msg


def test_attack_options_valid_are_forwarded_to_the_attack_config():
    cfg = build_cfg("sft", {"attack": "blended", "attack_options": {"alpha": 0.3}, "poison_ratio": 0.05})
    acfg = cfg.attack_config()
    assert type(acfg) is registry.get("blended").config
    assert acfg.alpha == 0.3 and acfg.poison_ratio == 0.05


def test_badnets_specific_fields_validated():
    assert config_error("badnets", {"patch": 0}).startswith("patch=")
    assert config_error("badnets", {"value": 1.5}).startswith("value=")
    assert config_error("blended", {"alpha": 0}).startswith("alpha=")


def test_sft_shape_and_ramp_validated():
    msg = config_error("sft", {"shape": "cosine"})
    assert "shape='cosine'" in msg and "triangular" in msg and "sawtooth" in msg
    assert config_error("sft", {"ramp_steps": -1}).startswith("ramp_steps=")


def test_configs_are_frozen():
    cfg = build_cfg("sft", {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr_max1 = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("key, value", [("target_label", 3), ("image_size", 32)])
def test_attack_options_cannot_override_shared_victim_fields(key, value):
    msg = config_error("sft", {"attack_options": {key: value}})
    assert key in msg
