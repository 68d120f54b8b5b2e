"""Backdoor sequela on real data at CPU scale (digits, small CNN; docs/methods.md §6.1, §6.2).

Membership inference must find the members of a deliberately overfit model (AUC > 0.6) and must
find nothing (AUC about 0.5) when membership carries no information. Re-injection must re-implant
the backdoor faster into a defended model than into a clean one at a small poison ratio, as the FTP
paper reports (§6.2).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from secsweep import registry
from secsweep.backdoor import build_victim_model, load_split
from secsweep.context import LocalContext
from secsweep.errors import ConfigError
from trainables.sequela.mia import load_defended, membership_attacks

torch.set_num_threads(1)

# These tests select nothing, so they train on all of digits' 1,437 training images (no validation
# split): at this size the 10 % split changes the models enough to move the measured effects.
DIGITS = {"dataset": "digits", "model": "smallcnn", "val_fraction": 0.0}
# A BadNets digits backdoor: ASR 1.00, clean acc 0.98 after 6 epochs.
BACKDOOR = {**DIGITS, "attack_epochs": 6, "attack_batch_size": 32}
# SFT with LR_MAX1 0.3, the paper's value for small clean sets (FTP §5.5; digits has 1,437 training
# images): ASR 1.00 -> 0.00, clean acc 0.97. With the default 0.1 the backdoor survives (ASR 0.59),
# and conventional FT at the pre-training rate leaves ASR 0.94 on digits.
SFT = {"defense": "sft", "epochs": 2, "defense_options": {"lr_max1": 0.3}}
# Deliberately overfit: 150 training images, 60 epochs, no weight decay -> train acc 1.00, test 0.96.
OVERFIT = {**DIGITS, "train_size": 150, "attack_epochs": 60, "attack_batch_size": 32, "attack_weight_decay": 0.0}


@pytest.fixture(scope="module")
def stage_root(tmp_path_factory):
    return tmp_path_factory.mktemp("stages")


def run(name, stage_root, workdir, **values):
    spec = registry.get(name)
    cfg = spec.build_config(values)
    ctx = LocalContext(workdir=workdir, stage_root=stage_root)
    spec.fn(cfg, ctx)
    return cfg, ctx


def mia_numbers(m):
    return (f"NN acc {m['accuracy']:.3f} AUC {m['auc']:.3f} | mentr AUC {m['mentr_auc']:.3f} "
            f"confidence AUC {m['confidence_auc']:.3f} correctness AUC {m['correctness_auc']:.3f}")


# -- membership inference -------------------------------------------------------------------------

def test_mia_finds_members_of_an_overfit_model(stage_root, tmp_path):
    cfg, ctx = run("mia", stage_root, tmp_path / "w", defense="clean", **OVERFIT)
    assert len(ctx.history) == 1
    m = ctx.history[0]
    print(f"\noverfit clean model: train acc {m['train_acc']:.3f} test acc {m['clean_acc']:.3f}, "
          f"{m['mia_samples']:.0f}+{m['mia_samples']:.0f} eval samples: {mia_numbers(m)}")
    assert m["train_acc"] >= 0.99 and m["overfit_gap"] > 0.02
    assert m["mia_samples"] == 75  # 150 members -> four parts of 75 (§6.1 split, capped by n_train // 2)
    assert m["auc"] > 0.6, f"NN attack AUC {m['auc']:.3f} on an overfit model"
    assert m["mentr_auc"] > 0.6 and m["confidence_auc"] > 0.6
    assert m["accuracy"] > 0.6 and m["mentr_accuracy"] > 0.6
    assert (tmp_path / "w" / "outputs" / "attack_model.safetensors").is_file()


def test_mia_finds_nothing_when_membership_carries_no_information(stage_root, tmp_path):
    """The "about 0.5 on random labels" control, built two deterministic ways:

    (a) the same overfit model as above, but the "members" the attack is trained and evaluated on are
        training-split images the model never saw (the 1,287 digits training images outside its
        150), and the non-members the test split: the member/non-member labels are then random with
        respect to true membership. This also shows the AUC > 0.6 above comes from membership, not
        from a difference between digits' train and test splits.
    (b) an untrained (randomly initialised) model with the real members and non-members: its
        posteriors cannot depend on membership.
    In both the NN attack and modified entropy must land in 0.5 +/- 0.1.
    """
    spec = registry.get("mia")
    cfg = spec.build_config({"defense": "clean", **OVERFIT})
    ctx = LocalContext(workdir=tmp_path / "w", stage_root=stage_root)
    victim = load_defended(cfg, ctx)  # the cached clean stage of the test above (recomputed if run alone)
    full = load_split(dataclasses.replace(cfg, train_size=0), ctx, "train")
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(cfg.seed))  # load_split's draw
    seen = order[: cfg.train_size].sort().values
    assert torch.equal(full.images[seen], victim.train.images), "load_split no longer draws train_size this way"
    unseen = full.subset(order[cfg.train_size:].sort().values)
    test = load_split(cfg, ctx, "test")

    blind, _ = membership_attacks(victim.model, unseen, test, ctx.device, seed=cfg.seed)
    torch.manual_seed(123)
    untrained = build_victim_model(cfg, test).to(ctx.device)
    random_model, _ = membership_attacks(untrained, victim.train, test, ctx.device, seed=cfg.seed)
    print(f"\noverfit model, unseen 'members' ({blind['mia_samples']:.0f}+{blind['mia_samples']:.0f}): "
          f"{mia_numbers(blind)}\nuntrained model, real members: {mia_numbers(random_model)}")
    for what, m in (("unseen members", blind), ("untrained model", random_model)):
        for key in ("auc", "mentr_auc", "confidence_auc"):
            assert abs(m[key] - 0.5) < 0.1, f"{what}: {key} {m[key]:.3f}, expected about 0.5"
        assert abs(m["accuracy"] - 0.5) < 0.1


# -- backdoor re-injection ------------------------------------------------------------------------

def curve(history):
    return [h["asr"] for h in history]


def test_reinjection_is_faster_into_a_defended_model_than_into_a_clean_one(stage_root, tmp_path):
    """FTP §6.2: at poison ratio 0.01 the clean model needs 15 epochs (ASR 0.819), defended models
    3-6 epochs; at 0.1, 2 epochs after FT vs 7 for the clean model. Here (digits, 1,437 training
    images, 8 epochs), measured: ratio 0.01 (14 poisoned images) SFT-defended ASR per epoch
    0.00 0.05 0.39 0.57 0.62 0.71 0.61 0.55 0.67 vs clean 0.00 0.00 0.00 0.05 0.04 0.17 0.05 0.17 0.14;
    ratio 0.1 (144 images): both reach ASR >= 0.9 at epoch 2 - at this scale a 10 % poison rate
    re-implants into any model within two epochs, so only the low ratio separates them."""
    E = 8
    _, sft_ctx = run("reinjection", stage_root, tmp_path / "sft", **BACKDOOR, **SFT, reinject_ratio=0.01,
                     reinject_epochs=E)
    cfg, clean_ctx = run("reinjection", stage_root, tmp_path / "clean", **BACKDOOR, defense="clean",
                         reinject_ratio=0.01, reinject_epochs=E)
    sft, clean = sft_ctx.history, clean_ctx.history
    print(f"\nratio 0.01 ({sft[0]['reinject_poisoned']:.0f} poisoned): ASR per epoch")
    for name, hist in (("SFT-defended", sft), ("clean", clean)):
        print(f"  {name:12s} {' '.join(f'{a:.2f}' for a in curve(hist))}  "
              f"epochs_to_asr90 {hist[-1]['epochs_to_asr90']:.0f}")

    # one report per epoch, epoch 0 = before re-injection; every report carries the declared metrics
    for hist in (sft, clean):
        assert [h["epoch"] for h in hist] == list(range(E + 1))
        assert all(h["asr_start"] == hist[0]["asr"] and "epochs_to_asr90" in h for h in hist)
    assert sft[0]["reinject_poisoned"] == 14  # round(0.01 * 1437)

    # the re-injection started from the defended model: the SFT stage's own last report
    sft_stage = LocalContext(workdir=tmp_path / "x", stage_root=stage_root).stage(
        "sft", registry.get("reinjection").build_config({**BACKDOOR, **SFT}).defense_config())
    assert sft[0]["asr"] == pytest.approx(sft_stage.metrics["asr"])
    assert sft[0]["asr"] < 0.1 and clean[0]["asr"] < 0.1, "nothing to re-inject: the backdoor is present"
    assert sft[0]["clean_acc"] > 0.9 and clean[0]["clean_acc"] > 0.9

    # the paper's finding: the defended model re-learns the backdoor faster
    mean_sft = sum(curve(sft)[1:]) / E
    mean_clean = sum(curve(clean)[1:]) / E
    assert mean_sft > mean_clean + 0.2, f"mean ASR over {E} epochs: SFT {mean_sft:.3f}, clean {mean_clean:.3f}"
    assert sft[3]["asr"] > clean[3]["asr"] + 0.2
    assert sft[-1]["epochs_to_asr90"] <= clean[-1]["epochs_to_asr90"]


def test_reinjection_at_ratio_01_and_epochs_to_asr90(stage_root, tmp_path):
    """At ratio 0.1 both models re-learn the backdoor within a few epochs; epochs_to_asr90 is the
    first epoch with ASR >= 0.9 (reinject_epochs + 1 before that), kept across a restart; into the
    still-backdoored model (defense="none") it is 0."""
    E = 4
    out = {}
    for name, values in (("sft", SFT), ("clean", {"defense": "clean"})):
        _, ctx = run("reinjection", stage_root, tmp_path / name, **BACKDOOR, **values, reinject_ratio=0.1,
                     reinject_epochs=E)
        out[name] = ctx
        hist = ctx.history
        first = next(h["epoch"] for h in hist if h["asr"] >= 0.9)
        print(f"\nratio 0.1, {name}: ASR per epoch {' '.join(f'{a:.2f}' for a in curve(hist))}, "
              f"epochs_to_asr90 {hist[-1]['epochs_to_asr90']:.0f}")
        assert hist[-1]["asr"] >= 0.9 and hist[-1]["clean_acc"] > 0.9
        assert [h["epochs_to_asr90"] for h in hist] == [float(first if h["epoch"] >= first else E + 1) for h in hist]

    # resume: a trial restarted from its last state keeps the epoch at which ASR first reached 0.9
    spec = registry.get("reinjection")
    cfg = spec.build_config({**BACKDOOR, **SFT, "reinject_ratio": 0.1, "reinject_epochs": E + 1})
    resumed = LocalContext(workdir=tmp_path / "resumed", stage_root=stage_root, state=out["sft"].last_state)
    spec.fn(cfg, resumed)
    assert [h["epoch"] for h in resumed.history] == [E + 1]
    assert resumed.history[0]["epochs_to_asr90"] == out["sft"].history[-1]["epochs_to_asr90"] <= E

    _, none = run("reinjection", stage_root, tmp_path / "none", **BACKDOOR, defense="none", reinject_ratio=0.1,
                  reinject_epochs=1)
    assert none.history[0]["asr"] >= 0.9 and none.history[0]["epochs_to_asr90"] == 0.0


# -- configuration ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mia", "reinjection"])
@pytest.mark.parametrize("values, message", [
    ({"defense": "nope"}, "defense='nope'"),
    ({"defense": "clean", "defense_options": {"lr_max1": 0.3}}, "must be empty"),
    ({"defense": "sft", "defense_options": {"epochs": 3}}, "defense_options.epochs"),
    ({"defense": "sft", "defense_options": {"bogus": 1}}, "bogus"),
    ({"defense": "sft", "defense_options": {"lr_max1": 0.0001}}, "lr_max1"),
])
def test_bad_sequela_configs_fail_with_one_line(name, values, message):
    with pytest.raises(ConfigError, match=message) as e:
        registry.get(name).build_config(values)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("values, message", [
    ({"reinject_ratio": 0.0}, "reinject_ratio"), ({"reinject_ratio": 1.0}, "reinject_ratio"),
    ({"reinject_epochs": 0}, "reinject_epochs"),
])
def test_bad_reinjection_configs(values, message):
    with pytest.raises(ConfigError, match=message):
        registry.get("reinjection").build_config(values)


def test_bad_mia_configs():
    for values, message in (({"attack_input": "logits"}, "attack_input"), ({"mia_epochs": 0}, "mia_epochs"),
                            ({"mia_lr": 0.0}, "mia_lr")):
        with pytest.raises(ConfigError, match=message):
            registry.get("mia").build_config(values)
