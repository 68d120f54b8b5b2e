"""DE-FAKE's text-to-image corpus (trainables/defake/t2i.py; docs/methods.md "DE-FAKE"): real
captioned images against diffusers pipelines' fakes of the same captions.

Offline and tiny: two text-to-image pipelines built from configs with random weights (a Stable
Diffusion pipeline — UNet2DConditionModel, AutoencoderKL, a CLIP text encoder and tokenizer — and a
Latent Diffusion one — LDMBert, VQModel), saved with safetensors and loaded back by folder as a
user's downloaded pipelines would be; 12 of scikit-image's lfw_subset faces as the "real" images
with made-up captions, in the csv, jsonl and MSCOCO caption formats. Random weights make noise, not
faces: the tests check the mechanics (loading, prompts, encoding, splits, refusals), and that a
detector trains on the corpus; nothing about detection quality.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from secsweep import registry
from secsweep.context import LocalContext
from secsweep.data import lfw_faces
from secsweep.errors import ArtifactError, ConfigError
from secsweep.refs import StageRef

from trainables import defake
from trainables.defake import t2i

torch.set_num_threads(1)

N_REAL = 12
SIZE = 32            # pixels of the corpus images
PER_SOURCE = 10      # of the 12 captioned images: split 6 / 2 / 2


def _byte_chars() -> list[str]:
    """The 256 characters byte-level BPE writes for the bytes 0..255 (printable Latin-1 bytes are
    themselves, the others are shifted past 255): the alphabet of a merge-less CLIP vocabulary."""
    kept = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    shifted = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(shifted)) for b in range(256)]


def build_sd(folder: Path, seed: int = 0) -> Path:
    """A tiny random Stable Diffusion pipeline (32 px out) saved with safetensors to `folder`."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})  # word-final pieces
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                        projection_dim=16, bos_token_id=512, eos_token_id=513, pad_token_id=513))
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=32)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_ldm(folder: Path, seed: int = 1) -> Path:
    """A tiny random Latent Diffusion text-to-image pipeline (LDMBert + VQModel) saved with safetensors."""
    from diffusers import DDIMScheduler, LDMTextToImagePipeline, UNet2DConditionModel, VQModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "person", "face"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, model_max_length=77)
    torch.manual_seed(seed)
    # LDM's pipeline pads prompts to 77 tokens: the position table must be that long
    bert = LDMBertModel(LDMBertConfig(vocab_size=len(words), max_position_embeddings=77, encoder_layers=1,
                                      encoder_ffn_dim=32, encoder_attention_heads=2, head_dim=8, d_model=16))
    unet = UNet2DConditionModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4)
    vq = VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(4, 8),
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 layers_per_block=1, norm_num_groups=4, num_vq_embeddings=16, vq_embed_dim=3)
    LDMTextToImagePipeline(vqvae=vq, bert=bert, tokenizer=tok, unet=unet,
                           scheduler=DDIMScheduler()).save_pretrained(folder, safe_serialization=True)
    return folder


def real_images() -> list[np.ndarray]:
    """12 lfw_subset faces as uint8: even ones grey 25 x 25, odd ones tinted RGB 25 x 36 (not square)."""
    faces = lfw_faces().images[:N_REAL]
    out = []
    for i, f in enumerate(faces):
        if i % 2:
            wide = torch.nn.functional.interpolate(f[None], size=(25, 36), mode="bilinear")[0]
            rgb = torch.cat([wide, wide * 0.8, wide * 0.6])
            out.append((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        else:
            out.append((f[0].numpy() * 255).round().astype(np.uint8))
    return out


def caption_of(i: int) -> str:
    return f"a photo of person number {i}, face {i % 3}"


def write_csv_folder(root: Path) -> Path:
    """Images under img/ and captions.csv (file, caption)."""
    from PIL import Image

    (root / "img").mkdir(parents=True)
    rows = []
    for i, x in enumerate(real_images()):
        Image.fromarray(x).save(root / "img" / f"face{i:02d}.png")
        rows.append({"file": f"img/face{i:02d}.png", "caption": caption_of(i)})
    with (root / t2i.CSV_INDEX).open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "caption"])
        w.writeheader()
        w.writerows(rows)
    return root


def write_coco_folder(root: Path) -> Path:
    """The same images in MSCOCO's layout: train2014/ and annotations/captions_train2014.json with two
    captions per image (the first one counts) and the annotations in shuffled order."""
    from PIL import Image

    (root / "train2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i, x in enumerate(real_images()):
        name = f"COCO_train2014_{i:012d}.png"
        Image.fromarray(x).save(root / "train2014" / name)
        images.append({"id": 1000 + i, "file_name": name, "height": x.shape[0], "width": x.shape[1]})
        anns.append({"id": 2 * i, "image_id": 1000 + i, "caption": caption_of(i)})
    for i in range(N_REAL):  # a second caption per image, after all the first ones
        anns.append({"id": 2 * i + 1, "image_id": 1000 + i, "caption": f"another caption {i}"})
    (root / "annotations" / "captions_train2014.json").write_text(
        json.dumps({"info": {}, "images": images[::-1], "annotations": anns}))
    # MSCOCO's annotation zip also holds the val2014 captions; their images were not downloaded
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg"}],
         "annotations": [{"id": 1, "image_id": 1, "caption": "a val caption"}]}))
    return root


def contract_values(root: Path) -> dict:
    """A tiny runnable config of defake_t2i_corpus (tests/test_contract.py runs every trainable)."""
    return {"captions": str(write_csv_folder(root / "captions")), "pipelines": [str(build_sd(root / "tiny-sd"))],
            "per_source": 4, "image_size": SIZE, "steps": 2, "batch_size": 4}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    return {"csv": write_csv_folder(root / "csv"), "coco": write_coco_folder(root / "coco"),
            "sd": build_sd(root / "tiny-sd"), "ldm": build_ldm(root / "tiny-ldm"), "stages": root / "stages",
            "root": root}


def corpus_values(world, captions="csv", **kw) -> dict:
    return {"captions": str(world[captions]),
            "pipelines": [str(world["sd"]), str(world["ldm"])], "per_source": PER_SOURCE, "image_size": SIZE,
            "steps": 2, "batch_size": 4, "train_fraction": 0.6, "val_fraction": 0.2, **kw}


@pytest.fixture(scope="module")
def corpus_out(world, tmp_path_factory):
    ctx = LocalContext(workdir=tmp_path_factory.mktemp("t2i_run"), stage_root=world["stages"])
    return ctx.stage(StageRef("defake_t2i_corpus", corpus_values(world)))


@pytest.fixture(scope="module")
def corpus(corpus_out):
    return defake.read_corpus(corpus_out)


def test_real_and_fake_share_encoding_size_value_grid_and_prompts(world, corpus, corpus_out):
    assert corpus.generators == ("tiny-sd", "tiny-ldm")
    assert corpus.pixels.dtype == torch.uint8
    n = PER_SOURCE
    assert corpus.pixels.shape == (3 * n, 3, SIZE, SIZE)
    assert corpus.source.tolist() == [0] * n + [1] * n + [2] * n
    assert corpus.labels.tolist() == [0] * (3 * n)   # no classes
    images = corpus.images
    assert images.dtype == torch.float32 and torch.equal((images * 255).round() / 255, images)
    by_source = [corpus.pixels[corpus.source == s] for s in range(3)]
    assert {tuple(x.shape[1:]) for x in by_source} == {(3, SIZE, SIZE)}
    # the fakes are real pipeline output: not copies of the real images, different per pipeline
    assert not torch.equal(by_source[1], by_source[0]) and not torch.equal(by_source[1], by_source[2])
    assert all(float(x.float().std()) > 1 for x in by_source)
    # every source's prompts are the real images' captions, in the same order
    meta = json.loads((Path(corpus_out.path) / defake.PROMPTS_FILE).read_text())
    files = meta["real_files"]
    chosen = [int(f[len("img/face"):-len(".png")]) for f in files]
    assert len(chosen) == n == len(set(chosen)) and chosen == sorted(chosen)
    want = [caption_of(i) for i in chosen]
    assert [list(corpus.prompts[s * n:(s + 1) * n]) for s in range(3)] == [want] * 3
    # the real pixels are the files through the one resize / crop / quantise path
    from PIL import Image

    for k, i in enumerate(chosen[:3]):
        with Image.open(world["csv"] / files[k]) as im:
            x = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255
        assert torch.equal(by_source[0][k], defake.corpus.quantise(t2i.fit(x, SIZE))[0])


def test_splits_are_as_configured_and_shared_by_a_caption_across_sources(corpus):
    n = PER_SOURCE
    per = corpus.split.view(3, n)
    assert torch.equal(per[0], per[1]) and torch.equal(per[0], per[2])   # a caption's images share a split
    assert [int((per[0] == k).sum()) for k in range(3)] == [6, 2, 2]     # 0.6 / 0.2 / rest


def test_fit_resizes_the_shorter_side_and_crops_the_centre():
    x = torch.zeros(1, 3, 20, 40)
    x[..., 20:] = 1.0  # dark left half, bright right half
    y = t2i.fit(x, 10)  # 20 x 40 -> 10 x 20 -> the middle 10 columns: 5 dark, 5 bright
    assert y.shape == (1, 3, 10, 10)
    assert float(y[..., :4].max()) < 0.1 and float(y[..., 6:].min()) > 0.9
    assert t2i.fit(torch.rand(2, 3, 7, 5), 16).shape == (2, 3, 16, 16)  # small images are enlarged


def test_fakes_do_not_depend_on_the_batch_they_were_made_in(world):
    pipe = t2i.load_pipeline(str(world["sd"]), "cpu", download=False)
    prompts = [caption_of(i) for i in range(3)]
    one = registry.get("defake_t2i_corpus").build_config({**corpus_values(world), "batch_size": 1})
    three = registry.get("defake_t2i_corpus").build_config({**corpus_values(world), "batch_size": 3})
    a, flagged = t2i.generate(pipe, prompts, [5, 6, 7], one)
    b, _ = t2i.generate(pipe, prompts, [5, 6, 7], three)
    assert flagged == 0  # no safety checker in the tiny pipeline
    assert int((a.int() - b.int()).abs().max()) <= 1  # float rounding at a level boundary at most
    c, _ = t2i.generate(pipe, prompts, [8, 9, 10], three)
    assert not torch.equal(a, c)  # other seeds, other fakes


def test_mscoco_and_jsonl_caption_formats_read_as_the_csv(world, tmp_path):
    csv_entries = t2i.read_captions(world["csv"])
    coco_entries = t2i.read_captions(world["coco"])
    assert [c for _, c in csv_entries] == [caption_of(i) for i in range(N_REAL)]
    # MSCOCO: images in the order of "images" (here reversed), the first caption of each, under train2014/
    assert coco_entries == tuple((f"train2014/COCO_train2014_{i:012d}.png", caption_of(i))
                                 for i in reversed(range(N_REAL)))
    jsonl = tmp_path / "jsonl"
    shutil.copytree(world["csv"] / "img", jsonl / "img")
    (jsonl / t2i.JSONL_INDEX).write_text("\n".join(json.dumps({"file": f, "caption": c}) for f, c in csv_entries))
    assert t2i.read_captions(jsonl) == csv_entries
    # the same real pixels from the MSCOCO folder as from the csv one (one pipeline suffices here)
    ctx = LocalContext(workdir=tmp_path / "w", stage_root=world["stages"])
    values = corpus_values(world, "coco", per_source=N_REAL, pipelines=[str(world["sd"])])
    coco_out = ctx.stage(StageRef("defake_t2i_corpus", values))
    assert coco_out.metrics[t2i.N_IMAGES] == 2 * N_REAL
    coco = defake.read_corpus(coco_out)
    csv_corpus = defake.read_corpus(ctx.stage(StageRef("defake_t2i_corpus", {**values, "captions": str(world["csv"])})))
    # MSCOCO lists the images in reverse here: the same pixels in reverse order
    assert torch.equal(coco.pixels[coco.source == 0].flip(0), csv_corpus.pixels[csv_corpus.source == 0])
    assert coco.prompts[:N_REAL] == csv_corpus.prompts[:N_REAL][::-1]


def test_pipeline_with_only_pickled_weights_is_refused_and_its_payload_never_runs(world, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    bad = tmp_path / "pickled-sd"   # the tiny SD, its UNet weights replaced by a pickle that would run code
    shutil.copytree(world["sd"], bad)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"w": Payload()}, bad / "unet" / "diffusion_pytorch_model.bin")
    # the config refuses it before any trial starts, in one line
    with pytest.raises(ConfigError) as e:
        registry.get("defake_t2i_corpus").build_config({**corpus_values(world), "pipelines": [str(bad)]})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"pipelines={str(bad)!r}") and "unet/diffusion_pytorch_model.bin" in msg
    assert "safetensors" in msg
    # named as the nested field when it comes through a detector's corpus (as a sweep plans it)
    with pytest.raises(ConfigError, match=r"^corpus\.pipelines="):
        registry.get("defake_image").build_config({"corpus": {"trainable": "defake_t2i_corpus",
                                                              **corpus_values(world), "pipelines": [str(bad)]}})
    # and the loader itself (what a Hub download goes through) loads safetensors only
    with pytest.raises(ArtifactError) as e:
        t2i.load_pipeline(str(bad), "cpu", download=False)
    assert "\n" not in str(e.value) and "safetensors" in str(e.value)
    assert not marker.exists()
    # the payload is real: an unrestricted unpickler would have run it
    torch.load(bad / "unet" / "diffusion_pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_a_hub_pipeline_offline_and_a_folder_that_is_no_pipeline_fail_in_one_line(world, tmp_path):
    with pytest.raises(ArtifactError, match="--download") as e:
        t2i.load_pipeline("nobody-here/no-such-pipeline", "cpu", download=False)
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model_index.json"):
        registry.get("defake_t2i_corpus").build_config({**corpus_values(world), "pipelines": [str(tmp_path / "empty")]})
    with pytest.raises(ConfigError, match="pipelines="):
        registry.get("defake_t2i_corpus").build_config({**corpus_values(world), "pipelines": [str(world["sd"])] * 2})


def _error(values: dict) -> str:
    with pytest.raises(ConfigError) as e:
        registry.get("defake_t2i_corpus").build_config(values)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_bad_caption_folders_fail_in_one_line_before_any_trial(world, tmp_path):
    base = corpus_values(world)
    msg = _error({**base, "captions": str(tmp_path / "nowhere")})
    assert msg.startswith("captions=") and "is not a folder" in msg
    (tmp_path / "bare").mkdir()
    assert "has no caption index" in _error({**base, "captions": str(tmp_path / "bare")})
    nocol = tmp_path / "nocol"
    nocol.mkdir()
    (nocol / t2i.CSV_INDEX).write_text("path,caption\nimg/a.png,a face\n")
    assert "no column 'file'" in _error({**base, "captions": str(nocol)})
    badline = tmp_path / "badline"
    badline.mkdir()
    (badline / t2i.JSONL_INDEX).write_text('{"file": "a.png", "caption": "a face"}\n{"file": "b.png"}\n')
    assert "line 2" in _error({**base, "captions": str(badline)})
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": []}))
    assert "'annotations'" in _error({**base, "captions": str(coco)})
    gone = tmp_path / "gone"   # the csv folder with one image deleted
    shutil.copytree(world["csv"], gone)
    (gone / "img" / "face03.png").unlink()
    assert "'img/face03.png'" in _error({**base, "captions": str(gone), "per_source": N_REAL})
    assert "must be <= 12" in _error({**base, "per_source": 13})
    # through a detector's corpus field: the same error, named as the nested field
    with pytest.raises(ConfigError, match="captions=") as e:
        registry.get("defake_image").build_config({"corpus": {"trainable": "defake_t2i_corpus",
                                                              "captions": str(tmp_path / "nowhere")}})
    assert "\n" not in str(e.value)
    # the default config (no folder yet) builds, but running it asks for the folder
    spec = registry.get("defake_t2i_corpus")
    with pytest.raises(ConfigError, match="captions=''.*--set corpus.captions="):
        spec.fn(spec.build_config({}), LocalContext(workdir=tmp_path / "w", stage_root=tmp_path / "s"))


def test_image_detector_trains_and_attributes_on_the_t2i_corpus(world, corpus, tmp_path):
    spec = registry.get("defake_image")
    ref = {"trainable": "defake_t2i_corpus", **corpus_values(world)}
    for task, held in (("detect", ""), ("attribute", "tiny-ldm")):
        cfg = spec.build_config({"corpus": ref, "task": task, "held_out": held, "epochs": 2, "batch_size": 8})
        ctx = LocalContext(workdir=tmp_path / task, stage_root=world["stages"])
        spec.fn(cfg, ctx)
        last = ctx.history[-1]
        assert 0.0 <= last["acc"] <= 1.0 and 0.0 <= last["val_acc"] <= 1.0
        assert {"hf_share/real", "hf_share/tiny-sd", "hf_share/tiny-ldm"} <= set(last)
    assert "open_acc" in last and "threshold" in last   # the unseen rule ran with tiny-ldm held out


def test_paper_preset_plans_on_the_users_mscoco_folder(world):
    import importlib.util

    from conftest import ROOT
    from secsweep.sweep import build_parser, plan

    path = ROOT / "sweeps" / "defake_detect.py"
    spec_ = importlib.util.spec_from_file_location("sweep_defake_detect_t2i", path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    sweep = module.SWEEP
    args = build_parser(sweep).parse_args(["--preset", "paper", "--set", f"corpus.captions={world['coco']}",
                                           "--set", "corpus.per_source=10"])
    p = plan(sweep, args)
    cfgs = [registry.get(t["trainable"]).build_config({k: v for k, v in t.items() if k != "trainable"})
            for t in p.trials]
    corpora = {c.corpus.config() for c in cfgs}
    assert len(corpora) == 1
    (c,) = corpora
    assert c.captions == str(world["coco"]) and c.pipelines == t2i.DEFAULT_PIPELINES and c.image_size == 256
    assert {x.held_out for x in cfgs} == set(t2i.HELD_OUT)
    assert {type(x).__module__ for x in cfgs} == {"trainables.defake.detector", "trainables.defake.hybrid",
                                                  "trainables.defake.univfd"}
    # a wrong folder stops the plan, before Ray starts
    bad = build_parser(sweep).parse_args(["--preset", "paper", "--set", "corpus.captions=/no/such/coco"])
    with pytest.raises(ConfigError, match="captions='/no/such/coco'"):
        plan(sweep, bad)


def test_relative_folders_are_made_absolute_so_the_cache_key_names_the_folder(world, monkeypatch):
    monkeypatch.chdir(world["root"])
    cfg = registry.get("defake_t2i_corpus").build_config(
        {**corpus_values(world), "captions": "csv", "pipelines": ["./tiny-sd"]})
    assert cfg.captions == str(world["csv"].resolve()) and cfg.pipelines == (str(world["sd"].resolve()),)
    assert cfg.generator_names() == ("tiny-sd",)


def test_hybrid_attributes_with_the_captions_as_prompts_and_is_attacked(world, corpus, tmp_path):
    """The hybrid path on this corpus (RGB, captions as natural prompts, no classes): a one-epoch
    CLIP of 8-px digits stands in for the pretrained ViT-B/32 the paper preset uses (the CLIP
    resizes the 32-px RGB images itself); the attacks, HybridFool included, run on it."""
    spec = registry.get("defake_hybrid")
    clip = {"trainable": "clip", "dataset": "digits", "epochs": 1, "train_size": 600, "monitor_size": 200,
            "image_size": 8, "vision_patch": 4}
    cfg = spec.build_config({"corpus": {"trainable": "defake_t2i_corpus", **corpus_values(world)}, "clip": clip,
                             "task": "attribute", "held_out": "tiny-ldm", "epochs": 2, "robustness": True})
    ctx = LocalContext(workdir=tmp_path / "hybrid", stage_root=world["stages"])
    spec.fn(cfg, ctx)
    last = ctx.history[-1]
    assert 0.0 <= last["acc"] <= 1.0 and "open_acc" in last
    assert all(defake.robust_key(a, e) in last for a in (*defake.PIXEL_ATTACKS, "hybridfool") for e in defake.ROBUST_EPS)
