"""Unit tests for secsweep.ops.encodermi: pairwise similarity features and the vector-, set- and
threshold-based inference classifiers on synthetic embeddings whose member views agree more."""

from __future__ import annotations

import math

import pytest
import torch

from secsweep.ops.encodermi import (
    N_VIEWS,
    Inference,
    SetClassifier,
    evaluate,
    infer_membership,
    set_inference,
    similarity_features,
    threshold_inference,
    vector_inference,
)

D = 16
PAIRS = N_VIEWS * (N_VIEWS - 1) // 2


def _embeddings(n: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """(n, N_VIEWS, D): a random direction per sample plus per-view noise; less noise = closer views."""
    centre = torch.randn(n, 1, D, generator=gen)
    return centre + noise * torch.randn(n, N_VIEWS, D, generator=gen)


def _split(member_noise: float, nonmember_noise: float, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    m = similarity_features(_embeddings(n, member_noise, g))
    nm = similarity_features(_embeddings(n, nonmember_noise, g))
    return torch.cat([m, nm]), torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])


@pytest.fixture(scope="module")
def shifted():
    """Members' views are closer (noise 0.5 vs 0.9): shadow and target drawn independently."""
    return _split(0.5, 0.9, 200, seed=0), _split(0.5, 0.9, 200, seed=1)


@pytest.fixture(scope="module")
def unshifted():
    return _split(0.8, 0.8, 200, seed=2), _split(0.8, 0.8, 200, seed=3)


def test_similarity_features_shape_order_and_identical_views():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(5, 4, 7, generator=g)
    f = similarity_features(e)
    assert f.shape == (5, 6)
    # column order (0,1), (0,2), (0,3), (1,2), (1,3), (2,3)
    torch.testing.assert_close(f[:, 4], torch.nn.functional.cosine_similarity(e[:, 1], e[:, 3], dim=1))
    s = similarity_features(e, sort=True)
    assert bool((s[:, :-1] >= s[:, 1:]).all())
    torch.testing.assert_close(s, f.sort(dim=1, descending=True).values)
    same = similarity_features(torch.randn(3, 1, 7, generator=g).expand(3, N_VIEWS, 7) * 2.5)
    assert same.shape == (3, PAIRS)
    torch.testing.assert_close(same, torch.ones(3, PAIRS))
    with pytest.raises(ValueError, match="embeddings shape"):
        similarity_features(torch.randn(4, 1, 7))


@pytest.mark.parametrize("kind", ["vector", "set", "threshold"])
def test_classifier_high_auc_when_members_views_agree(kind, shifted):
    (s_x, s_m), (t_x, t_m) = shifted
    inf = infer_membership(kind, s_x, s_m, t_x, seed=0)
    assert isinstance(inf, Inference) and inf.scores.shape == (400,)
    assert inf.predictions.dtype == torch.bool
    res = evaluate(inf, t_m)
    assert res["auc"] > 0.9 and res["accuracy"] > 0.8, res


@pytest.mark.parametrize("kind", ["vector", "set", "threshold"])
def test_classifier_near_chance_when_members_do_not_differ(kind, unshifted):
    (s_x, s_m), (t_x, t_m) = unshifted
    res = evaluate(infer_membership(kind, s_x, s_m, t_x, seed=0), t_m)
    assert abs(res["auc"] - 0.5) < 0.1 and abs(res["accuracy"] - 0.5) < 0.1, res


def test_set_classifier_is_permutation_invariant(shifted):
    (s_x, s_m), (t_x, _) = shifted
    perm = torch.randperm(PAIRS, generator=torch.Generator().manual_seed(5))
    a = set_inference(s_x, s_m, t_x, epochs=3, seed=0).scores
    b = set_inference(s_x, s_m, t_x[:, perm], epochs=3, seed=0).scores
    torch.testing.assert_close(a, b)
    net = SetClassifier()
    x = torch.rand(4, PAIRS)
    torch.testing.assert_close(net(x), net(x[:, perm]))


def test_vector_classifier_sorts_its_input(shifted):
    (s_x, s_m), (t_x, _) = shifted
    perm = torch.randperm(PAIRS, generator=torch.Generator().manual_seed(6))
    a = vector_inference(s_x, s_m, t_x, epochs=2, seed=0).scores
    b = vector_inference(s_x, s_m, t_x[:, perm], epochs=2, seed=0).scores
    torch.testing.assert_close(a, b)


def test_trained_classifiers_deterministic_given_seed(shifted):
    (s_x, s_m), (t_x, _) = shifted
    for fn in (vector_inference, set_inference):
        a, b = fn(s_x, s_m, t_x, epochs=2, seed=0).scores, fn(s_x, s_m, t_x, epochs=2, seed=0).scores
        c = fn(s_x, s_m, t_x, epochs=2, seed=1).scores
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_threshold_is_fitted_on_shadow_and_scores_are_mean_similarity():
    shadow = torch.tensor([[0.9, 0.8], [0.7, 0.7], [0.2, 0.4], [0.1, 0.1]])
    is_m = torch.tensor([True, True, False, False])
    target = torch.tensor([[0.6, 0.5], [0.4, 0.2]])
    inf = threshold_inference(shadow, is_m, target)
    assert inf.threshold == pytest.approx((0.7 + 0.3) / 2)  # halfway between the groups' means
    torch.testing.assert_close(inf.scores, torch.tensor([0.55, 0.3]))
    assert inf.predictions.tolist() == [True, False]
    assert math.isfinite(inf.threshold)


def test_bad_input_refused():
    x = torch.rand(6, PAIRS)
    m = torch.tensor([True, False] * 3)
    with pytest.raises(ValueError, match="kind="):
        infer_membership("knn", x, m, x)
    with pytest.raises(ValueError, match="target pairs"):
        threshold_inference(x, m, x[:, :3])
    with pytest.raises(ValueError, match="shadow_is_member"):
        threshold_inference(x, m.long(), x)
    with pytest.raises(ValueError, match="both groups"):
        threshold_inference(x, torch.ones(6, dtype=torch.bool), x)
