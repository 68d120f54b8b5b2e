"""Model artifacts: a model saved with its card is rebuilt by consumers from the card alone."""

from __future__ import annotations

import json

import pytest
import torch

from secsweep import artifacts
from secsweep.artifacts import InputContract, ModelCard
from secsweep.context import LocalContext
from secsweep.errors import ArtifactError
from secsweep.models import build
from secsweep.stages import verify

ENC = {"num_classes": 0, "in_channels": 1, "image_size": 28, "width": 8}


def _save(ctx, name="encoder", role="encoder"):
    torch.manual_seed(0)
    model = build("smallcnn", ENC)
    ctx.save_model(name, model, "smallcnn", ENC, role, input=InputContract(1, 28))
    return model


def test_round_trip_rebuilds_architecture_and_weights(tmp_path):
    ctx = LocalContext(workdir=tmp_path, run_info={"trainable": "simclr", "code": "abc"})
    model = _save(ctx)
    loaded, card = artifacts.load(tmp_path / "outputs", "encoder", role="encoder")
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model.eval()(x), loaded.eval()(x))
    assert card.role == "encoder" and card.feature_dim == 32 and card.input == InputContract(1, 28)
    assert card.provenance == {"trainable": "simclr", "code": "abc"}
    # the card is plain JSON a person can read
    data = json.loads((tmp_path / "outputs" / "encoder.model.json").read_text())
    assert data["arch"] == "smallcnn" and data["args"]["width"] == 8


def test_a_consumer_refuses_the_wrong_role_and_the_wrong_weights(tmp_path):
    ctx = LocalContext(workdir=tmp_path)
    _save(ctx)
    with pytest.raises(ArtifactError, match="a encoder, but a classifier is needed"):
        artifacts.load(tmp_path / "outputs", "encoder", role="classifier")
    with pytest.raises(ArtifactError, match="no model artifact 'model'"):
        artifacts.load(tmp_path / "outputs", "model")
    card = json.loads((tmp_path / "outputs" / "encoder.model.json").read_text())
    card["args"]["width"] = 16  # a card that does not describe the weights
    (tmp_path / "outputs" / "encoder.model.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="do not fit the card's architecture"):
        artifacts.load(tmp_path / "outputs", "encoder")
    with pytest.raises(ArtifactError, match="role='oracle'"):
        ModelCard("smallcnn", ENC, "oracle")


def test_input_contract_names_the_mismatch():
    InputContract(1, 28).check(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ArtifactError, match=r"\(N, 1, 28, 28\)"):
        InputContract(1, 28).check(torch.zeros(2, 3, 32, 32))


def test_a_stage_model_is_loaded_through_the_context_and_a_tampered_card_is_never_used(tmp_path):
    store_root = tmp_path / "stages"
    ctx = LocalContext(workdir=tmp_path / "w", stage_root=store_root)
    from secsweep import registry

    cfg = registry.get("clean").build_config({"dataset": "digits", "epochs": 1, "batch_size": 64})
    model, card = ctx.load_model("clean", cfg=cfg, role="classifier")
    assert card.provenance["trainable"] == "clean" and card.provenance["code"]
    assert card.num_classes == 10 and model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    out = ctx.stage("clean", cfg)
    (out.path / "model.model.json").write_text("{}")  # tampering breaks the manifest's sha256
    with pytest.raises(ArtifactError, match="model.model.json is missing or does not match its sha256"):
        verify(out.path)
    again, _ = ctx.load_model("clean", cfg=cfg)  # recomputed, not read from the tampered folder
    assert torch.equal(again(torch.ones(1, 1, 8, 8)), model(torch.ones(1, 1, 8, 8)))
