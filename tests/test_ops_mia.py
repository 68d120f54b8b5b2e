"""Unit tests for secsweep.ops.mia: Mentr formula, metric/NN attacks on synthetic posteriors,
the §6.1 member/non-member split and the evaluation helpers."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from sklearn.metrics import roc_auc_score

from secsweep.ops.mia import (
    MIAttackNet,
    attack_features,
    best_threshold_accuracy,
    evaluate_attack,
    fit_threshold,
    mentr,
    metric_scores,
    predict_membership,
    roc_auc,
    split_member_nonmember,
    threshold_accuracy,
    train_attack,
)

K = 10  # classes
N = 400  # samples per group




def _posteriors(n: int, margin: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of Gaussian logits with the true class boosted by `margin` (larger = more overfit)."""
    labels = torch.randint(K, (n,), generator=gen)
    logits = torch.randn(n, K, generator=gen) * 1.5
    logits[torch.arange(n), labels] += margin
    return logits.softmax(dim=1), labels


def _groups(member_margin: float, nonmember_margin: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    pm, ym = _posteriors(N, member_margin, g)
    pn, yn = _posteriors(N, nonmember_margin, g)
    return pm, ym, pn, yn


def test_mentr_matches_hand_computed_example():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    labels = torch.tensor([0, 2])
    want0 = -0.3 * math.log(0.7) - 0.2 * math.log(0.8) - 0.1 * math.log(0.9)
    want1 = -0.2 * math.log(0.8) - 0.5 * math.log(0.5) - 0.7 * math.log(0.3)
    assert torch.allclose(mentr(probs, labels), torch.tensor([want0, want1]), atol=1e-6)


def test_mentr_is_finite_on_one_hot_posteriors():
    probs = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    values = mentr(probs, torch.tensor([0, 1]))
    assert torch.isfinite(values).all()
    assert values[0] == 0.0  # confident and correct: smallest possible value
    assert values[1] > 60.0  # confident and wrong: -log(1e-30) ~ 69


def test_metric_scores_higher_means_member():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3]])
    labels = torch.tensor([0, 1])
    assert torch.allclose(metric_scores(probs, labels, "confidence"), torch.tensor([0.9, 0.3]))
    ent = metric_scores(probs, labels, "entropy")
    assert ent[0] > ent[1] and (ent <= 0).all()
    assert torch.allclose(metric_scores(probs, labels, "mentr"), -mentr(probs, labels))
    assert metric_scores(probs, labels, "correctness").tolist() == [1.0, 0.0]


def test_attack_features_kinds():
    probs = torch.tensor([[0.1, 0.6, 0.3, 0.0], [0.25, 0.25, 0.4, 0.1]])
    assert torch.equal(attack_features(probs, "full"), probs)
    assert torch.allclose(attack_features(probs)[0], torch.tensor([0.6, 0.3, 0.1, 0.0]))
    assert attack_features(probs, "top3").shape == (2, 3)
    assert torch.allclose(attack_features(probs, "top3")[1], torch.tensor([0.4, 0.25, 0.25]))


def test_split_is_disjoint_and_balanced():
    split = split_member_nonmember(n_train=50_000, n_test=10_000, seed=3)
    assert {len(v) for v in split.values()} == {5_000}
    assert not set(split["train_members"].tolist()) & set(split["eval_members"].tolist())
    assert not set(split["train_nonmembers"].tolist()) & set(split["eval_nonmembers"].tolist())
    assert int(split["train_nonmembers"].max()) < 10_000 and int(split["train_members"].max()) < 50_000
    again = split_member_nonmember(n_train=50_000, n_test=10_000, seed=3)
    assert all(torch.equal(split[k], again[k]) for k in split)


def test_split_with_small_training_set_stays_balanced():
    split = split_member_nonmember(n_train=7, n_test=100, seed=0)
    assert {len(v) for v in split.values()} == {3}
    assert not set(split["train_members"].tolist()) & set(split["eval_members"].tolist())


def test_nn_and_mentr_attacks_detect_overfit_members():
    pm, ym, pn, yn = _groups(member_margin=6.0, nonmember_margin=2.0, seed=0)
    half = N // 2
    net = train_attack(attack_features(pm[:half]), attack_features(pn[:half]), epochs=50, seed=0)
    assert isinstance(net, MIAttackNet) and not net.training
    x_eval = attack_features(torch.cat([pm[half:], pn[half:]]))
    is_member = torch.cat([torch.ones(N - half), torch.zeros(N - half)]).bool()
    result = evaluate_attack(predict_membership(net, x_eval), is_member)
    assert result["auc"] > 0.6 and result["accuracy"] > 0.55
    scores = metric_scores(torch.cat([pm, pn]), torch.cat([ym, yn]), "mentr")
    all_member = torch.cat([torch.ones(N), torch.zeros(N)]).bool()
    assert roc_auc(scores, all_member) > 0.6


def test_attacks_are_near_chance_without_membership_signal():
    pm, ym, pn, yn = _groups(member_margin=3.0, nonmember_margin=3.0, seed=1)
    half = N // 2
    net = train_attack(attack_features(pm[:half]), attack_features(pn[:half]), epochs=20, seed=0)
    x_eval = attack_features(torch.cat([pm[half:], pn[half:]]))
    is_member = torch.cat([torch.ones(N - half), torch.zeros(N - half)]).bool()
    assert abs(evaluate_attack(predict_membership(net, x_eval), is_member)["auc"] - 0.5) < 0.1
    scores = metric_scores(torch.cat([pm, pn]), torch.cat([ym, yn]), "mentr")
    assert abs(roc_auc(scores, torch.cat([torch.ones(N), torch.zeros(N)]).bool()) - 0.5) < 0.1


def test_roc_auc_matches_sklearn_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (200,), generator=g).float()  # many ties
    labels = torch.rand(200, generator=g) < 0.4
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()))
    assert math.isnan(roc_auc(scores, torch.zeros(200, dtype=torch.bool)))


def test_fit_threshold_transfers_to_evaluation_set():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    is_member = torch.tensor([False, False, False, True, True, True])
    t = fit_threshold(scores, is_member)
    assert t == pytest.approx(0.45)
    assert best_threshold_accuracy(scores, is_member) == 1.0
    eval_scores = torch.tensor([0.4, 0.5, 0.44, 0.46])
    assert threshold_accuracy(eval_scores, torch.tensor([False, True, False, True]), t) == 1.0
    result = evaluate_attack(eval_scores, torch.tensor([False, True, False, True]), threshold=t)
    assert result["accuracy"] == 1.0 and result["tpr"] == 1.0 and result["fpr"] == 0.0
    # correctness scores: member iff correctly classified
    assert fit_threshold(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([True, True, False, False])) == 0.5
    # no signal: flagging nobody is as good as anything else and wins the tie
    assert fit_threshold(torch.tensor([1.0, 1.0]), torch.tensor([True, False])) == math.inf


def test_fit_threshold_maximises_balanced_accuracy_over_every_candidate():
    """Against brute force: every midpoint between distinct scores, below the minimum and above the
    maximum; scores with many ties."""
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        scores = torch.randint(0, 12, (60,), generator=g).double() / 4
        is_member = torch.rand(60, generator=g) < 0.3 + 0.02 * trial
        if is_member.all() or not is_member.any():
            continue
        uniq = torch.unique(scores).tolist()
        candidates = [uniq[0]] + [(a + b) / 2 for a, b in zip(uniq, uniq[1:])] + [math.inf]

        def balanced(t):  # exact fractions, so that ties are ties
            pred = scores >= t
            return (Fraction(int((pred & is_member).sum()), int(is_member.sum()))
                    + Fraction(int((~pred & ~is_member).sum()), int((~is_member).sum()))) / 2

        best = max(balanced(t) for t in candidates)
        expected = max(t for t in candidates if balanced(t) == best)  # ties: the largest threshold
        assert fit_threshold(scores, is_member) == expected


def test_train_attack_does_not_touch_global_rng():
    x_member, x_nonmember = torch.rand(8, 3), torch.rand(8, 3)
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    train_attack(x_member, x_nonmember, epochs=1, seed=5)
    assert torch.equal(torch.rand(3), want)


@pytest.mark.parametrize(
    "call",
    [
        lambda: mentr(torch.rand(4), torch.zeros(4, dtype=torch.long)),
        lambda: mentr(torch.full((2, 3), 2.0), torch.zeros(2, dtype=torch.long)),
        lambda: mentr(torch.full((2, 3), 0.3), torch.tensor([0, 3])),
        lambda: mentr(torch.full((2, 3), 0.3), torch.zeros(3, dtype=torch.long)),
        lambda: metric_scores(torch.full((2, 3), 0.3), torch.zeros(2, dtype=torch.long), "loss"),
        lambda: attack_features(torch.full((2, 3), 0.3), "top5"),
        lambda: attack_features(torch.full((2, 2), 0.5), "top3"),
        lambda: split_member_nonmember(1, 10, 0),
        lambda: split_member_nonmember(10, 1, 0),
        lambda: train_attack(torch.rand(4, 3), torch.rand(4, 2)),
        lambda: train_attack(torch.rand(4, 3), torch.rand(4, 3), epochs=0),
        lambda: train_attack(torch.rand(4, 3), torch.rand(4, 3), lr=0.0),
        lambda: evaluate_attack(torch.rand(4), torch.ones(4)),
        lambda: fit_threshold(torch.rand(4), torch.ones(4, dtype=torch.bool)),
        lambda: MIAttackNet(0),
    ],
)
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()
