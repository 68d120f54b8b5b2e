"""PoisonedEncoder (trainables/attacks/poisonedencoder.py): the combined images, the poisoning rate,
and a tiny run on sklearn digits that yields an encoder artifact, the target hook and finite metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from secsweep import artifacts, data, registry, ssl
from secsweep.context import LocalContext
from secsweep.errors import ConfigError
from secsweep.stages import StageOutput
from trainables.attacks import poisonedencoder as pe

torch.set_num_threads(1)


def _half(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(x[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]


@pytest.fixture(scope="module")
def digits():
    return data.load("mnist", "test", image_size=16)


def test_combined_image_holds_the_target_and_the_reference_side_by_side(digits):
    t, r = digits.images[0], digits.images[1]
    assert not torch.allclose(t, r)
    side = pe.combine(t, r, vertical=False, target_first=True)
    assert side.shape == t.shape
    # each half is its input squashed to half the width (one column each side of the seam is blended)
    assert torch.allclose(side[:, :, :7], _half(t, 16, 8)[:, :, :7], atol=0.05)
    assert torch.allclose(side[:, :, 9:], _half(r, 16, 8)[:, :, 1:], atol=0.05)
    flipped = pe.combine(t, r, vertical=True, target_first=False)   # reference on top, target below
    assert torch.allclose(flipped[:, 9:, :], _half(t, 8, 16)[:, 1:, :], atol=0.05)
    assert torch.allclose(flipped[:, :7, :], _half(r, 8, 16)[:, :7, :], atol=0.05)
    with pytest.raises(ValueError):
        pe.combine(t, r[:, :8], vertical=False, target_first=True)


def test_poisoned_set_has_exactly_the_rate_and_uses_every_reference_in_turn(digits):
    clean = digits.images[:990]
    target, refs = digits.images[990], digits.images[991:996]      # 5 references
    images, is_poisoned = pe.poisoned_images(clean, target, refs, rate=0.01, layout="random",
                                             gen=torch.Generator().manual_seed(0))
    assert len(images) == 1000 and int(is_poisoned.sum()) == 10
    assert int(is_poisoned.sum()) / len(images) == 0.01
    assert torch.equal(images[:990], clean) and not is_poisoned[:990].any()
    # every poisoned image is the target combined with one reference, in one of the four layouts;
    # with 10 images and 5 references each reference is used exactly twice; "random" mixes axes
    used, axes = [], set()
    for img in images[is_poisoned]:
        hits = [(k, v) for k in range(len(refs)) for v in (False, True) for f in (False, True)
                if torch.allclose(img, pe.combine(target, refs[k], vertical=v, target_first=f))]
        assert len(hits) == 1
        used.append(hits[0][0])
        axes.add(hits[0][1])
    assert sorted(used) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and axes == {False, True}
    same = pe.poisoned_images(clean, target, refs, rate=0.01, layout="random", gen=torch.Generator().manual_seed(0))
    assert torch.equal(same[0], images)                            # seeded
    assert pe.n_poison(9000, 0.01) == 91                            # 91 / 9091 = 1.0 %


def test_bad_values_fail_with_the_field_named():
    spec = registry.get("poisonedencoder")
    for values, field in (({"layout": "diagonal"}, "layout"), ({"poison_rate": 1.5}, "poison_rate"),
                          ({"target_class": 10}, "target_class"), ({"n_reference": 0}, "n_reference")):
        with pytest.raises(ConfigError, match=field):
            spec.build_config(values)


TINY = {"dataset": "digits", "downstream": "digits", "train_size": 600, "epochs": 2, "batch_size": 64,
        "monitor_size": 200, "downstream_size": 400, "n_reference": 20, "target_class": 3}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pe")
    spec = registry.get("poisonedencoder")
    cfg = spec.build_config(TINY)
    ctx = LocalContext(workdir=root / "w", stage_root=root / "stages")
    spec.fn(cfg, ctx)
    return spec, cfg, ctx, root


def test_tiny_run_saves_an_encoder_the_target_and_finite_metrics(tiny_run):
    spec, cfg, ctx, root = tiny_run
    last = ctx.history[-1]
    for m in spec.metrics:
        assert isinstance(last[m], float) and math.isfinite(last[m]), m
    n_clean = len(ssl.load_splits(cfg, ctx).train)                     # 539 digits after the val hold-out
    assert last["n_poisoned"] == pe.n_poison(n_clean, 0.01) == 5
    assert last["poison_fraction"] == pytest.approx(5 / (n_clean + 5))
    assert last["asr"] in (0.0, 1.0) and last["clean_asr"] in (0.0, 1.0)
    assert last["poisoned_acc"] > 0.5 and last["clean_acc"] > 0.5       # the probes learnt the task
    # what the tiny scale shows (docs/methods.md, PoisonedEncoder): the poison leaves the downstream
    # accuracy alone (measured 0.911 vs 0.903 here; 0.864-0.879 vs 0.862 at 2,000 Fashion-MNIST
    # images x 20 epochs), while the target input does not flip (ASR 0 of 3 trials there)
    assert abs(last["poisoned_acc"] - last["clean_acc"]) < 0.05
    assert last["target_similarity"] != last["clean_target_similarity"]  # a different encoder
    encoder, card = artifacts.load(root / "w" / "outputs", "encoder", role="encoder")
    assert card.provenance == {} or card.provenance.get("trainable", "poisonedencoder") == "poisonedencoder"
    assert encoder(torch.rand(2, 1, 8, 8)).shape == (2, 64)
    # the target hook: the target input (a test image of another class) and the target class
    image, target_class = spec.hooks["target"](cfg, StageOutput(root / "w" / "outputs", {}))
    test = data.load("digits", "test")
    match = [i for i in range(len(test)) if torch.equal(test.images[i], image)]
    assert target_class == 3 and match and int(test.labels[match[0]]) != 3
