"""Stage references: config fields naming an upstream stage, validated, hashed and ordered generically."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from secsweep import refs, registry
from secsweep.config import build, to_dict
from secsweep.errors import ConfigError
from secsweep.refs import StageRef
from secsweep.stages import stage_key


@dataclass(frozen=True)
class Consumer:
    encoder: StageRef = field(default_factory=lambda: StageRef("simclr", {"epochs": 2}))
    lr: float = 0.1
    seed: int = 0

    def __post_init__(self):
        refs.check(self, "encoder", kinds=("encoder",))


def test_a_name_a_mapping_or_dotted_keys_build_the_reference():
    assert build(Consumer, {"encoder": "simclr"}).encoder == StageRef("simclr")
    cfg = build(Consumer, {"encoder": {"trainable": "simclr", "temperature": 0.2}})
    assert cfg.encoder.config().temperature == 0.2
    # dotted keys fold into the default reference (its own options kept)
    cfg = build(Consumer, {"encoder.temperature": 0.3})
    assert cfg.encoder.options == {"epochs": 2, "temperature": 0.3}
    assert cfg.encoder.config().epochs == 2 and cfg.encoder.config().temperature == 0.3
    # ... or into a given one
    cfg = build(Consumer, {"encoder": "simclr", "encoder.epochs": 4})
    assert cfg.encoder.config().epochs == 4


def test_bad_upstream_values_fail_on_one_line_named_by_their_path():
    with pytest.raises(ConfigError, match=r"^encoder\.epochs=0: must be >= 1$"):
        build(Consumer, {"encoder.epochs": 0})
    with pytest.raises(ConfigError, match=r"^encoder\.nope=1: unknown key"):
        build(Consumer, {"encoder.nope": 1})
    with pytest.raises(ConfigError, match=r"^encoder='resnet_zoo': must be a trainable"):
        build(Consumer, {"encoder": "resnet_zoo"})
    # a classifier attack is not an encoder: the contract of the field refuses it
    with pytest.raises(ConfigError, match=r"^encoder='badnets': is a attack; must be one of .*simclr"):
        build(Consumer, {"encoder": "badnets"})
    with pytest.raises(ConfigError, match="must name its trainable"):
        build(Consumer, {"encoder": {"epochs": 3}})


def test_keys_hash_the_resolved_upstream_config_recursively():
    a = build(Consumer, {})
    b = build(Consumer, {"encoder.epochs": 2})           # same resolved config, written differently
    c = build(Consumer, {"encoder.temperature": 0.25})   # a different upstream stage
    assert to_dict(a)["encoder"] == {"trainable": "simclr", "config": to_dict(a.encoder.config())}
    assert stage_key("x", a) == stage_key("x", b) != stage_key("x", c)
    # a default value written out explicitly is the same stage
    default_tau = a.encoder.config().temperature
    assert stage_key("x", build(Consumer, {"encoder.temperature": default_tau})) == stage_key("x", a)


def test_upstream_lists_reference_fields_and_declared_stages():
    cfg = build(Consumer, {})
    assert refs.upstream(cfg) == [("simclr", cfg.encoder.config())]
    defense = registry.get("ft").build_config({"attack": "blended"})
    ((name, attack_cfg),) = refs.upstream(defense)
    assert name == "blended" and attack_cfg == defense.attack_config()
    assert "trainables.encoders.simclr" in refs.upstream_modules(cfg)


def test_references_pickle_and_stay_immutable():
    import pickle

    ref = StageRef("simclr", {"epochs": 3})
    assert pickle.loads(pickle.dumps(ref)) == ref
    with pytest.raises(AttributeError):
        ref.trainable = "byol"
    assert hash(ref) == hash(StageRef("simclr", {"epochs": 3}))


def test_sweep_keys_and_reseeding_reach_upstream_references():
    from secsweep.sweep import _check_keys, with_seeds

    _check_keys(["simclr"], ["epochs"], "--set")
    with pytest.raises(ConfigError):
        _check_keys(["simclr"], ["encoder.epochs"], "--set")  # simclr has no reference field
    trials = [{"trainable": "ft", "attack": "badnets"}]
    assert [t["victim_seed"] for t in with_seeds(trials, 2, reseed_upstream=True)] == [0, 1]


def test_trainable_colon_name_sets_the_stage_name_so_zoo_name_brings_a_registry_model():
    """`model=zoo:NAME` (an audit's or any model reference) is the `zoo` stage of registry model NAME,
    with its data defaulting to the card's; a name the registry lacks is one line naming the field."""
    from secsweep.audit import AuditConfig

    cfg = build(AuditConfig, {"model": "zoo:digit-recognizer-mnist-cnn"})
    assert cfg.model == StageRef("zoo", {"name": "digit-recognizer-mnist-cnn"})
    assert cfg.model.config().dataset == "mnist"
    with pytest.raises(ConfigError, match=r"^model\.name='nope': must be a registry model"):
        build(AuditConfig, {"model": "zoo:nope"})
    with pytest.raises(ConfigError, match=r"^model='zoo:': must be TRAINABLE or TRAINABLE:NAME"):
        build(AuditConfig, {"model": "zoo:"})
