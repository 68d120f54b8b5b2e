"""Defenses and sequela see what the victim saw (secsweep.trainset).

Each attack stage records the training set of its last epoch; data-filtering defenses
(`Victim.poisoned_train_set`: Spectral, AC, ABL and their ground-truth masks) and membership
inference's member pool come from that record. The attacks are trained for real on sklearn digits
(8x8, smallcnn, 1-2 epochs) while a spy keeps what the training loop actually fed the model.
"""

from __future__ import annotations

import pytest
import torch

import secsweep.backdoor as backdoor
import secsweep.loop as loop
from secsweep import registry, trainset
from secsweep.backdoor import load_split, load_victim
from secsweep.context import LocalContext
from secsweep.data import ImageSet
from secsweep.errors import ArtifactError
from secsweep.poison import poison
from secsweep.training import epoch_order
from trainables.attacks import inputaware as inputaware_mod
from trainables.sequela import mia as mia_mod

BASE = {"dataset": "digits", "model": "smallcnn", "attack_batch_size": 64, "attack_lr": 0.03}
ATTACK = {"badnets": {"attack_epochs": 1}, "wanet": {"attack_epochs": 2},
          "inputaware": {"attack_epochs": 1, "mask_pretrain_epochs": 0}}


def defense_config(attack, trainable="spectral", **values):
    own = dict(ATTACK[attack])
    epochs = own.pop("attack_epochs")
    return registry.get(trainable).build_config({**BASE, "attack": attack, "attack_epochs": epochs,
                                                 "attack_options": own, "epochs": 1, **values})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """attack -> (defense cfg, victim, what each training epoch fed the model), attacks run once."""
    stage_root = tmp_path_factory.mktemp("stages")
    fed: dict[str, list] = {}
    current: list[str] = []
    mp = pytest.MonkeyPatch()
    real_epoch = loop.train_epoch  # the one training loop (secsweep.loop.fit) every recipe goes through

    def spy_epoch(model, images, labels, *args, **kw):  # what fit() trains on, epoch by epoch
        fed[current[0]].append((images.clone(), labels.clone()))
        return real_epoch(model, images, labels, *args, **kw)

    real_build = inputaware_mod.build_victim_model

    def spy_build(cfg, ds):  # Input-Aware's own loop: keep the classifier's training-mode inputs
        model = real_build(cfg, ds)
        model.register_forward_pre_hook(
            lambda m, inp: fed[current[0]].append(inp[0].detach().cpu().clone()) if m.training else None)
        return model

    mp.setattr(loop, "train_epoch", spy_epoch)
    mp.setattr(inputaware_mod, "build_victim_model", spy_build)
    out = {}
    try:
        for attack in ATTACK:
            current[:] = [attack]
            fed[attack] = []
            cfg = defense_config(attack)
            ctx = LocalContext(workdir=tmp_path_factory.mktemp(attack), stage_root=stage_root)
            out[attack] = (cfg, load_victim(cfg, ctx), fed[attack], ctx)
    finally:
        mp.undo()
    return out


def test_wanet_defense_sees_the_last_epochs_training_set_bit_for_bit(trained):
    cfg, victim, fed, ctx = trained["wanet"]
    assert len(fed) == 2
    pset = victim.poisoned_train_set(ctx)
    last_images, last_labels = fed[-1]
    assert torch.equal(pset.images, last_images) and torch.equal(pset.labels, last_labels)
    # ... and that is not what a static re-poisoning (epoch 1's draw, no noise samples) gives
    attack_cfg = cfg.attack_config()
    static = poison(victim.train.images, victim.train.labels, victim.trigger, ratio=attack_cfg.poison_ratio,
                    target=attack_cfg.target_label, seed=attack_cfg.seed)
    assert not torch.equal(pset.poisoned, static.poisoned)
    assert not torch.equal(pset.images, static.images)
    assert not torch.equal(pset.images, fed[0][0])  # epochs differ: the record is the last one's
    # the ground-truth mask is the relabelled samples; noise-mode samples are recorded apart
    record = victim.record()
    assert int(record["mode"][0]) == trainset.REGENERATE and int(record["epoch"][0]) == 1
    assert torch.equal(pset.poisoned, record["poisoned"]) and bool((pset.labels[pset.poisoned] == 0).all())
    cross = record["cross"]
    assert int(cross.sum()) == 2 * int(pset.poisoned.sum()) and not bool((cross & pset.poisoned).any())
    changed = (pset.images != victim.train.images).flatten(1).any(1)
    assert bool(changed[cross].all()) and not bool(changed[~(cross | pset.poisoned)].any())


def test_badnets_record_is_the_static_set_it_trained_on(trained):
    cfg, victim, fed, ctx = trained["badnets"]
    pset = victim.poisoned_train_set(ctx)
    assert torch.equal(pset.images, fed[-1][0]) and torch.equal(pset.labels, fed[-1][1])
    assert int(victim.record()["mode"][0]) == trainset.STATIC
    assert not bool(victim.record()["cross"].any())


def test_inputaware_defense_sees_the_generated_images_the_classifier_trained_on(trained):
    cfg, victim, fed, ctx = trained["inputaware"]
    attack_cfg = cfg.attack_config()
    pset = victim.poisoned_train_set(ctx)
    record = victim.record()
    assert int(record["mode"][0]) == trainset.STORED
    n = len(victim.train)
    order = epoch_order(n, attack_cfg.seed, 0)
    bs = attack_cfg.attack_batch_size
    batches = [order[i: i + bs] for i in range(0, n, bs)]
    assert len(fed) == len(batches)
    for b, inputs in zip(batches, fed):
        n_bd, n_cross = int(len(b) * attack_cfg.poison_ratio), int(len(b) * attack_cfg.p_cross)
        assert torch.equal(pset.images[b], inputs)  # poisoned, cross, then clean: as trained, bit for bit
        assert bool(pset.poisoned[b[:n_bd]].all()) and not bool(pset.poisoned[b[n_bd:]].any())
        assert bool(record["cross"][b[n_bd: n_bd + n_cross]].all())
        assert bool((pset.labels[b[:n_bd]] == attack_cfg.target_label).all())
        assert torch.equal(pset.labels[b[n_bd:]], victim.train.labels[b[n_bd:]])
    assert not torch.equal(pset.images[pset.poisoned], victim.train.images[pset.poisoned])


def test_mia_member_set_is_the_attacks_recorded_training_set(trained, tmp_path, monkeypatch):
    cfg, victim, _, ctx = trained["badnets"]
    seen = {}
    real = mia_mod.membership_attacks

    def spy(model, members, nonmembers, device, **kw):
        seen["members"] = members
        return real(model, members, nonmembers, device, **kw)

    monkeypatch.setattr(mia_mod, "membership_attacks", spy)
    mcfg = registry.get("mia").build_config({**BASE, "attack": "badnets", "attack_epochs": 1, "defense": "none",
                                             "mia_epochs": 2})
    mia_ctx = LocalContext(workdir=tmp_path, stage_root=ctx.stage_root)
    registry.get("mia").fn(mcfg, mia_ctx)
    members = seen["members"]
    record = victim.record()
    train = load_split(mcfg, mia_ctx, "train")
    assert torch.equal(record["members"], torch.arange(len(train)))
    assert torch.equal(members.images, train.images[record["members"]])
    assert torch.equal(members.labels, train.labels[record["members"]])  # true labels, queried clean
    val = load_split(mcfg, mia_ctx, "val")
    assert len(members) == len(train) and len(val) > 0  # the held-out validation samples are no members


def test_a_split_other_than_the_attacks_is_refused(trained):
    cfg, victim, _, ctx = trained["badnets"]
    other = ImageSet(victim.train.images.flip(0), victim.train.labels.flip(0), victim.train.num_classes, "digits")
    with pytest.raises(ArtifactError, match="not the one the attack trained on"):
        trainset.rebuild(victim.record(), other, victim.trigger)
    with pytest.raises(ArtifactError, match="not the one the attack trained on"):
        trainset.members(victim.record(), victim.train.subset(torch.arange(10)))


def test_a_stage_without_a_record_is_an_error(trained, tmp_path):
    cfg, victim, _, _ = trained["badnets"]

    class Out:  # a stage directory holding only a model (computed by older code)
        path = tmp_path

    with pytest.raises(ArtifactError, match="no 'training_set' output"):
        trainset.load_record(Out())


def test_spectral_runs_on_the_wanet_record(trained, tmp_path):
    cfg, victim, _, ctx = trained["wanet"]
    run_ctx = LocalContext(workdir=tmp_path, stage_root=ctx.stage_root)
    registry.get("spectral").fn(cfg, run_ctx)
    last = run_ctx.history[-1]
    # removed samples counted against the recorded poison mask: 1.5 * eps of every label
    assert last["num_removed"] > 0 and 0.0 <= last["tpr"] <= 1.0
