"""Model stealing (trainables/stealing; docs/methods.md, "Model stealing") on tiny real data.

The encoder target is one SimCLR small CNN (3,000 Fashion-MNIST images, 3 epochs), computed once
for the module; the attacker has 1,000 Fashion-MNIST training images (same distribution: at this
scale MNIST queries hardly move the surrogate away from its initialisation, see the docs) and trains
5 epochs; the heads train on 1,000 downstream images and report on 500. An *untrained* surrogate
(a budget of one query) is the floor: on Fashion-MNIST a linear head on random small-CNN features
is already ~0.77 accurate and agrees with the target's head on ~0.77 of the images, so "steals"
means clearly above that floor.

What this scale shows and the thesis does not: conventional MSE stealing agrees with the target
*more* than Cont-Steal (measured 0.88-0.90 against 0.81-0.85 at equal queries; the thesis, with a
ResNet-18 target on CIFAR-10: Cont-Steal 0.812, conventional 0.479), and removing D-_self does not
lower the agreement (0.850 vs 0.854; T-Tab 4.3 reports a drop). The tests check what holds here: both
attacks steal at exactly equal queries, the D-_self switch reaches the loss, noise lowers both the
target's utility and the surrogate's accuracy, the attack code never holds the target, the query
budget holds, and classifier stealing works from labels and from posteriors. Beyond the stealing
itself: the BadEncoder watermark (with the recipe that implants at this scale) marks the target and
not its Cont-Steal surrogate or the clean baseline, and adversarial examples crafted on the
surrogate transfer to the target better than those crafted on a springboard trained on MNIST.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from conftest import ROOT
from secsweep import artifacts, registry
from secsweep.context import LocalContext
from secsweep.oracle import Oracle
from secsweep.refs import StageRef
from secsweep.sweep import build_parser, plan
from trainables import stealing as common
from trainables.stealing import encoder_steal

TARGET = {"trainable": "simclr", "train_size": 3000, "epochs": 3, "monitor_size": 500, "batch_size": 128}
BASE = {"target": TARGET, "surrogate_dataset": "fashion_mnist", "surrogate_size": 1000, "epochs": 5,
        "batch_size": 64, "probe_train_size": 1000, "probe_test_size": 500}
CLEAN = {"trainable": "clean", "train_size": 3000, "epochs": 4, "lr": 0.05}
UNTRAINED = {"query_budget": 1, "epochs": 1}   # one query: the surrogate stays at its initialisation
# BadEncoder's fields that implant at this scale (docs/methods.md "BadEncoder"), explicit, not its defaults
WATERMARK_RECIPE = {"trigger_position": "bottom_right", "optimizer": "sgd", "lr": 0.05, "batch_size": 64,
                    "epochs": 25, "n_reference": 1, "shadow_size": 2000, "monitor_size": 300}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """One stage store for the module: the SimCLR target is trained once for every test."""
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="module")
def runner(tmp_path_factory, stages):
    """run(name, **overrides) -> the last report (each distinct run once; one stage store)."""
    done: dict[str, dict] = {}

    def run(name: str, **kw):
        key = f"{name}{sorted(kw.items(), key=str)}"
        if key not in done:
            spec = registry.get(name)
            cfg = spec.build_config({**BASE, **kw})
            ctx = LocalContext(workdir=tmp_path_factory.mktemp(name), stage_root=stages)
            spec.fn(cfg, ctx)
            done[key] = {**ctx.history[-1], "_outputs": ctx.output_dir}
        return done[key]

    return run


@pytest.mark.slow
def test_cont_steal_and_conventional_both_steal_at_equal_queries(runner):
    cont, conv = runner("cont_steal"), runner("encoder_steal")
    floor = runner("encoder_steal", **UNTRAINED)
    assert cont["queries"] == conv["queries"] == 5 * 1000       # epochs x surrogate images, for both
    assert floor["queries"] == 1
    for r in (cont, conv):
        assert r["agreement"] >= floor["agreement"] + 0.04, (r["agreement"], floor["agreement"])
        assert r["val_agreement"] >= floor["val_agreement"]
        assert r["target_acc"] == floor["target_acc"]            # the same target, judged the same way
    # the surrogate is saved as an encoder artifact with the target's embedding size
    model, card = artifacts.load(cont["_outputs"], "encoder", role="encoder")
    assert card.input.channels == 1 and model.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 64)
    # T-Tab 4.1: the attack's cost is counted against the target's pre-training
    assert cont["target_usd"] > 0 and cont["attack_usd"] > 0
    assert cont["cost_ratio"] == pytest.approx(cont["attack_usd"] / cont["target_usd"])


@pytest.mark.slow
def test_self_negative_switch_reaches_the_loss_and_still_steals(runner):
    full, no_self = runner("cont_steal"), runner("cont_steal", use_self_negatives=False)
    floor = runner("encoder_steal", **UNTRAINED)
    # fewer terms in the denominator: a lower loss on the same data (the switch is not ignored)
    assert no_self["train_loss"] < full["train_loss"] - 0.2, (no_self["train_loss"], full["train_loss"])
    assert no_self["agreement"] >= floor["agreement"] + 0.02


@pytest.mark.slow
def test_more_noise_lowers_target_utility_and_surrogate_accuracy(runner):
    clean, noisy = runner("cont_steal"), runner("cont_steal", noise_sigma=10.0)
    assert noisy["target_acc"] < clean["target_acc"] - 0.3, (noisy["target_acc"], clean["target_acc"])
    assert noisy["steal_acc"] < clean["steal_acc"] - 0.02, (noisy["steal_acc"], clean["steal_acc"])


def test_the_attack_loop_never_receives_the_target_and_the_budget_holds(tmp_path, monkeypatch):
    seen = []
    real = common.steal

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(common, "steal", spy)
    spec = registry.get("encoder_steal")
    tiny_target = {"trainable": "simclr", "train_size": 600, "epochs": 1, "monitor_size": 200, "batch_size": 64}
    cfg = spec.build_config({"target": tiny_target, "surrogate_size": 500, "epochs": 3, "batch_size": 100,
                             "query_budget": 700, "probe_train_size": 300, "probe_test_size": 200})
    ctx = LocalContext(workdir=tmp_path / "w", stage_root=tmp_path / "stages")
    spec.fn(cfg, ctx)
    (args, kwargs), = seen
    values = [*args, *kwargs.values()]
    assert any(isinstance(v, Oracle) for v in values)
    modules = [v for v in values if isinstance(v, nn.Module)]
    assert len(modules) == 1 and ctx.card_of(modules[0]) is None   # the surrogate, not a loaded stage model
    target, _ = ctx.load_model(cfg.target)
    target_storage = {p.data_ptr() for p in target.parameters()}
    assert not target_storage & {p.data_ptr() for p in modules[0].parameters()}
    oracle = next(v for v in values if isinstance(v, Oracle))
    assert not any(isinstance(v, nn.Module) for v in vars(oracle).values())
    # budget 700 of 3 x 500 wanted: epoch 1 takes 500, epoch 2 the 200 left, epoch 3 none
    assert oracle.queries_used == 700 and [r["queries"] for r in ctx.history] == [500.0, 700.0, 700.0]


def test_the_loop_steals_from_an_oracle_around_any_model(tmp_path):
    """`steal` trains on an oracle alone: here one around a sentinel (a fixed random projection)."""
    torch.manual_seed(0)
    sentinel = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 64))
    oracle = Oracle(sentinel, output="embedding")
    cfg = encoder_steal.Config(epochs=4, batch_size=64, lr=3e-3)
    info = common.TargetInfo(1, 28, 64, 0.01, "sentinel")
    surrogate, _, _ = encoder_steal.build_surrogate(cfg, info)
    images = torch.rand(256, 1, 28, 28)
    ctx = LocalContext(workdir=tmp_path / "w")
    common.steal(oracle, surrogate, images, ctx, cfg, step_of=encoder_steal.mse_step_of,
                 evaluate=lambda m, d: {}, target_device_hours=info.device_hours)
    losses = [r["train_loss"] for r in ctx.history]
    assert losses[-1] < 0.8 * losses[0] and losses == sorted(losses, reverse=True), losses
    assert oracle.queries_used == 4 * 256 and ctx.history[-1]["queries"] == 4 * 256.0


@pytest.mark.slow
@pytest.mark.parametrize("response", ["label", "posterior"])
def test_classifier_stealing_from_labels_and_from_posteriors(runner, response):
    # MSE on probabilities has far smaller gradients than the cross-entropy: a larger step for it
    kw = {"target": CLEAN, "epochs": 3, **({"lr": 3e-3} if response == "posterior" else {})}
    stolen = runner("classifier_steal", response=response, **kw)
    floor = runner("classifier_steal", response=response, **{**kw, **UNTRAINED})
    assert stolen["queries"] == 3 * 1000
    assert stolen["agreement"] >= floor["agreement"] + 0.3, (stolen["agreement"], floor["agreement"])
    assert stolen["steal_acc"] >= floor["steal_acc"] + 0.2 and stolen["target_acc"] >= 0.6
    model, card = artifacts.load(stolen["_outputs"], "model", role="classifier")
    assert card.num_classes == 10


def test_classifier_oracle_defenses_need_posteriors():
    spec = registry.get("classifier_steal")
    with pytest.raises(Exception, match="response"):
        spec.build_config({"noise_sigma": 1.0})
    with pytest.raises(Exception, match="target"):
        spec.build_config({"target": "simclr"})   # an encoder is not a classifier target
    with pytest.raises(Exception, match="target"):
        registry.get("cont_steal").build_config({"target": "clean"})


def _sweep(name):
    spec = importlib.util.spec_from_file_location(f"sweep_{name}", ROOT / "sweeps" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SWEEP


def _built(p):
    out = []
    for t in p.trials:
        values = dict(t)
        out.append(registry.get(values.pop("trainable")).build_config(values))
    return out


def test_cont_steal_sweep_plans_tau_by_batch_ablations_and_conventional():
    sweep = _sweep("cont_steal")
    p = plan(sweep, build_parser(sweep).parse_args([]))
    cfgs = _built(p)
    cont = [c for c in cfgs if type(c).__module__.endswith("cont_steal")]
    assert {(c.temperature, c.batch_size) for c in cont if c.loss == "thesis" and c.use_self_negatives
            and c.use_encoder_negatives} == {(t, b) for t in (0.1, 0.2, 0.5, 1.0) for b in (64, 128)}
    assert any(not c.use_self_negatives for c in cont) and any(not c.use_encoder_negatives for c in cont)
    assert any(c.loss == "symmetric" for c in cont)
    assert sum(type(c).__module__.endswith("encoder_steal") for c in cfgs) == 1
    assert all(c.surrogate_dataset == "mnist" and c.target.config().dataset == "fashion_mnist" for c in cfgs)
    # --set collapses the dimension; the presets resolve
    p = plan(sweep, build_parser(sweep).parse_args(["--set", "temperature=0.2"]))
    assert {c.temperature for c in _built(p) if hasattr(c, "temperature")} == {0.2}
    p = plan(sweep, build_parser(sweep).parse_args(["--preset", "data_epochs"]))
    assert {(c.surrogate_fraction, c.epochs) for c in _built(p)} >= {(0.1, 2), (1.0, 10)}
    p = plan(sweep, build_parser(sweep).parse_args(["--preset", "search"]))
    assert p.trials is None and set(p.space) == {"temperature", "lr"}
    smoke = plan(sweep, build_parser(sweep).parse_args(["--smoke-test"]))
    assert len(smoke.trials) == 2 and all(c.epochs == 1 for c in _built(smoke))


def test_stealing_defenses_sweep_plans_noise_topk_and_rounding():
    sweep = _sweep("stealing_defenses")
    cfgs = _built(plan(sweep, build_parser(sweep).parse_args([])))
    assert sorted(c.noise_sigma for c in cfgs) == [0.0] * 7 + [0.1, 0.5, 1.0, 2.0, 5.0, 10.0]
    assert sorted(c.top_k for c in cfgs if c.top_k) == [1, 4, 16]
    assert sorted(c.round_digits for c in cfgs if c.round_digits >= 0) == [0, 1, 2]
    defenses = [c.defense(0) for c in cfgs]
    assert sum(d.active for d in defenses) == 12   # every trial but sigma = 0 defends


@pytest.mark.slow
def test_the_watermark_marks_the_target_and_not_its_surrogate_or_the_clean_baseline(tmp_path, stages):
    """T-Tab 4.5's three columns. BadEncoder with the recipe that implants at this scale (the corner
    trigger, one reference, SGD 0.05 at batch 64, 25 epochs; docs/methods.md "BadEncoder"), given as
    explicit overrides: the watermarked target's wr is far above the Cont-Steal surrogate's and the
    clean baseline's (the watermark does not survive stealing, as in the thesis); the stages are
    wired as documented (the surrogate is a Cont-Steal of exactly the target, on the downstream data),
    the target's wr is the BadEncoder stage's own ASR, and the watermark keeps most of the utility."""
    bad = {"trainable": "badencoder", "encoder": TARGET, "downstream_dataset": "mnist", **WATERMARK_RECIPE}
    spec = registry.get("watermark")
    cfg = spec.build_config({"target": bad, "steal_size": 1000, "steal_epochs": 5, "steal_batch_size": 64,
                             "probe_train_size": 1000, "probe_test_size": 500})
    steal = cfg.steal().config()
    assert steal.target == cfg.target and steal.surrogate_dataset == steal.downstream_dataset == "mnist"
    ctx = LocalContext(workdir=tmp_path / "w", stage_root=stages)
    spec.fn(cfg, ctx)
    last = ctx.history[-1]
    assert last["target_wr"] > 0.4, last
    assert last["target_wr"] > last["surrogate_wr"] + 0.3 and last["target_wr"] > last["baseline_wr"] + 0.3, last
    assert last["target_acc"] > 0.5 and last["surrogate_acc"] > 0.3
    # the same ASR as the BadEncoder stage's own probe, up to the probes' different training data
    # (the stage's probe and this one train on different downstream samples: measured 0.65 vs 0.66, 0.70 vs 0.82)
    stage_asr = ctx.stage(cfg.target).metrics["asr"]
    assert abs(last["target_wr"] - stage_asr) < 0.15, (last["target_wr"], stage_asr)

# a springboard encoder trained on other data: SimCLR on MNIST digits (the target saw Fashion-MNIST)
SPRINGBOARD = {**TARGET, "dataset": "mnist"}


@pytest.mark.slow
def test_adversarial_examples_from_the_surrogate_transfer_better_than_from_a_springboard(tmp_path, stages):
    """T-Tab 4.4: FGSM/BIM/PGD/DI-FGSM crafted on the Cont-Steal surrogate (+ its head) fool the
    target's head more often than the same attacks crafted on an encoder trained on other data
    (measured at eps 0.1: mean transfer 0.75 against 0.47, every attack ahead)."""
    spec = registry.get("adv_transfer")
    cfg = spec.build_config({"surrogate": {"trainable": "cont_steal", **BASE}, "springboard": SPRINGBOARD,
                             "eps": 0.1, "steps": 5, "probe_train_size": 1000, "probe_test_size": 300})
    assert cfg.target == StageRef("simclr", {k: v for k, v in TARGET.items() if k != "trainable"})
    ctx = LocalContext(workdir=tmp_path / "w", stage_root=stages)
    spec.fn(cfg, ctx)
    r = ctx.history[-1]
    for a in ("fgsm", "bim", "pgd", "di_fgsm"):
        assert 0.0 <= r[f"springboard_transfer_{a}"] < r[f"transfer_{a}"] <= r[f"whitebox_{a}"] + 0.05, (a, r)
    assert r["transfer"] >= r["springboard_transfer"] + 0.1, (r["transfer"], r["springboard_transfer"])
    assert r["whitebox_pgd"] > 0.8 and r["val_transfer"] > r["springboard_transfer"]
    # the three heads are comparable classifiers: the gap is not one of accuracy
    assert min(r["target_acc"], r["surrogate_acc"], r["springboard_acc"]) > 0.6


def test_surrogate_adv_sweep_plans_eps_and_the_paper_setting():
    sweep = _sweep("surrogate_adv")
    cfgs = _built(plan(sweep, build_parser(sweep).parse_args([])))
    assert sorted(c.eps for c in cfgs) == [0.02, 0.05, 0.1, 0.2]
    assert all(c.surrogate.trainable == "cont_steal" and c.springboard.config().dataset == "mnist"
               and c.target.config().dataset == "fashion_mnist" for c in cfgs)
    paper = _built(plan(sweep, build_parser(sweep).parse_args(["--preset", "paper"])))
    assert {c.target.config().dataset for c in paper} == {"cifar10"} and max(c.eps for c in paper) == 16 / 255
    assert len(_built(plan(sweep, build_parser(sweep).parse_args(["--smoke-test"])))) == 1


def test_watermark_sweep_plans_the_implanting_badencoder_and_both_adversaries():
    sweep = _sweep("watermark")
    cfgs = _built(plan(sweep, build_parser(sweep).parse_args([])))
    assert sorted(c.steal_dataset for c in cfgs) == ["fashion_mnist", "mnist"]
    for c in cfgs:
        bad = c.target.config()
        assert (bad.trigger_position, bad.lr, bad.batch_size, bad.epochs, bad.n_reference) == \
            ("bottom_right", 0.05, 64, 25, 1)
        assert c.steal().config().surrogate_dataset == c.steal_dataset and c.downstream == "mnist"
    paper = _built(plan(sweep, build_parser(sweep).parse_args(["--preset", "paper"])))
    assert {c.target.config().encoder.config().dataset for c in paper} == {"cifar10"}
    assert len(_built(plan(sweep, build_parser(sweep).parse_args(["--smoke-test"])))) == 1
