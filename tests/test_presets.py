"""The `paper` preset (secsweep.presets): one shared definition, valid configs for every sweep
script, each defense at its original budget, and BackdoorBench's augmentation.

Every sweep script is planned with `--preset paper` against tiny CIFAR-10 / CIFAR-100 files in the
real on-disk format (the availability check runs for real; no trial starts).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import ROOT
from secsweep import data, presets, registry
from secsweep.ops import augment
from secsweep.sweep import build_parser, plan
from test_data import write_cifar10, write_cifar100

SCRIPTS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.py"))


def load_sweep(name: str):
    spec = importlib.util.spec_from_file_location(f"sweep_{name}", ROOT / "sweeps" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SWEEP


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root)
    write_cifar100(root)
    stl = root / "stl10_binary"   # a few STL-10 images in its binary format (the stealing presets' surrogate data)
    stl.mkdir()
    for split in ("train", "test"):
        np.zeros((2, 3, 96, 96), dtype=np.uint8).tofile(stl / f"{split}_X.bin")
        np.array([1, 2], dtype=np.uint8).tofile(stl / f"{split}_y.bin")
    # SVHN and GTSRB (the detection and audit presets' downstream data): planning checks that their
    # files exist, it reads none, so empty files in the on-disk layout are enough
    (root / "svhn").mkdir()
    for split in ("train", "test"):
        (root / "svhn" / f"{split}_32x32.mat").touch()
    (root / "gtsrb" / "GTSRB" / "Training").mkdir(parents=True)
    (root / "gtsrb" / "GTSRB" / "Final_Test" / "Images").mkdir(parents=True)
    (root / "gtsrb" / "GT-final_test.csv").touch()
    data._clear_cache()
    yield root
    data._clear_cache()


@pytest.fixture(scope="module")
def planned(data_root):
    """script name -> (Sweep, Plan) under --preset paper."""
    out = {}
    for name in SCRIPTS:
        sweep = load_sweep(name)
        args = build_parser(sweep).parse_args(["--preset", "paper", "--data-root", str(data_root)])
        out[name] = (sweep, plan(sweep, args))
    return out


def configs(plan_):
    """(trial values, built Config) of every trial of a plan (the fixed values for a search)."""
    if plan_.trials is None:
        values = dict(plan_.fixed)
        name = values.pop("trainable")
        return [(values, registry.get(name).build_config(values))]
    out = []
    for t in plan_.trials:
        values = dict(t)
        out.append((t, registry.get(values.pop("trainable")).build_config(values)))
    return out


def upstream_chain(cfg) -> list:
    """`cfg` and every config upstream of it (stage references, declared upstream stages), recursively."""
    from secsweep import refs

    out = [cfg]
    for _, up in refs.upstream(cfg):
        out += upstream_chain(up)
    return out


def test_no_sweep_script_repeats_the_recipe():
    # the recipe lives in secsweep.presets only: no script spells out FTP's attack_lr or epochs
    for path in (ROOT / "sweeps").glob("*.py"):
        text = path.read_text()
        assert '"attack_lr": 0.001' not in text and '"attack_epochs": 200' not in text, path.name
        if "presets=" in text:
            assert "secsweep.presets" in text, f"{path.name} does not build its paper preset from secsweep.presets"


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_resolves_to_valid_configs_with_the_victim_recipe(planned, name):
    _, plan_ = planned[name]
    built = configs(plan_)
    assert built
    for _, cfg in built:
        if hasattr(cfg, "surrogate_dataset"):  # model stealing: the thesis's CIFAR-10 target, STL-10 queries
            target = cfg.target.config()
            if cfg.surrogate_model != target.model:  # cont_steal's T-Tab 4.2 trials: CIFAR-10 queries, 5 architectures
                assert cfg.surrogate_model in ("resnet18", "resnet34", "resnet50", "densenet161", "mobilenet_v2")
                assert cfg.surrogate_dataset == "cifar10" and target.dataset == "cifar10" and cfg.epochs == 100
                continue
            assert target.model == cfg.surrogate_model == "preact_resnet18" and target.dataset == "cifar10"
            assert cfg.surrogate_dataset == "stl10" and cfg.epochs == 100 and target.train_size == 0
            continue
        if hasattr(cfg, "finetune"):  # encoder-based scenario: SimCLR CIFAR-10 -> BadEncoder -> STL-10 (FTP §4.4)
            enc = cfg.encoder.config()
            simclr = enc.encoder.config() if cfg.encoder.trainable == "badencoder" else enc
            assert simclr.dataset == "cifar10" and simclr.model == "preact_resnet18" and simclr.epochs == 1000
            assert cfg.dataset == "stl10" and cfg.epochs == 200
            continue
        if not hasattr(cfg, "attack_epochs") and not hasattr(cfg, "attack_config"):
            # another track (SSL encoders, EncoderMI, DE-FAKE): the documents' scale somewhere in its chain
            chain = upstream_chain(cfg)
            models = {getattr(c, f) for c in chain for f in ("model", "surrogate_model", "surrogate")
                      if isinstance(getattr(c, f, None), str)}
            pretrained = {getattr(c, "pretrained", "") for c in chain} - {""}
            # a text-to-image corpus (DE-FAKE) is made by published diffusers pipelines
            pretrained |= {p for c in chain for p in getattr(c, "pipelines", ())}
            # an audit of a published registry model (SecurityNet's benchmark models) is the documents' model
            pretrained |= {c.name for c in chain if type(c).__module__ == "trainables.models.zoo"}
            # an audit population (SecurityNet audits many architectures) may hold small models too;
            # the plan as a whole is checked to contain ResNet-18s in test_audit_population_...
            from secsweep.audit import AuditConfig

            assert "preact_resnet18" in models or pretrained or isinstance(cfg, AuditConfig), (name, models)
            datasets = {c.dataset for c in chain if hasattr(c, "dataset")}
            assert datasets & {"cifar10", "cifar100", "stl10", "svhn", "gtsrb"} or pretrained, (name, datasets)
            continue
        victim = cfg.attack_config() if hasattr(cfg, "attack_config") else cfg
        assert victim.model == "preact_resnet18" and victim.train_size == 0
        assert victim.attack_epochs == 200 and victim.attack_lr == 0.001 and victim.attack_batch_size == 256
        assert victim.augment == "auto" and cfg.augment == "auto"
        assert victim.dataset in ("cifar10", "cifar100")
        assert cfg.train_transform() is not None


def test_defense_comparison_gives_each_defense_its_original_budget(planned):
    _, plan_ = planned["defense_comparison"]
    seen = set()
    for _, cfg in configs(plan_):
        name = type(cfg).__module__.rsplit(".", 1)[-1]
        seen.add(name)
        if name in ("ac", "spectral"):
            assert cfg.epochs == presets.VICTIM_EPOCHS == cfg.attack_epochs  # retrain as long as the victim
        elif name == "abl":
            assert (cfg.isolation_epochs, cfg.epochs, cfg.unlearning_epochs) == (20, 60, 20)
        elif name == "nad":
            assert cfg.teacher_epochs == 10 and cfg.epochs == 20
        elif name == "nc":
            assert (cfg.nc_steps, cfg.nc_images, cfg.nc_batch_size) == (400, 2500, 64)
        elif name == "sft":
            assert (cfg.phase1_epochs, cfg.ramp_steps) == (10, 500)
        else:
            assert cfg.epochs == 20
        mask_epochs = getattr(cfg.attack_config(), "mask_pretrain_epochs", None)
        assert mask_epochs in (None, 25)  # Input-Aware's mask pre-training, whichever defense
        assert cfg.batch_size == 256
    assert seen == {"ft", "sft", "fp", "nad", "nc", "abl", "ac", "spectral"}
    assert any(getattr(c.attack_config(), "mask_pretrain_epochs", None) == 25 for _, c in configs(plan_))


def test_poison_ratio_inputaware_pretrains_its_mask_25_epochs(planned):
    _, plan_ = planned["poison_ratio"]
    ia = [c for _, c in configs(plan_) if type(c).__module__.endswith("inputaware")]
    assert ia and all(c.mask_pretrain_epochs == 25 for c in ia)


def test_sequela_defended_models_get_their_defenses_budgets(planned):
    _, plan_ = planned["sequela"]
    by_defense = {}
    for _, cfg in configs(plan_):
        if cfg.defense not in ("none", "clean"):
            by_defense[cfg.defense] = cfg.defense_config()
    assert by_defense["ac"].epochs == by_defense["spectral"].epochs == 200
    assert (by_defense["abl"].isolation_epochs, by_defense["abl"].epochs, by_defense["abl"].unlearning_epochs) == (20, 60, 20)
    assert by_defense["nad"].teacher_epochs == 10 and by_defense["nc"].nc_steps == 400
    assert by_defense["sft"].phase1_epochs == 10 and by_defense["ft"].epochs == 20


def test_sft_scripts_use_the_papers_schedule(planned):
    for name in ("sft_grid", "sft_search", "sft_ablation", "transfer"):
        _, plan_ = planned[name]
        for _, cfg in configs(plan_):
            if hasattr(cfg, "phase1_epochs"):
                assert (cfg.phase1_epochs, cfg.ramp_steps) == (10, 500), name
    assert planned["transfer"][1].trials[0]["target_dataset"] == "cifar10"
    assert all(t["epochs"] == 100 for t in planned["ft_lr"][1].trials)


def test_set_still_overrides_a_budget(data_root):
    sweep = load_sweep("defense_comparison")
    args = build_parser(sweep).parse_args(["--preset", "paper", "--data-root", str(data_root),
                                           "--set", "isolation_epochs=3"])
    abl = [t for t in plan(sweep, args).trials if t["trainable"] == "abl"]
    assert abl and all(t["isolation_epochs"] == 3 for t in abl)


def test_augment_auto_follows_the_dataset():
    assert presets.resolve_augment("auto", "cifar10") == "crop_flip"
    assert presets.resolve_augment("auto", "stl10") == "crop_flip"
    for name in ("cifar100", "gtsrb", "svhn", "digits", "fashion_mnist"):
        assert presets.resolve_augment("auto", name) == "crop", name
    assert presets.resolve_augment("crop_flip", "gtsrb") == "crop_flip"  # an explicit choice is kept
    assert set(presets.FLIP_DATASETS) <= set(data.DATASETS)
    cfg = registry.get("badnets").build_config({"dataset": "digits", "augment": "none"})
    assert cfg.train_transform() is None
    with pytest.raises(Exception, match="augment"):
        registry.get("badnets").build_config({"augment": "rotate"})
    assert set(augment.AUGMENTATIONS) | {"auto"} == {"none", "crop", "crop_flip", "auto"}


def test_audit_population_holds_resnet18s_on_cifar10_and_svhn_and_a_published_model(planned):
    """SecurityNet's setting: the audited population has ResNet-18s on CIFAR-10 and SVHN beside the
    published registry model, and the stealing audit's surrogate is a ResNet-18 trained 30 epochs."""
    _, plan_ = planned["audit_zoo"]
    built = [cfg for _, cfg in configs(plan_)]
    targets = {(c.model.trainable, c.model.config().dataset, getattr(c.model.config(), "model", "")) for c in built}
    assert {("clean", "cifar10", "preact_resnet18"), ("clean", "svhn", "preact_resnet18")} <= targets
    assert any(t == "zoo" for t, _, _ in targets)
    steal = [c for c in built if type(c).__module__.endswith("audits.stealing")]
    assert steal and all(c.surrogate == "preact_resnet18" and c.epochs == 30 for c in steal)
