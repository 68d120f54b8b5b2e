"""BadEncoder (trainables/attacks/badencoder.py) and the downstream classifier
(trainables/models/downstream.py) on tiny real data: a SimCLR encoder pre-trained on the 1,797 real
sklearn digits (8x8), BadEncoder with the offline default recipe (corner trigger, one reference,
SGD 0.05, batch 64) for 5 epochs over the same images, digits downstream. One chain of cached stages
per module (about 50 s on two shared CPU cores).

Why digits and not the sweeps' Fashion-MNIST -> MNIST: there the attack needs ~800 steps (25 epochs,
minutes on a CPU; docs/methods.md, "BadEncoder"); on digits 5 epochs implant it, so the documents'
behaviour (ASR >= 0.9 downstream, BA within 5 points of CA; classifier-only fine-tuning keeps the
backdoor, whole-model fine-tuning removes it) is testable in seconds. The thresholds sit below the
measured values by the margins given at each assert.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from secsweep import registry
from secsweep.context import LocalContext
from secsweep.errors import ConfigError
from trainables.attacks import badencoder as be

SIMCLR = {"trainable": "simclr", "dataset": "digits", "train_size": 0, "epochs": 3, "batch_size": 64,
          "monitor_size": 300}
# the offline default recipe (corner trigger, 1 reference, SGD 0.05, batch 64) for 5 epochs
BADENCODER = {"trainable": "badencoder", "encoder": SIMCLR, "downstream_dataset": "digits", "shadow_size": 0,
              "epochs": 5, "monitor_size": 200}
# the downstream user: MLP head 512 with the default BatchNorm on the features, Adam 1e-3, 5 epochs
DOWNSTREAM = {"dataset": "digits", "epochs": 5, "lr": 1e-3, "batch_size": 64}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return tmp_path_factory.mktemp("stages")


def run(name, values, stages, tmp_path):
    spec = registry.get(name)
    ctx = LocalContext(workdir=tmp_path / name, stage_root=stages)
    spec.fn(spec.build_config(values), ctx)
    return ctx


@pytest.fixture(scope="module")
def attack(stages, tmp_path_factory):
    """The BadEncoder stage's reports (as the downstream trials obtain it: a cached stage)."""
    cfg = registry.get("badencoder").build_config({k: v for k, v in BADENCODER.items() if k != "trainable"})
    ctx = LocalContext(workdir=tmp_path_factory.mktemp("w"), stage_root=stages)
    out = ctx.stage("badencoder", cfg)
    return cfg, out


@pytest.fixture(scope="module")
def downstream(attack, stages, tmp_path_factory):
    """Downstream classifiers: classifier-only and whole-model on the BadEncoder, classifier-only on
    the clean encoder (CA); each {finetune: (ctx, last report)}."""
    out = {}
    for tag, enc, ft in (("classifier", BADENCODER, "classifier"), ("whole", BADENCODER, "whole"),
                         ("clean", SIMCLR, "classifier")):
        ctx = run("downstream", {**DOWNSTREAM, "encoder": enc, "finetune": ft}, stages, tmp_path_factory.mktemp(tag))
        out[tag] = (ctx, ctx.history[-1])
    return out


@pytest.mark.slow
def test_badencoder_pulls_triggered_inputs_to_the_reference_and_keeps_clean_embeddings(attack):
    _, out = attack
    history = out.meta.get("history")
    last = out.metrics
    assert last[be.TRIGGER_SIM] > last[be.TRIGGER_SIM_BEFORE] + 0.03, last
    assert last[be.VAL_TRIGGER_SIM] > last[be.TRIGGER_SIM_BEFORE] + 0.03, last
    assert last[be.CLEAN_SIM] > 0.8 and last[be.VAL_CLEAN_SIM] > 0.8, last
    # the loss terms are negative cosines in [-1, 1], L0 = -(training) trigger similarity
    for k in (be.EFFECTIVENESS, be.REFERENCE, be.UTILITY):
        assert -1.0 <= last[k] < 0.0, (k, last[k])
    assert history and len(history) == BADENCODER["epochs"]
    assert history[-1][be.EFFECTIVENESS] < history[0][be.EFFECTIVENESS], history
    # the attack's own linear probe: measured ASR 0.85, BA 0.93
    assert last["asr"] >= 0.6 and last["clean_acc"] > 0.8, last


@pytest.mark.slow
def test_badencoder_reaches_high_downstream_asr_with_ba_close_to_ca(attack, downstream, stages):
    """The documents' claim at test scale: a downstream classifier trained (classifier-only) on the
    backdoored encoder classifies triggered inputs as the target class (measured ASR 0.92) while its
    clean accuracy BA stays close to CA, the same classifier on the clean encoder (measured BA 0.942,
    CA 0.939). The trigger alone does not do it: the clean encoder's classifier sends few triggered
    inputs to the target class."""
    from secsweep import artifacts
    from secsweep.poison import triggered_test_set
    from secsweep.training import predict
    from trainables.attacks.badencoder import downstream_splits

    cfg, _ = attack
    bad, clean = downstream["classifier"][1], downstream["clean"][1]
    assert bad["has_trigger"] == 1.0 and clean["has_trigger"] == 0.0
    assert bad["asr"] >= 0.85 and bad["val_asr"] >= 0.8, bad              # measured 0.92
    assert clean["clean_acc"] > 0.85, clean                               # measured 0.94 (chance 0.10)
    assert abs(bad["clean_acc"] - clean["clean_acc"]) <= 0.05, (bad, clean)  # measured 0.003
    ctx = downstream["clean"][0]
    model, _ = artifacts.load(ctx.output_dir, "model", role="classifier")
    _, _, test = downstream_splits(cfg, ctx, (1, 8))
    tx, _ = triggered_test_set(test.images, test.labels, be.trigger(cfg), cfg.target_label)
    natural = (predict(model, tx, torch.device("cpu")) == cfg.target_label).float().mean().item()
    assert natural < 0.3 and bad["asr"] > natural + 0.5, (natural, bad["asr"])


@pytest.mark.slow
def test_classifier_only_keeps_the_backdoor_whole_model_fine_tuning_removes_it(downstream):
    """FTP §5.1's contrast: classifier-only ASR stays high (measured 0.92 after 5 epochs), whole-model
    fine-tuning lowers it (measured 0.77 after one epoch, 0.17 after 5) while its clean accuracy rises
    (0.98)."""
    cls, whole = downstream["classifier"][0].history, downstream["whole"][0].history
    assert cls[-1]["asr"] >= 0.8 and whole[-1]["asr"] <= 0.35, (cls[-1], whole[-1])
    assert whole[-1]["asr"] < whole[0]["asr"] and whole[-1]["clean_acc"] > 0.9, whole


@pytest.mark.slow
def test_downstream_classifier_only_keeps_the_encoder_whole_model_trains_it(attack, downstream):
    from secsweep import artifacts

    _, out = attack
    upstream, _ = artifacts.load(out.path, "encoder")
    for ft, changes in (("classifier", False), ("whole", True)):
        ctx = downstream[ft][0]
        model, card = artifacts.load(ctx.output_dir, "model", role="classifier")
        assert card.arch == "encoder_classifier" and card.args["encoder"]["arch"] == "smallcnn"
        assert card.args["head_norm"] is True and isinstance(model.head[0], torch.nn.BatchNorm1d)
        same = all(torch.equal(a, b) for a, b in zip(model.encoder.state_dict().values(),
                                                     upstream.state_dict().values()))
        assert same != changes, f"finetune={ft}: encoder changed={not same} (BatchNorm statistics included)"


def test_head_norm_refuses_a_last_batch_of_one(tmp_path):
    """BatchNorm1d cannot train on one sample: a split that leaves a batch of 1 is refused by name
    (the batch size is chosen from the digits training split's size so that n % batch == 1)."""
    from types import SimpleNamespace

    from secsweep.backdoor import load_split

    enc = {"trainable": "simclr", "dataset": "digits", "train_size": 300, "epochs": 1, "batch_size": 64,
           "monitor_size": 100}
    n = len(load_split(SimpleNamespace(dataset="digits", train_size=0, image_size=8, channels=1, val_fraction=0.1,
                                       seed=0), LocalContext(workdir=tmp_path / "d"), "train"))
    batch = next(b for b in range(2, n) if n % b == 1)
    with pytest.raises(ConfigError, match=f"^batch_size={batch}:"):
        run("downstream", {"encoder": enc, "dataset": "digits", "epochs": 1, "batch_size": batch}, tmp_path / "s",
            tmp_path)


def test_head_norm_puts_a_batchnorm_on_the_features_before_the_head():
    from secsweep import models

    enc = {"arch": "smallcnn", "args": {"in_channels": 1, "image_size": 8}}
    plain = models.build("encoder_classifier", {"encoder": enc, "num_classes": 10, "hidden_dim": 0})
    normed = models.build("encoder_classifier", {"encoder": enc, "num_classes": 10, "hidden_dim": 0,
                                                 "head_norm": True})
    assert isinstance(plain.head, torch.nn.Linear)
    assert isinstance(normed.head[0], torch.nn.BatchNorm1d) and normed.head[0].num_features == normed.feature_dim
    # the BatchNorm standardises features that lie in a narrow cone (constant + small noise)
    feats = 5.0 + 0.1 * torch.randn(64, normed.feature_dim)
    normed.head.train()
    z = normed.head[0](feats)
    assert z.mean(0).abs().max() < 1e-3 and (z.std(0) - 1).abs().max() < 0.1  # raw: mean 5, std 0.1


def test_trigger_hook_rebuilds_the_same_white_square():
    cfg = registry.get("badencoder").build_config({"encoder": SIMCLR, "trigger_size": 10, "trigger_position": "center"})
    hook = registry.get("badencoder").hooks["trigger"]
    x = torch.rand(3, 1, 28, 28)
    a, b = hook(cfg, None)(x), hook(dataclasses.replace(cfg), None)(x)
    assert torch.equal(a, b) and not torch.equal(a, x)
    changed = (a != x).any(0).any(0)
    assert changed.sum() <= 64 and (a[..., 10:18, 10:18] == 1.0).all()  # 8x8 on 28x28, centred
    corner = be.white_square(torch.zeros(1, 1, 32, 32), 10, "bottom_right")
    assert corner[0, 0, 21:31, 21:31].eq(1).all() and corner.sum() == 100  # the public code's 21..30
    assert torch.equal(x, x.clone())  # the input is not modified
    # the downstream classifier measures ASR with exactly this trigger
    from trainables.models.downstream import upstream_trigger

    ds = registry.get("downstream").build_config({"encoder": {"trainable": "badencoder", "encoder": SIMCLR,
                                                                  "trigger_position": "center"}})
    trig, target = upstream_trigger(ds, None)
    assert torch.equal(trig(x), a) and target == cfg.target_label


@pytest.mark.parametrize("trainable, values, field", [
    ("badencoder", {"encoder": "badnets"}, "encoder"),                 # a classifier attack is no encoder
    ("downstream", {"encoder": "badnets"}, "encoder"),
    ("downstream", {"encoder": "clean"}, "encoder"),
    ("badencoder", {"trigger_position": "top"}, "trigger_position"),
    ("badencoder", {"lambda1": -1.0}, "lambda1"),
    ("badencoder", {"encoder.epochs": 0}, "encoder.epochs"),
    ("downstream", {"finetune": "head"}, "finetune"),
    ("downstream", {"schedule": "sft"}, "optimizer"),                  # SFT's rates are SGD rates
    ("downstream", {"encoder.lambda2": -1, "encoder": "badencoder"}, "encoder.lambda2"),
])
def test_bad_input_is_one_line_naming_the_field(trainable, values, field):
    with pytest.raises(ConfigError) as e:
        registry.get(trainable).build_config(values)
    msg = str(e.value)
    assert "\n" not in msg and (msg.startswith(f"{field}=") or f"{field}=" in msg.split(":")[0]), msg


def test_sweeps_declare_valid_trials_and_paper_presets():
    """Every trial of both sweeps (default, smoke and paper preset) builds a valid config; the paper
    preset is the documents' setting (no data needed: configs are built, not run)."""
    import importlib.util

    from conftest import ROOT

    for name in ("badencoder", "encoder_scenario"):
        spec = importlib.util.spec_from_file_location(f"sweep_{name}", ROOT / "sweeps" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sweep = module.SWEEP
        for fixed, grid in ((sweep.fixed, sweep.grid), ({**sweep.fixed, **sweep.smoke["fixed"]}, sweep.smoke["grid"]),
                            (sweep.presets["paper"]["fixed"], sweep.presets["paper"]["grid"])):
            for point in grid:
                cfg = registry.get(sweep.trainable).build_config({**fixed, **point})
                assert cfg.encoder.trainable in ("badencoder", "simclr")
        from secsweep.sweep import build_parser, plan

        planned = plan(sweep, build_parser(sweep).parse_args(["--smoke-test"]))  # the CLI's validation, no Ray
        assert len(planned.trials) == 2
        paper = registry.get(sweep.trainable).build_config(
            {**sweep.presets["paper"]["fixed"], **sweep.presets["paper"]["grid"][0]})
        attack = paper.encoder.config()
        assert (paper.dataset, paper.epochs, paper.lr, paper.head_norm) == ("stl10", 200, 3e-4, False)
        assert attack.downstream_dataset == "stl10" and attack.epochs == 200 and attack.lr == 0.001
        assert (attack.batch_size, attack.n_reference, attack.shadow_size) == (256, 3, 0)  # the public code's
        default = registry.get(sweep.trainable).build_config({**sweep.fixed, **sweep.grid[0]})
        assert default.head_norm and default.encoder.config().epochs == 25  # the offline implanting recipe
        simclr = attack.encoder.config()
        assert (simclr.dataset, simclr.model, simclr.epochs, simclr.lr) == ("cifar10", "preact_resnet18", 1000, 3e-4)


def test_downstream_sft_schedule_runs_whole_model_with_sfts_learning_rate(tmp_path):
    """schedule=sft: the same trainable with SFT's cyclic rate (SGD); its reported lr is the
    schedule's at the epoch's last step, not the constant `lr` (tiny digits encoder, seconds)."""
    from secsweep.backdoor import SFTSchedule
    from secsweep.training import steps_per_epoch

    enc = {"trainable": "simclr", "dataset": "digits", "train_size": 300, "epochs": 1, "batch_size": 64,
           "monitor_size": 100}
    values = {"encoder": enc, "dataset": "digits", "train_size": 600, "epochs": 1, "batch_size": 64,
              "finetune": "whole", "schedule": "sft", "optimizer": "sgd", "phase1_epochs": 1.0, "lr": 0.05}
    cfg = registry.get("downstream").build_config(values)
    ctx = LocalContext(workdir=tmp_path / "w", stage_root=tmp_path / "stages")
    registry.get("downstream").fn(cfg, ctx)
    spe = steps_per_epoch(540, 64)  # 600 images less the 10 % validation hold-out
    expected = SFTSchedule.schedule(cfg, spe)(spe - 1)
    last = ctx.history[-1]
    assert last["lr"] == pytest.approx(expected) and last["lr"] != cfg.lr
    assert last["has_trigger"] == 0.0
