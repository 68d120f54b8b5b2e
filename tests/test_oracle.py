"""Unit tests for secsweep.oracle: the black-box query oracle (answers, budget, output defenses, no
access to the target's weights) and the T-Tab 4.1 cost model."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn as nn

from secsweep.errors import ConfigError, SecsweepError
from secsweep.oracle import (
    Oracle,
    OutputDefense,
    QueryBudgetExceeded,
    costs,
    reverse_sigmoid,
)

D, K = 16, 5


def _net(out: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(32, out))


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _clean(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was)
    return out


def test_answers_are_eval_mode_outputs_without_gradient(x):
    enc = _net(D).train()
    oracle = Oracle(enc, output="embedding")
    xg = x.clone().requires_grad_(True)
    z = oracle.query(xg)
    assert not z.requires_grad and z.grad_fn is None
    torch.testing.assert_close(z, _clean(enc, x))              # eval mode: no dropout, running BN stats
    torch.testing.assert_close(oracle.query(x), z)            # so the answer is deterministic
    assert enc.training and all(m.training for m in enc.modules())  # the owner's mode is left as it was
    with pytest.raises(RuntimeError):
        torch.autograd.grad(z.sum(), xg)                      # no path back to the input
    assert all(p.grad is None for p in enc.parameters())


def test_posterior_and_label_outputs(x):
    clf = _net(K)
    logits = _clean(clf, x)
    post = Oracle(clf, output="posterior").query(x)
    torch.testing.assert_close(post, logits.softmax(1))
    torch.testing.assert_close(post.sum(1), torch.ones(len(x)))
    labels = Oracle(clf, output="label").query(x)
    assert labels.dtype == torch.int64 and torch.equal(labels, logits.argmax(1))


def test_budget_counts_images_and_refuses_past_it(x):
    oracle = Oracle(_net(D), budget=12, batch_size=3)  # batch_size splits the forward passes only
    assert oracle.queries_used == 0 and oracle.remaining == 12
    oracle.query(x[:4])
    oracle.query(x[:8])
    assert oracle.queries_used == 12 and oracle.remaining == 0
    with pytest.raises(QueryBudgetExceeded, match=r"budget=12: a query of 1 images would exceed it \(12 used"):
        oracle.query(x[:1])
    assert oracle.queries_used == 12  # a refused query is not counted
    assert issubclass(QueryBudgetExceeded, SecsweepError)
    unlimited = Oracle(_net(D))
    unlimited.query(x)
    assert unlimited.queries_used == len(x) and unlimited.remaining is None and unlimited.budget is None


def test_gaussian_noise_level_and_seeding():
    enc = _net(D)
    x = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    clean = _clean(enc, x)
    noisy = Oracle(enc, defense=OutputDefense(noise_std=2.0, seed=7)).query(x)
    assert float((noisy - clean).std()) == pytest.approx(2.0, rel=0.05)   # 3,200 draws
    assert float((noisy - clean).mean()) == pytest.approx(0.0, abs=0.15)
    again = Oracle(enc, defense=OutputDefense(noise_std=2.0, seed=7)).query(x)
    other = Oracle(enc, defense=OutputDefense(noise_std=2.0, seed=8)).query(x)
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)
    # one oracle draws fresh noise per query (its generator advances)
    oracle = Oracle(enc, defense=OutputDefense(noise_std=2.0))
    assert not torch.equal(oracle.query(x[:5]), oracle.query(x[:5]))


def test_top_k_and_rounding(x):
    enc = _net(D)
    clean = _clean(enc, x)
    top = Oracle(enc, defense=OutputDefense(top_k=3)).query(x)
    assert torch.equal((top != 0).sum(1), torch.full((len(x),), 3))
    kept = clean.topk(3, dim=1)
    assert torch.equal(top.gather(1, kept.indices), kept.values)
    rounded = Oracle(enc, defense=OutputDefense(round_digits=1)).query(x)
    torch.testing.assert_close(rounded, torch.round(clean, decimals=1))
    assert not torch.equal(rounded, clean)
    # order: top-k, then rounding (the kept entries are rounded, the rest stay 0)
    both = Oracle(enc, defense=OutputDefense(top_k=3, round_digits=2)).query(x)
    torch.testing.assert_close(both, torch.round(top, decimals=2))
    with pytest.raises(ValueError, match="top_k=17"):
        Oracle(enc, defense=OutputDefense(top_k=D + 1)).query(x)


def test_reverse_sigmoid_formula():
    y = torch.tensor([[0.7, 0.2, 0.1], [0.98, 0.01, 0.01]], dtype=torch.float64)
    beta, gamma = 0.8, 0.3
    # by hand: r_k = beta * (1 / (1 + ((1 - y_k) / y_k)^gamma) - 1/2), y' = clip(y - r, 0, 1) normalised
    expected = []
    for row in y.tolist():
        pert = [min(max(v - beta * (1 / (1 + ((1 - v) / v) ** gamma) - 0.5), 0.0), 1.0) for v in row]
        expected.append([p / sum(pert) for p in pert])
    out = reverse_sigmoid(y, beta, gamma)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(out.sum(1), torch.ones(2, dtype=torch.float64))
    assert not torch.allclose(out, y)
    with pytest.raises(ValueError, match="K >= 2"):
        reverse_sigmoid(torch.tensor([[0.3]]))


def test_reverse_sigmoid_on_a_posterior_oracle(x):
    clf = _net(K)
    plain = Oracle(clf, output="posterior").query(x)
    defended = Oracle(clf, output="posterior", defense=OutputDefense(reverse_sigmoid=True)).query(x)
    torch.testing.assert_close(defended, reverse_sigmoid(plain, 1.0, 0.1))  # ART's defaults
    assert (defended >= 0).all() and not torch.allclose(defended, plain)


def test_bad_settings_are_one_line_config_errors():
    enc = _net(D)
    for kwargs, field in [(dict(output="logits"), "output="), (dict(budget=-1), "budget="),
                          (dict(output="label", defense=OutputDefense(noise_std=1.0)), "defense="),
                          (dict(defense=OutputDefense(reverse_sigmoid=True)), "defense.reverse_sigmoid=")]:
        with pytest.raises(ConfigError, match=field):
            Oracle(enc, **kwargs)
    for kwargs, field in [(dict(noise_std=-1.0), "noise_std="), (dict(top_k=0), "top_k="),
                          (dict(round_digits=-2), "round_digits="), (dict(beta=0.0), "beta="),
                          (dict(gamma=-1.0), "gamma=")]:
        with pytest.raises(ConfigError, match=field):
            OutputDefense(**kwargs)
    with pytest.raises(TypeError, match="nn.Module"):
        Oracle(lambda z: z)


def _attacker(oracle) -> list[str]:
    """What an attack function could try on the object it is given; returns what it reached."""
    reached = []
    for name in ("model", "_model", "module", "target", "parameters", "named_parameters", "state_dict",
                 "modules", "children", "buffers", "weight"):
        try:
            getattr(oracle, name)
            reached.append(name)
        except AttributeError:
            pass
    return reached


def test_the_attacker_cannot_reach_the_weights(x):
    enc = _net(D)
    oracle = Oracle(enc, budget=100)
    assert _attacker(oracle) == []
    with pytest.raises(AttributeError, match="not reachable"):
        oracle.model
    # no module (or a container holding one) among the instance's attributes
    state = vars(oracle)
    assert not any(isinstance(v, nn.Module) for v in state.values())
    assert not any(isinstance(v, (tuple, list, dict)) and any(isinstance(e, nn.Module) for e in
                   (v.values() if isinstance(v, dict) else v)) for v in state.values())
    assert not isinstance(oracle, nn.Module)
    for clone in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="cannot be pickled"):
            clone(oracle)
    # nor can it swap in its own model or reset the query counter
    oracle.query(x)
    for name, value in (("model", nn.Linear(1, 1)), ("queries_used", 0), ("_Oracle__used", lambda: 0)):
        with pytest.raises(AttributeError, match="read-only"):
            setattr(oracle, name, value)
    assert oracle.queries_used == len(x)


def test_answers_come_back_on_the_requested_device(x):
    oracle = Oracle(_net(D))
    assert oracle.query(x).device == x.device
    assert oracle.query(x, device="cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="x shape="):
        oracle.query(x[:0])


def test_cost_model_reproduces_t_tab_4_1():
    # SimCLR row of T-Tab 4.1: Cont-Steal 0.62 h + 10,000 queries = $11.83 (1.83 + 10); normal
    # pre-training 20.01 h = $58.68 (the table's hours and dollars disagree by ~0.01 h / $0.03)
    c = costs(10_000, 0.62, 20.01)
    assert c.query_usd == pytest.approx(10.0)
    assert c.training_usd == pytest.approx(1.83, abs=0.015)
    assert c.attack_usd == pytest.approx(11.83, abs=0.015)
    assert c.target_usd == pytest.approx(58.68, abs=0.05)
    assert c.cost_ratio == pytest.approx(c.attack_usd / c.target_usd)
    m = c.metrics()
    assert set(m) >= {"queries", "attack_usd", "target_usd", "cost_ratio"} and m["queries"] == 10_000.0
    # the prices are fields
    assert costs(2_000, 1.0, 10.0, usd_per_gpu_hour=1.0, usd_per_1000_queries=0.5).attack_usd == pytest.approx(2.0)
    assert math.isnan(costs(0, 0.0, 0.0).cost_ratio)
    with pytest.raises(ConfigError, match="queries="):
        costs(-1, 1.0, 1.0)
