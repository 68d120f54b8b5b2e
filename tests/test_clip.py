"""CLIP support (secsweep.clip) and the `clip` encoder trainable, on real Fashion-MNIST.

One module-scoped run trains the small CLIP for 3 epochs on 2,000 image-caption pairs (captions from
class-name templates); the tests read its reports and its `encoder` artifact.
"""

from __future__ import annotations

import math

import pytest
import torch

from secsweep import artifacts, clip, data, models, registry
from secsweep.context import LocalContext
from secsweep.errors import ConfigError

torch.set_num_threads(1)

# 2,000 training pairs after the 10 % validation hold-out (222 images); 1,000 test / kNN-bank images
TRAIN = {"train_size": 2222, "epochs": 3, "batch_size": 32, "monitor_size": 1000}
CHANCE = 0.1  # ten Fashion-MNIST classes
# measured at these settings (16 s of one CPU core): zero-shot 0.67 test / 0.62 validation after 3
# epochs, kNN 0.64; untrained 0.10. The margins leave room for float differences across machines,
# not for a broken loss
MIN_ZERO_SHOT = 0.45
MIN_GAIN_OVER_UNTRAINED = 0.25


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    spec = registry.get("clip")
    cfg = spec.build_config(TRAIN)
    root = tmp_path_factory.mktemp("clip")
    ctx = LocalContext(workdir=root / "w", stage_root=root / "stages")
    spec.fn(cfg, ctx)
    return cfg, ctx, root / "w" / "outputs"


@pytest.fixture(scope="module")
def test_split(trained):
    cfg, _, _ = trained
    test = data.load(cfg.dataset, "test", image_size=cfg.image_size)
    return test.subset(torch.arange(cfg.monitor_size))  # the trainable's test split (cut to monitor_size)


def _zero_shot(model, split, cfg):
    return clip.zero_shot_accuracy(model, split.images, split.labels, data.class_names(cfg.dataset),
                                   data.DEFAULT_TEMPLATES)


@pytest.mark.slow
def test_trained_clip_classifies_zero_shot_well_above_chance_and_an_untrained_clip(trained, test_split):
    cfg, ctx, _ = trained
    last = ctx.history[-1]
    assert len(ctx.history) == cfg.epochs
    assert last["zero_shot_acc"] > MIN_ZERO_SHOT and last["val_zero_shot_acc"] > MIN_ZERO_SHOT, last
    assert last["knn_acc"] > 0.5, last  # the image tower alone separates the classes too
    untrained = _zero_shot(clip.create(cfg.model_config(), seed=cfg.seed), test_split, cfg)
    assert untrained < CHANCE + 0.1
    assert last["zero_shot_acc"] > untrained + MIN_GAIN_OVER_UNTRAINED
    # training lowered the contrastive loss
    assert ctx.history[-1]["train_loss"] < ctx.history[0]["train_loss"]


@pytest.mark.slow
def test_encoder_artifact_rebuilds_from_its_card_alone_with_identical_embeddings(trained, test_split):
    cfg, ctx, out = trained
    a, card = artifacts.load(out, "encoder", role="encoder")
    b, _ = artifacts.load(out, "encoder", role="encoder")
    assert card.arch == clip.ARCH and card.role == "encoder" and card.feature_dim == cfg.embed_dim
    mean, std = clip.default_mean_std()
    assert card.input == artifacts.InputContract(3, cfg.image_size, (0.0, 1.0), mean, std)
    assert isinstance(a, clip.CLIPModel) and a is not b
    x = test_split.images[:64]
    ea, eb = clip.encode_images(a, x, "cpu"), clip.encode_images(b, x, "cpu")
    assert torch.equal(ea, eb) and ea.shape == (64, cfg.embed_dim)
    assert torch.allclose(ea.norm(dim=1), torch.ones(64), atol=1e-5)
    texts = ["a photo of a Sneaker.", "a photo of a Bag."]
    assert torch.equal(clip.encode_texts(a, texts, "cpu"), clip.encode_texts(b, texts, "cpu"))
    # the reloaded weights are the trained ones: the reported zero-shot accuracy, recomputed
    assert _zero_shot(a, test_split, cfg) == pytest.approx(ctx.history[-1]["zero_shot_acc"], abs=1e-6)
    # an encoder consumer's view: forward = features = unnormalised image embedding, grey or RGB
    assert torch.allclose(a.eval()(x), clip.encode_images(a, x, "cpu", normalize=False), atol=1e-5)
    assert torch.allclose(a(x), a(x.expand(-1, 3, -1, -1)), atol=1e-6)


@pytest.mark.slow
def test_a_downstream_classifier_builds_on_the_clip_card(trained):
    _, _, out = trained
    _, card = artifacts.load(out, "encoder")
    head = models.build("encoder_classifier", {"encoder": card.describe(), "num_classes": 10})
    assert head(torch.rand(4, 1, 32, 32)).shape == (4, 10)
    with pytest.raises(ConfigError, match="num_classes=10"):
        models.build(clip.ARCH, {**card.args, "num_classes": 10})


def test_tokenizer_is_open_clips_offline_bpe(monkeypatch):
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(clip.OFFLINE_ENV, "1")
    model = clip.create(clip.small_config(context_length=20), seed=0)
    assert isinstance(model.tokenizer, open_clip.SimpleTokenizer)
    tokens = model.tokenize(["a photo of a T-shirt/top.", "an example of the class Ankle boot."])
    assert tokens.dtype == torch.long and tokens.shape == (2, 20)
    sot, eot = model.tokenizer.sot_token_id, model.tokenizer.eot_token_id
    assert (tokens[:, 0] == sot).all() and (tokens == eot).sum(1).tolist() == [1, 1]
    assert open_clip.decode(tokens[0]).replace("<start_of_text>", "").split("<end_of_text>")[0].strip() \
        == "a photo of a t - shirt / top ."
    # too long a caption is cut but keeps its end token (the text tower pools there)
    long = model.tokenize(["word " * 50])
    assert long.shape == (1, 20) and long[0, -1] == eot


def test_training_step_uses_clip_loss_and_clamps_the_logit_scale():
    model = clip.create(clip.small_config(context_length=8), seed=0)
    assert model.logit_scale.item() == pytest.approx(clip.INIT_LOGIT_SCALE)
    x, tokens = torch.rand(6, 1, 32, 32), model.tokenize([f"a photo of a {c}." for c in "abcdef"])
    loss = clip.clip_step()(model, x, tokens, None)
    u, v, s = model(x, tokens)
    logits = s * u @ v.T
    target = torch.arange(6)
    expected = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    clip.clamp_logit_scale(model)(1)
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


@pytest.mark.parametrize("values, field", [
    ({"vision_patch": 5}, "vision_patch=5"),
    ({"vision_width": 60}, "vision_width=60"),
    ({"pretrained": "ViT-B-32"}, "pretrained='ViT-B-32'"),
    ({"context_length": 1}, "context_length=1"),
])
def test_bad_config_is_one_line_error(values, field):
    with pytest.raises(ConfigError) as e:
        registry.get("clip").build_config(values)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_bad_open_clip_configs_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="image_size=30: must be a multiple of patch_size=4") as e:
        clip.small_config(image_size=30, patch_size=4)
    assert "\n" not in str(e.value)
    hf = clip.small_config()
    hf["text_cfg"] = {**hf["text_cfg"], "hf_tokenizer_name": "bert-base-uncased"}
    with pytest.raises(ConfigError, match="needs internet"):
        clip.create(hf)
    with pytest.raises(ConfigError, match="embed_dim"):
        clip.create({"vision_cfg": {}})


def test_pretrained_weights_offline_are_a_one_line_error(monkeypatch):
    monkeypatch.setenv(clip.OFFLINE_ENV, "1")
    with pytest.raises(ConfigError, match="needs internet") as e:
        clip.from_pretrained("ViT-B-32", "openai")
    assert "\n" not in str(e.value) and "pretrained=ViT-B-32:openai" in str(e.value)
    with pytest.raises(ConfigError, match="no pretrained tag 'nope'"):
        clip.from_pretrained("ViT-B-32", "nope")
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        clip.from_pretrained("ViT-Q-99", "openai")


@pytest.mark.slow
def test_pretrained_from_a_local_checkpoint_loads_its_weights_and_skips_training(trained, tmp_path, monkeypatch):
    """The `pretrained` path offline: open_clip loads MODEL:/path/to/checkpoint (here the trained
    CLIP's open_clip weights as safetensors), and the trainable evaluates and saves it untrained."""
    from safetensors.torch import save_file

    cfg, ctx, out = trained
    model, _ = artifacts.load(out, "encoder")
    ckpt = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.clip.state_dict().items()}, str(ckpt))
    monkeypatch.setenv(clip.OFFLINE_ENV, "1")  # a local file needs no internet
    spec = registry.get("clip")
    name = clip.config_name(cfg.model_config())
    pcfg = spec.build_config({**TRAIN, "pretrained": f"{name}:{ckpt}"})
    pctx = LocalContext(workdir=tmp_path / "w", stage_root=tmp_path / "stages")
    spec.fn(pcfg, pctx)
    assert len(pctx.history) == 1 and pctx.history[0]["epoch"] == 0  # no training
    assert pctx.history[0]["zero_shot_acc"] == pytest.approx(ctx.history[-1]["zero_shot_acc"], abs=1e-6)
    reloaded, card = artifacts.load(tmp_path / "w" / "outputs", "encoder", role="encoder")
    x = torch.rand(8, 1, 32, 32)
    assert torch.equal(clip.encode_images(reloaded, x, "cpu"), clip.encode_images(model, x, "cpu"))


class _RunsCode:
    """A pickle whose reduce would run code: a CLIP checkpoint must never execute it."""

    def __reduce__(self):
        import os as _os

        return (_os.system, (f"touch {_MARKER}",))


_MARKER = "/tmp/secsweep-clip-pickle-ran"


def test_local_clip_checkpoints_go_through_safeload(tmp_path):
    """A local CLIP checkpoint is read by secsweep.safeload: a `state_dict` wrapper with DataParallel's
    `module.` prefix loads the same weights, a pickle that would run code is refused without running,
    and a checkpoint of another architecture is a one-line error."""
    import os

    from secsweep import safeload

    config = clip.small_config(embed_dim=32, vision_width=32, patch_size=8)
    name = clip.register_config(config)
    source = clip.create(config, seed=1)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.clip.state_dict().items()}, "epoch": 3}, wrapped)
    loaded = clip.from_pretrained(name, str(wrapped), cache_dir=str(tmp_path / "cache"))
    assert all(torch.equal(v, loaded.clip.state_dict()[k]) for k, v in source.clip.state_dict().items())
    assert safeload.conversion_record(wrapped) is not None  # converted once, sha256 recorded

    if os.path.exists(_MARKER):
        os.remove(_MARKER)
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _RunsCode()}, evil)
    with pytest.raises(Exception) as e:
        clip.from_pretrained(name, str(evil))
    assert "evil.pt" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(_MARKER), "the checkpoint's pickle ran code"

    other = clip.small_config(embed_dim=48, vision_width=32, patch_size=8)
    misfit = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in clip.create(other).clip.state_dict().items()}, str(misfit))
    with pytest.raises(ConfigError, match="does not fit"):
        clip.from_pretrained(name, str(misfit))
