"""torchvision architectures in secsweep.models (TorchvisionNet): resnet18/34/50, densenet121/161,
mobilenet_v2 with small-input stems, their handles, artifacts, and one Cont-Steal run with a
ResNet-18 surrogate. (test_models.py runs its generic handle tests on these models too.)"""

from __future__ import annotations

import runpy

import pytest
import torch
from torch import nn

import secsweep.sweep as sw
from conftest import ROOT
from secsweep import artifacts, registry
from secsweep.artifacts import InputContract
from secsweep.context import LocalContext
from secsweep.errors import ConfigError
from secsweep.models import TORCHVISION_MODELS, build, build_model, encoder_names

TORCHVISION = tuple(TORCHVISION_MODELS)
FEATURE_DIM = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "densenet121": 1024, "densenet161": 2208,
               "mobilenet_v2": 1280}
GROWTH = {"densenet121": 32, "densenet161": 48}   # torchvision's growth_rate per DenseNet
INPUTS = {"fashion": (1, 28), "cifar": (3, 32)}


@pytest.fixture(scope="module")
def built():
    """(arch, input) -> a 10-class model in eval mode, built once for the module."""
    cache: dict = {}

    def get(arch: str, key: str) -> nn.Module:
        if (arch, key) not in cache:
            channels, size = INPUTS[key]
            torch.manual_seed(0)
            cache[arch, key] = build_model(arch, 10, channels, size).eval()
        return cache[arch, key]

    return get


def _taps(model: nn.Module, modules: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of `modules` during one forward pass of `model` on x."""
    out: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, i, o: out.append(o)) for m in modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def test_registered_as_image_models_and_encoders():
    assert set(TORCHVISION) == set(FEATURE_DIM)
    assert set(TORCHVISION) <= set(encoder_names())


@pytest.mark.parametrize("key", INPUTS)
@pytest.mark.parametrize("arch", TORCHVISION)
def test_forward_shapes_features_and_attention_maps(built, arch, key):
    model = built(arch, key)
    channels, size = INPUTS[key]
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        logits, feats = model(x), model.features(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert model.feature_dim == FEATURE_DIM[arch] and feats.shape == (2, FEATURE_DIM[arch])
    assert isinstance(model.head, nn.Linear) and model.head.in_features == model.feature_dim
    torch.testing.assert_close(logits, model.head(feats))
    maps = _taps(model, model.attention_layers(), x)
    assert len(maps) == 3 and all(m.dim() == 4 and m.shape[0] == 2 for m in maps)
    sides = [m.shape[-1] for m in maps]
    assert sides == sorted(sides, reverse=True) and sides[-1] > 1   # small-input stem: 3x3 or 4x4 at the end
    assert maps[-1].shape[1] == model.feature_dim


@pytest.mark.parametrize("arch", TORCHVISION)
def test_small_input_stem(built, arch):
    """The first conv is 3x3 stride 1 from the image's channels; no max-pool is left (ResNets,
    DenseNets); the deepest map is 4x4 at 32 pixels: the network downsamples by 8, not 32."""
    model = built(arch, "fashion")
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1 and first.kernel_size == (3, 3) and first.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    (deepest,) = _taps(built(arch, "cifar"), built(arch, "cifar").attention_layers()[-1:], torch.rand(1, 3, 32, 32))
    assert deepest.shape[-2:] == (4, 4)


@pytest.mark.parametrize("arch", TORCHVISION)
def test_last_conv_relates_to_the_features_as_documented(built, arch):
    model = built(arch, "cifar")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert model.last_conv is convs[-1]
    x = torch.rand(2, 3, 32, 32)
    conv_out, deepest = _taps(model, [model.last_conv, model.attention_layers()[-1]], x)
    if arch in GROWTH:
        # a DenseNet's last conv makes the last growth_rate channels of the final concatenation
        g = GROWTH[arch]
        assert model.last_conv.out_channels == g
        torch.testing.assert_close(deepest[:, -g:], conv_out, rtol=0, atol=0)
    else:
        assert model.last_conv.out_channels == model.feature_dim
        assert conv_out.shape[:2] == (2, model.feature_dim)


def test_resnet_depths_and_parameter_counts():
    """The CIFAR variants: ResNet-18 has the well-known 11,173,962 parameters for 10 classes
    (ImageNet stem: 11,181,642); block counts are torchvision's 2-2-2-2, 3-4-6-3, 3-4-6-3."""
    r18, r34, r50 = (build_model(a, 10) for a in ("resnet18", "resnet34", "resnet50"))
    assert sum(p.numel() for p in r18.parameters()) == 11_173_962
    assert [len(getattr(r34.net, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert type(r50.net.layer4[-1]).__name__ == "Bottleneck" and r50.last_conv is r50.net.layer4[-1].conv3


@pytest.mark.parametrize("arch", TORCHVISION)
def test_encoder_form_returns_embeddings_and_round_trips_as_an_artifact(tmp_path, arch):
    args = {"num_classes": 0, "in_channels": 1, "image_size": 28}
    torch.manual_seed(0)
    encoder = build(arch, args)
    assert isinstance(encoder.head, nn.Identity)
    ctx = LocalContext(workdir=tmp_path)
    ctx.save_model("encoder", encoder, arch, args, "encoder", input=InputContract(1, 28))
    loaded, card = artifacts.load(tmp_path / "outputs", "encoder", role="encoder")
    assert card.arch == arch and card.feature_dim == FEATURE_DIM[arch]
    x = torch.rand(2, 1, 28, 28)
    encoder.eval(), loaded.eval()
    with torch.no_grad():
        emb = encoder(x)
        assert emb.shape == (2, FEATURE_DIM[arch])
        assert torch.equal(emb, encoder.features(x)) and torch.equal(loaded(x), emb)


def test_encoder_classifier_on_a_torchvision_backbone():
    clf = build("encoder_classifier", {"encoder": {"arch": "mobilenet_v2", "args": {"in_channels": 1}},
                                       "num_classes": 4})
    assert clf.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 4)
    assert clf.last_conv is clf.encoder.net.features[18][0] and len(clf.attention_layers()) == 3


def test_unknown_surrogate_model_is_one_line_listing_the_allowed_names(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="surrogate_model='resnet99': must be one of .*resnet18, resnet34"):
        registry.get("cont_steal").build_config({"surrogate_model": "resnet99"})
    sweep = runpy.run_path(str(ROOT / "sweeps" / "cont_steal.py"), run_name="test")["SWEEP"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sw, "_launch", lambda plan, args: pytest.fail("a bad name reached the launch"))
    code = sw.run(sweep, ["--storage-path", str(tmp_path / "ray"), "--set", "surrogate_model=resnet99"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: surrogate_model='resnet99': must be one of ")
    assert all(name in lines[0] for name in (*TORCHVISION, "smallcnn", "preact_resnet18"))
    assert not (tmp_path / "ray").exists()


def test_cont_steal_with_a_resnet18_surrogate_reports_agreement(tmp_path):
    """A tiny run: a 1-epoch SimCLR small-CNN target on 300 images, 200 Fashion-MNIST surrogate images,
    one epoch. The ResNet-18's 512 features are mapped to the target's 64 by a linear layer."""
    spec = registry.get("cont_steal")
    cfg = spec.build_config({
        "target": {"trainable": "simclr", "train_size": 300, "epochs": 1, "monitor_size": 100, "batch_size": 64},
        "surrogate_model": "resnet18", "surrogate_dataset": "fashion_mnist", "surrogate_size": 200, "epochs": 1,
        "batch_size": 64, "probe_train_size": 300, "probe_test_size": 200})
    ctx = LocalContext(workdir=tmp_path / "w", stage_root=tmp_path / "stages")
    spec.fn(cfg, ctx)
    last = ctx.history[-1]
    assert 0.0 <= last["agreement"] <= 1.0 and 0.0 <= last["steal_acc"] <= 1.0
    assert last["queries"] == 200
    model, card = artifacts.load(ctx.output_dir, "encoder", role="encoder")
    assert card.arch == "encoder_classifier" and card.args["encoder"]["arch"] == "resnet18"
    assert model.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 64)


def test_architectures_preset_plans_cont_steal_with_each_surrogate_and_paper_has_the_thesis_five():
    sweep = runpy.run_path(str(ROOT / "sweeps" / "cont_steal.py"), run_name="test")["SWEEP"]
    p = sw.plan(sweep, sw.build_parser(sweep).parse_args(["--preset", "architectures"]))
    cfgs = []
    for trial in p.trials:
        values = dict(trial)
        cfgs.append(registry.get(values.pop("trainable", "cont_steal")).build_config(values))
    assert [c.surrogate_model for c in cfgs] == ["smallcnn", "preact_resnet18", "resnet18", "resnet34", "resnet50",
                                                 "densenet121", "mobilenet_v2"]
    assert all(type(c).__module__.endswith("cont_steal") and c.surrogate_dataset == "fashion_mnist"
               and c.temperature == 0.5 and c.surrogate_size * c.epochs == 1000 for c in cfgs)
    assert all(c.target.config().model == "smallcnn" for c in cfgs)   # the default SimCLR small-CNN target
    paper = [t for t in sweep.presets["paper"]["grid"] if "surrogate_model" in t]
    assert [(t["surrogate_model"], t["surrogate_dataset"]) for t in paper] == [
        (a, "cifar10") for a in ("resnet18", "resnet34", "resnet50", "densenet161", "mobilenet_v2")]
    assert len(sweep.grid) == 12 and not any("surrogate_model" in t for t in sweep.grid)   # the default is unchanged
