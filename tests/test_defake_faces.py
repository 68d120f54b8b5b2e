"""DE-FAKE's face corpus (docs/methods.md "DE-FAKE"): the pre-trained DCGAN of gan-face-generate,
read through secsweep.safeload into trainables/generators/face_gan.py, against scikit-image's 100
real lfw_subset faces; the image-only detector trained on them."""

from __future__ import annotations

import pytest
import torch

from secsweep import registry
from secsweep.context import LocalContext
from secsweep.data import lfw_faces
from secsweep.refs import StageRef

from trainables import defake
from trainables.generators import face_gan

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return tmp_path_factory.mktemp("face_stages")


@pytest.fixture(scope="module")
def corpus(stages, tmp_path_factory):
    ctx = LocalContext(workdir=tmp_path_factory.mktemp("faces"), stage_root=stages)
    return defake.read_corpus(ctx.stage(StageRef("defake_faces")))


def test_pretrained_weights_make_face_like_images_of_the_real_faces_shape(tmp_path):
    gan = face_gan.load_face_gan(cache_dir=tmp_path)  # sha256-pinned, strict load: a misfit raises
    faces = face_gan.to_grey(face_gan.sample(gan, 64, torch.Generator().manual_seed(0)), 25)
    real = lfw_faces().images
    assert faces.shape == (64, 1, 25, 25) == (64, *real.shape[1:])
    # an untrained DCGAN in eval mode makes (almost) constant images; the trained one varies like photos
    torch.manual_seed(0)
    untrained = type(gan)().eval()
    assert float(face_gan.sample(untrained, 64, torch.Generator().manual_seed(0)).std()) < 0.01
    assert 0.5 * float(real.std()) < float(faces.std()) < 2 * float(real.std())


def test_real_and_fake_faces_share_encoding_size_and_value_range(corpus):
    assert corpus.pixels.dtype == torch.uint8  # one encoding: 8-bit levels for every source
    assert corpus.generators == ("face_gan",)
    real, fake = corpus.pixels[corpus.source == 0], corpus.pixels[corpus.source == 1]
    assert len(real) == len(fake) == 100
    assert real.shape[1:] == fake.shape[1:] == (1, 25, 25)
    images = corpus.images
    assert torch.equal(images * 255, (images * 255).round()) and 0 <= float(images.min()) <= float(images.max()) <= 1
    # both sources use (nearly) the whole 0..255 range: no source is recognisable by its range alone
    for x in (real, fake):
        assert int(x.min()) <= 10 and int(x.max()) >= 240
    # the prompts say nothing about the source
    assert set(corpus.prompts[:100]) <= {t.format("face") for t in defake.corpus.data_mod.DEFAULT_TEMPLATES}
    assert set(p.split()[-1] for p in corpus.prompts) == {"face."}
    # every split holds both sources equally (60 / 20 / 20 per source)
    for split, n in (("train", 60), ("val", 20), ("test", 20)):
        idx = corpus.where(split)
        assert int((corpus.source[idx] == 0).sum()) == int((corpus.source[idx] == 1).sum()) == n


def test_image_detector_tells_lfw_faces_from_gan_faces_on_held_out_images(stages, tmp_path):
    spec = registry.get("defake_image")
    # 120 training images: batch 32 x 80 epochs = 320 SGD steps (6 seeds: test acc 0.825-1.0, mean 0.93)
    cfg = spec.build_config({"corpus": "defake_faces", "task": "detect", "epochs": 80, "batch_size": 32, "seed": 0})
    ctx = LocalContext(workdir=tmp_path / "det", stage_root=stages)
    spec.fn(cfg, ctx)
    last = ctx.history[-1]
    # 40 held-out test images (20 real, 20 fake): >= 0.75 has p < 0.001 under guessing (measured 1.0)
    assert last["acc"] >= 0.75, last
    # the GAN's faces are smoother than the photographs (the spectrum a pixel detector can use)
    assert last["hf_share/face_gan"] < last["hf_share/real"]
