"""The one training loop: pluggable step, optimizers, schedules, targets, frozen parts, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from secsweep import loop
from secsweep.context import LocalContext
from secsweep.errors import ConfigError


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _data(n=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_default_step_is_cross_entropy_and_a_custom_step_replaces_it(tmp_path):
    x, y = _data()
    seen = []

    def step(model, xb, yb, gen):  # unlabelled: a reconstruction-free toy loss, labels unused
        seen.append((len(xb), int((yb == -1).all()), gen is not None))
        return model(xb).pow(2).mean()

    m = loop.fit(_net(), (x, None), LocalContext(workdir=tmp_path), epochs=2, batch_size=16, seed=0, step=step, lr=0.1)
    assert seen == [(16, 1, True)] * 8
    assert m(x).pow(2).mean() < _net()(x).pow(2).mean()  # it minimised the step's loss
    ctx = LocalContext(workdir=tmp_path / "ce")
    loop.fit(_net(), (x, y), ctx, epochs=3, batch_size=16, seed=0, lr=0.1)
    losses = [r["train_loss"] for r in ctx.history]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", loop.OPTIMIZERS)
def test_every_optimizer_trains(name, tmp_path):
    x, y = _data()
    ctx = LocalContext(workdir=tmp_path)
    loop.fit(_net(), (x, y), ctx, epochs=4, batch_size=16, seed=0, opt=name, lr=0.05 if name != "lars" else 0.5,
             weight_decay=0.0)
    assert ctx.history[-1]["train_loss"] < ctx.history[0]["train_loss"]
    with pytest.raises(ConfigError, match="optimizer='rmsprop'"):
        loop.optimizer("rmsprop", _net().parameters(), lr=0.1)


def test_torch_scheduler_is_stepped_per_step_and_resumed(tmp_path):
    x, y = _data()
    sched = lambda opt, spe: torch.optim.lr_scheduler.StepLR(opt, step_size=spe, gamma=0.5)
    ctx = LocalContext(workdir=tmp_path)
    loop.fit(_net(), (x, y), ctx, epochs=3, batch_size=16, seed=0, lr=0.1, scheduler=sched)
    assert [r["lr"] for r in ctx.history] == pytest.approx([0.05, 0.025, 0.0125])
    # a run killed after epoch 2 resumes with the scheduler where it was
    ck = tmp_path / "ck.pt"
    first = LocalContext(workdir=tmp_path / "a", checkpoint=ck)
    loop.fit(_net(), (x, y), first, epochs=2, batch_size=16, seed=0, lr=0.1, scheduler=sched)
    second = LocalContext(workdir=tmp_path / "a", checkpoint=ck)
    resumed = loop.fit(_net(), (x, y), second, epochs=3, batch_size=16, seed=0, lr=0.1, scheduler=sched)
    assert second.history[-1]["lr"] == pytest.approx(0.0125)
    whole = loop.fit(_net(), (x, y), LocalContext(workdir=tmp_path / "b"), epochs=3, batch_size=16, seed=0, lr=0.1,
                     scheduler=sched)
    for p, q in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(p, q)


def test_after_step_updates_a_momentum_target_every_step(tmp_path):
    from lightly.models.utils import update_momentum

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.online = _net()
            self.target = copy.deepcopy(self.online).requires_grad_(False)

    x, y = _data()
    model = Pair()
    calls = []

    def after(step):
        calls.append(step)
        update_momentum(model.online, model.target, m=0.9)

    step = lambda m, xb, yb, g: nn.functional.cross_entropy(m.online(xb), yb)
    loop.fit(model, (x, y), LocalContext(workdir=tmp_path), epochs=1, batch_size=16, seed=0, step=step, lr=0.1,
             after_step=after)
    assert calls == [1, 2, 3, 4]
    w_on, w_t, w0 = model.online[0].weight, model.target[0].weight, _net()[0].weight
    assert not torch.equal(w_t, w0) and not torch.equal(w_t, w_on)  # moved towards the online net, lagging


def test_frozen_modules_and_frozen_batchnorm_do_not_change(tmp_path):
    x, y = _data()
    net = _net()
    net[1].running_mean.fill_(0.5)  # running statistics a training-mode BN would move
    before = copy.deepcopy(net)
    loop.fit(net, (x, y), LocalContext(workdir=tmp_path), epochs=2, batch_size=16, seed=0, lr=0.1,
             frozen=[net[0]], freeze_batchnorm=True)
    assert torch.equal(net[0].weight, before[0].weight)              # frozen: no gradient step
    assert torch.equal(net[1].running_mean, before[1].running_mean)  # BN in eval: stats kept
    assert not torch.equal(net[3].weight, before[3].weight)          # the rest trained
    free = _net()
    loop.fit(free, (x, y), LocalContext(workdir=tmp_path / "f"), epochs=1, batch_size=16, seed=0, lr=0.1)
    assert not torch.equal(free[1].running_mean, _net()[1].running_mean)


def test_final_evaluate_runs_on_the_last_epoch_only(tmp_path):
    x, y = _data()
    ctx = LocalContext(workdir=tmp_path)
    loop.fit(_net(), (x, y), ctx, epochs=3, batch_size=32, seed=0, lr=0.1,
             evaluate=lambda m, d: {"cheap": 1.0}, final_evaluate=lambda m, d: {"probe": 2.0})
    assert ["probe" in r for r in ctx.history] == [False, False, True] and all("cheap" in r for r in ctx.history)


def test_lr_schedules():
    cos = loop.lr_schedule("cosine", 1.0, 100)
    assert cos(0) == pytest.approx(1.0) and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    warm = loop.lr_schedule("warmup_cosine", 1.0, 100, warmup_steps=10)
    assert warm(0) == pytest.approx(0.1) and warm(9) == pytest.approx(1.0) and warm(100) == pytest.approx(0.0)
    assert loop.lr_schedule("constant", 0.3, 10)(7) == 0.3
    with pytest.raises(ConfigError, match="schedule='step'"):
        loop.lr_schedule("step", 1.0, 10)


def test_named_loss_terms_of_a_step_are_reported_per_epoch(tmp_path):
    x, y = _data()

    def step(model, xb, yb, gen):
        ce = nn.functional.cross_entropy(model(xb), yb)
        reg = model[0].weight.pow(2).sum()
        return ce + 0.1 * reg, {"ce_loss": ce, "reg_loss": reg}

    ctx = LocalContext(workdir=tmp_path)
    loop.fit(_net(), (x, y), ctx, epochs=2, batch_size=16, seed=0, step=step, lr=0.1, weight_decay=0.0)
    for r in ctx.history:
        assert r["train_loss"] == pytest.approx(r["ce_loss"] + 0.1 * r["reg_loss"], rel=1e-5)
