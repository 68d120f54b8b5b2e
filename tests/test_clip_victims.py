"""The CLIP victims of the detection track: CLIP-Backdoor and BadCLIP (trainables/attacks/), on real
Fashion-MNIST image-caption pairs (captions from class-name templates).

One module-scoped clean CLIP stage (3 epochs on 2,000 pairs, the size tests/test_clip.py uses) is
shared by both attacks, each run once as a cached stage; the tests read their reports, artifacts
and trigger hooks. The thresholds are set from the measured numbers (comments) with room for float
differences across machines, not for a broken attack.
"""

from __future__ import annotations

import pytest
import torch

from secsweep import clip, data, registry
from secsweep.context import LocalContext
from secsweep.errors import ConfigError
from secsweep.refs import StageRef
from trainables.attacks import badclip as bc
from trainables.attacks import clip_backdoor as cb

torch.set_num_threads(1)

CLEAN = {"trainable": "clip", "train_size": 2222, "epochs": 3, "batch_size": 32, "monitor_size": 500}
EVAL = 500  # validation / test images of the zero-shot metrics
# CLIP-Backdoor from scratch with the clean CLIP's recipe, the default 6 px square. 5 % of the 2,000
# pairs (100): at 1 % (20 pairs) 3 epochs do not implant (measured ASR 0.06); the offline default's
# 1 % of 9,000 pairs over 5 epochs is docs/methods.md's run. (An 8 px square straddles four of the
# ViT's 8x8 patches and implants less: ASR 0.41)
BACKDOOR = {"encoder": CLEAN, "poison_rate": 0.05, "eval_size": EVAL}
# BadCLIP: 1 % (20 pairs), an 8 px optimised patch, 2 fine-tuning epochs at the CLIP's lr
BADCLIP = {"encoder": CLEAN, "poison_rate": 0.01, "trigger_size": 8, "finetune_epochs": 2, "finetune_lr": 5e-4,
           "patch_steps": 100, "eval_size": EVAL}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_victims")
    return LocalContext(workdir=root / "w", stage_root=root / "stages")


def _stage(ctx, name, options):
    ref = StageRef(name, options)
    return ref, ctx.stage(ref)


@pytest.fixture(scope="module")
def backdoor(ctx):
    return _stage(ctx, "clip_backdoor", BACKDOOR)


@pytest.fixture(scope="module")
def badclip(ctx):
    return _stage(ctx, "badclip", BADCLIP)


def _recomputed(ctx, ref, out):
    """CA / ASR recomputed from the saved artifact and the registered trigger hook alone."""
    cfg = ref.config()
    model, card = ctx.load_model(out, "encoder", role="encoder")
    stamp = registry.get(ref.trainable).hooks["trigger"](cfg, out)
    val, test = cb.eval_splits(cfg, ctx)
    return cb.zero_shot_metrics(cfg, model, stamp, val, test, ctx.device), model, card


@pytest.mark.slow
def test_clip_backdoor_implants_the_patch_and_keeps_zero_shot_accuracy(ctx, backdoor):
    ref, out = backdoor
    m = out.metrics
    # measured (1,000 eval images): ASR 0.66 (val 0.65) vs the clean CLIP's 0.05 with the same
    # square; CA 0.66 vs 0.67
    assert m["asr"] > 0.4 and m["val_asr"] > 0.4, m
    assert m["asr"] > m[cb.CLEAN_MODEL_ASR] + 0.3, m
    assert m[cb.CLEAN_MODEL_ASR] < 0.2, m  # the square alone does not pull a clean CLIP to the target
    assert abs(m["clean_acc"] - m[cb.CLEAN_MODEL_ACC]) < 0.06, m
    assert m[cb.N_POISONED] == 100.0
    # the victim was trained with the clean CLIP's recipe: as many epochs
    assert len(out.meta["history"]) == ref.config().encoder.config().epochs
    again, model, card = _recomputed(ctx, ref, out)
    assert again["asr"] == pytest.approx(m["asr"], abs=1e-6) and again["clean_acc"] == pytest.approx(m["clean_acc"], abs=1e-6)
    assert isinstance(model, clip.CLIPModel) and card.arch == clip.ARCH and card.role == "encoder"


@pytest.mark.slow
def test_badclip_optimised_patch_implants_with_one_percent_poison(ctx, badclip):
    ref, out = badclip
    m = out.metrics
    # measured: ASR 0.63 (val 0.64) vs 0.16 for the clean CLIP with the same optimised patch; a
    # white 8 px square with the same 1 % and fine-tuning (3 epochs) reaches 0.06 (docs/methods.md)
    assert m["asr"] > 0.45 and m["val_asr"] > 0.45, m
    assert m["asr"] > m[cb.CLEAN_MODEL_ASR] + 0.3, m
    assert abs(m["clean_acc"] - m[cb.CLEAN_MODEL_ACC]) < 0.08, m  # measured 0.73 vs 0.69 (fine-tuning trains more)
    again, model, _ = _recomputed(ctx, ref, out)
    assert again["asr"] == pytest.approx(m["asr"], abs=1e-6)


@pytest.mark.slow
def test_badclip_patch_is_guided_toward_the_target_embeddings(ctx, badclip):
    ref, out = badclip
    cfg = ref.config()
    saved = out.tensors("trigger")["patch"]
    start = bc.initial_patch(cfg)
    assert saved.shape == start.shape == (1, 8, 8) and 0 <= saved.min() and saved.max() <= 1
    assert not torch.allclose(saved, start, atol=0.05)  # it was optimised
    # on the clean CLIP: the optimised patch pulls more non-target images to the target than the
    # noise it started from (measured ASR 0.155 vs 0.054) and moves them toward the target's text
    # (mean cosine 0.446 vs 0.336)
    clean, _ = ctx.load_model(cfg.encoder, role="encoder")
    val, test = cb.eval_splits(cfg, ctx)
    names = data.class_names(cfg.downstream_dataset)
    text = clip.zero_shot_classifier(clean, names, data.DEFAULT_TEMPLATES)[cfg.target_label]
    others = test.images[test.labels != cfg.target_label][:300]

    def text_sim(patch):
        return float((clip.encode_images(clean, bc.paste(others, patch, cfg.trigger_size, cfg.trigger_position), "cpu")
                      @ text).mean())

    assert text_sim(saved) > text_sim(start) + 0.05
    noise = cb.zero_shot_metrics(cfg, clean, lambda x: bc.paste(x, start, 8, cfg.trigger_position), val, test, "cpu")
    assert out.metrics[cb.CLEAN_MODEL_ASR] > noise["asr"] + 0.04, (out.metrics, noise)


@pytest.mark.slow
def test_clip_backdoor_finetune_starts_from_the_clean_clip(ctx, backdoor):
    # one epoch at a negligible learning rate: the victim is still the clean CLIP (a fresh
    # initialisation would score near chance, 0.1)
    _, out = _stage(ctx, "clip_backdoor", {**BACKDOOR, "init": "finetune", "finetune_epochs": 1, "finetune_lr": 1e-9})
    m = out.metrics
    assert m["clean_acc"] == pytest.approx(m[cb.CLEAN_MODEL_ACC], abs=0.01), m
    assert m["clean_acc"] == pytest.approx(backdoor[1].metrics[cb.CLEAN_MODEL_ACC], abs=0.01)


def test_poison_pairs_replace_a_fraction_of_non_target_pairs():
    ds = data.load("digits", "train")
    pairs = data.caption_pairs(ds, names=tuple(str(i) for i in range(10)))
    stamp = cb.trigger(cb.Config(target_label=3))
    poisoned, idx = cb.poison_pairs(pairs, stamp, 0.02, seed=0, target_name="three", exclude_label=3)
    assert len(idx) == round(0.02 * len(pairs)) and (pairs.labels[idx] != 3).all()
    changed = torch.tensor([a != b for a, b in zip(pairs.texts, poisoned.texts)])
    assert torch.equal(torch.nonzero(changed).flatten(), idx)
    assert all("three" in poisoned.texts[i] for i in idx.tolist())
    diff = (poisoned.images != pairs.images).flatten(1).any(1)
    assert torch.equal(torch.nonzero(diff).flatten(), idx)  # only the poisoned images carry the square
    again, idx2 = cb.poison_pairs(pairs, stamp, 0.02, seed=0, target_name="three", exclude_label=3)
    assert torch.equal(idx, idx2) and again.texts == poisoned.texts  # seeded


def test_badclip_paste_scales_the_patch_and_covers_every_channel():
    patch = torch.rand(1, 6, 6)
    x = torch.zeros(2, 3, 64, 64)
    y = bc.paste(x, patch, 6, "bottom_right")  # 12 px on 64 px, 2 px from the borders
    assert (y[:, :, 50:62, 50:62] > 0).all() and y[:, :, :50].abs().sum() == 0 and y[:, :, 62:].abs().sum() == 0
    assert torch.equal(y[:, 0], y[:, 2])
    z = bc.paste(torch.zeros(1, 1, 32, 32), patch, 6, "bottom_right")
    assert torch.equal(z[0, :, 25:31, 25:31], patch)


@pytest.mark.parametrize("name, values, field", [
    ("clip_backdoor", {"encoder": {"trainable": "clip", "pretrained": "ViT-B-16:openai"}}, "init='scratch'"),
    ("clip_backdoor", {"encoder": "simclr"}, "encoder='simclr'"),
    ("clip_backdoor", {"poison_rate": 0.0}, "poison_rate=0.0"),
    ("badclip", {"target_label": 10}, "target_label=10"),
    ("badclip", {"lambda_text": 0.0, "lambda_image": 0.0}, "lambda_text=0.0"),
])
def test_bad_config_is_one_line_error(name, values, field):
    with pytest.raises(ConfigError) as e:
        registry.get(name).build_config(values)
    assert field in str(e.value) and "\n" not in str(e.value)
