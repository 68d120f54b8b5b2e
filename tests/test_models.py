"""Tests for secsweep.models: registry, shapes, defense hooks, parameter count, trainability."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secsweep.errors import ConfigError
from secsweep import models as models_mod
from secsweep.models import MODELS, build_model, model_names, register_model

PREACT_RESNET18_PARAMS = 11_172_170  # 10 classes, with the final BN (see PreActResNet18 docstring)




def _tiny(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A model small enough to build in milliseconds (smallcnn at width 8; preact as is)."""
    if name == "smallcnn":
        return build_model(name, num_classes, in_channels, width=8)
    return build_model(name, num_classes, in_channels)


# ---------------------------------------------------------------------------- registry


def test_registry_lists_builtin_models():
    assert model_names() == ("densenet121", "densenet161", "mobilenet_v2", "preact_resnet18", "resnet18",
                             "resnet34", "resnet50", "smallcnn")
    # heads/composites are builders but not recipes; so are the ports other modules register on import
    # (secsweep.zoo's zoo_* architectures), which the full suite imports before this test runs
    assert {"mlp", "encoder_classifier"} <= set(MODELS) - set(model_names())


def test_unknown_model_is_one_line_config_error_with_choices():
    with pytest.raises(ConfigError) as err:
        build_model("resnet9000", 10)
    msg = str(err.value)
    assert msg == ("model='resnet9000': must be one of densenet121, densenet161, mobilenet_v2, preact_resnet18, "
                   "resnet18, resnet34, resnet50, smallcnn")
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_classes": -1}, "num_classes=-1"),
        ({"num_classes": 10, "in_channels": 0}, "in_channels=0"),
        ({"num_classes": 10, "image_size": 4}, "image_size=4"),
        ({"num_classes": 10, "depth": 3}, "'depth'"),
    ],
)
def test_bad_arguments_raise_config_error_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        build_model("smallcnn", **kwargs)


def test_option_of_another_model_is_rejected():
    with pytest.raises(ConfigError, match="width.*preact_resnet18"):
        build_model("preact_resnet18", 10, width=8)


def test_register_model_adds_and_refuses_duplicates():
    @register_model("_test_linear")
    def _linear(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))

    try:
        assert "_test_linear" in model_names()
        assert build_model("_test_linear", 4, 2)(torch.zeros(1, 2, 8, 8)).shape == (1, 4)
        with pytest.raises(ConfigError, match="_test_linear"):
            register_model("_test_linear")(_linear)
    finally:
        MODELS.pop("_test_linear")
        models_mod._IMAGE_MODELS.discard("_test_linear")


# ---------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("name", "in_channels", "height", "width", "num_classes"),
    [
        ("smallcnn", 1, 28, 28, 10),  # Fashion-MNIST, the offline default
        ("smallcnn", 3, 32, 32, 43),
        ("smallcnn", 3, 8, 8, 2),  # smallest allowed side
        ("smallcnn", 1, 9, 13, 5),  # odd, non-square
        ("preact_resnet18", 3, 32, 32, 10),  # CIFAR-10
        ("preact_resnet18", 1, 28, 28, 100),
        ("preact_resnet18", 3, 8, 8, 43),
        ("preact_resnet18", 3, 20, 12, 7),
    ],
)
def test_output_shape(name, in_channels, height, width, num_classes):
    model = _tiny(name, num_classes, in_channels).eval()
    with torch.no_grad():
        out = model(torch.rand(2, in_channels, height, width))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------- defense hooks


@pytest.mark.parametrize("name", model_names())
def test_forward_equals_head_of_features(name):
    torch.manual_seed(0)
    model = _tiny(name, 7).eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        feats = model.features(x)
        assert feats.shape == (3, model.feature_dim)
        assert isinstance(model.head, nn.Linear)
        assert model.head.in_features == model.feature_dim
        torch.testing.assert_close(model(x), model.head(feats))


@pytest.mark.parametrize("name", model_names())
def test_head_can_be_replaced_for_transfer(name):
    model = _tiny(name, 100).eval()
    model.head = nn.Linear(model.feature_dim, 10)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 16, 16)).shape == (2, 10)


# DenseNets: the last conv makes only the last growth_rate feature channels (test_models_torchvision.py)
@pytest.mark.parametrize("name", [n for n in model_names() if not n.startswith("densenet")])
def test_last_conv_is_the_last_conv_and_feeds_the_features(name):
    """For every built-in model but the DenseNets the last conv's channels are the feature channels."""
    model = _tiny(name).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert model.last_conv is convs[-1]
    assert model.last_conv.out_channels == model.feature_dim
    seen: list[torch.Size] = []
    handle = model.last_conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        model(torch.rand(2, 3, 16, 16))
    handle.remove()
    assert len(seen) == 1 and seen[0][:2] == (2, model.feature_dim)


@pytest.mark.parametrize("name", model_names())
def test_attention_layers_are_submodules_giving_4d_maps(name):
    model = _tiny(name).eval()
    layers = model.attention_layers()
    assert len(layers) == 3
    children = set(model.modules())
    assert all(layer in children for layer in layers)
    shapes: list[torch.Size] = []
    handles = [layer.register_forward_hook(lambda m, i, o: shapes.append(o.shape)) for layer in layers]
    with torch.no_grad():
        model(torch.rand(2, 3, 16, 16))
    for h in handles:
        h.remove()
    assert len(shapes) == 3
    assert all(len(s) == 4 and s[0] == 2 for s in shapes)
    assert shapes[-1][1] == model.feature_dim  # the deepest map has the feature channels


def test_smallcnn_width_scales_blocks():
    model = build_model("smallcnn", 10, 1)  # default width 16
    assert [layer[0].out_channels for layer in model.attention_layers()] == [16, 32, 64]
    assert model.feature_dim == 64
    assert build_model("smallcnn", 10, 1, width=32).feature_dim == 128


# ---------------------------------------------------------------------------- preact details


def test_preact_resnet18_parameter_count():
    n = sum(p.numel() for p in build_model("preact_resnet18", 10).parameters())
    assert 11.1e6 <= n <= 11.3e6
    assert n == PREACT_RESNET18_PARAMS


def test_preact_resnet18_structure_and_gradients_reach_every_parameter():
    model = build_model("preact_resnet18", 10)
    assert model.conv1.stride == (1, 1) and model.conv1.out_channels == 64  # CIFAR stem
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [len(s) for s in stages] == [2, 2, 2, 2]
    assert [s[0].conv2.out_channels for s in stages] == [64, 128, 256, 512]
    assert [s[0].conv1.stride[0] for s in stages] == [1, 2, 2, 2]
    loss = model(torch.rand(2, 3, 8, 8)).logsumexp(dim=1).sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


# ---------------------------------------------------------------------------- training behaviour


def test_smallcnn_overfits_random_labels():
    """Gradients flow: 32 random images with random labels are memorised within 100 Adam steps."""
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 1, image_size=16, width=16)
    x = torch.rand(32, 1, 16, 16)
    y = torch.randint(0, 10, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    acc = 0.0
    for _ in range(100):
        logits = model(x)
        acc = (logits.argmax(dim=1) == y).float().mean().item()
        if acc == 1.0:
            break
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert acc == 1.0


@pytest.mark.parametrize("name", model_names())
def test_init_is_deterministic_given_the_seed(name):
    torch.manual_seed(123)
    a = _tiny(name).state_dict()
    torch.manual_seed(123)
    b = _tiny(name).state_dict()
    torch.manual_seed(124)
    c = _tiny(name).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


# ---------------------------------------------------------------------------- encoders and composites


@pytest.mark.parametrize("name", model_names())
def test_num_classes_zero_builds_the_encoder_whose_forward_is_features(name):
    torch.manual_seed(0)
    enc = build_model(name, 0, 1, 28, **({"width": 8} if name == "smallcnn" else {}))
    x = torch.rand(2, 1, 28, 28)
    enc.eval()
    assert isinstance(enc.head, nn.Identity)
    assert torch.equal(enc(x), enc.features(x)) and enc(x).shape == (2, enc.feature_dim)


def test_build_from_artifact_description_and_encoder_classifier_delegates_handles():
    from secsweep.models import build

    enc_desc = {"arch": "smallcnn", "args": {"num_classes": 0, "in_channels": 1, "image_size": 28, "width": 8}}
    clf = build("encoder_classifier", {"encoder": enc_desc, "num_classes": 5})
    x = torch.rand(3, 1, 28, 28)
    assert clf(x).shape == (3, 5)
    assert clf.feature_dim == 32 and clf.last_conv is clf.encoder.last_conv
    assert len(clf.attention_layers()) == 3
    # the backbone is a real encoder: copying its weights into a fresh one reproduces the features
    enc = build("smallcnn", enc_desc["args"])
    enc.load_state_dict(clf.encoder.state_dict())
    clf.eval(), enc.eval()
    assert torch.allclose(enc(x), clf.features(x))
    head = build("mlp", {"in_dim": 32, "out_dim": 7, "hidden_dim": 16, "layers": 2})
    assert head(torch.rand(4, 32)).shape == (4, 7)
    with pytest.raises(ConfigError, match="'depth'.*mlp"):
        build("mlp", {"in_dim": 3, "out_dim": 2, "depth": 4})
    with pytest.raises(ConfigError, match="must be one of"):
        build_model("mlp", 3)  # not an image model


def test_a_card_naming_an_architecture_of_another_module_rebuilds_in_a_fresh_process():
    """zoo_* ports register on `import secsweep.zoo`; a card must not depend on who imported what."""
    import subprocess
    import sys

    code = ("import sys; from secsweep import models; assert 'secsweep.zoo' not in sys.modules; "
            "m = models.build('zoo_mnist_cnn', {}); print(type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
