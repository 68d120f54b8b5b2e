"""Unit tests for secsweep.ops.detection on synthetic features with a planted poisoned subset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from secsweep.ops.detection import (
    activation_clustering,
    lgA_loss,
    loss_isolation,
    spectral_remove,
    spectral_scores,
)

N_PER_CLASS = 200  # samples per class
N_CLASSES = 3
DIM = 32  # feature dimension
N_POISON = 20  # planted poisoned samples, all labelled class 0 (10 % of that class)




@pytest.fixture(scope="module")
def planted() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian class clusters; 10 % of class 0 shifted along one random direction."""
    g = torch.Generator().manual_seed(0)
    means = 5.0 * torch.randn(N_CLASSES, DIM, generator=g)
    labels = torch.arange(N_CLASSES).repeat_interleave(N_PER_CLASS)
    feats = means[labels] + torch.randn(labels.numel(), DIM, generator=g)
    direction = torch.randn(DIM, generator=g)
    direction = direction / direction.norm()
    poison = torch.zeros(labels.numel(), dtype=torch.bool)
    poison_idx = torch.randperm(N_PER_CLASS, generator=g)[:N_POISON]  # rows of class 0
    poison[poison_idx] = True
    feats[poison] += 8.0 * direction  # 8 noise standard deviations
    return feats, labels, poison


def test_spectral_scores_rank_planted_samples_first(planted):
    feats, labels, poison = planted
    scores = spectral_scores(feats, labels)
    assert scores.shape == (feats.shape[0],)
    assert roc_auc_score(poison.numpy(), scores.numpy()) > 0.8


def test_spectral_scores_equal_squared_projection_on_one_class():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0]])  # spread only along axis 0
    scores = spectral_scores(x, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(scores, torch.tensor([4.0, 0.0, 4.0]), atol=1e-6)


def test_spectral_remove_drops_mostly_planted_samples(planted):
    feats, labels, poison = planted
    keep = spectral_remove(spectral_scores(feats, labels), labels, eps=0.1, factor=1.5)
    removed = ~keep
    # floor(1.5 * 0.1 * 200) = 30 samples removed from every class
    for cls in range(N_CLASSES):
        assert int(removed[labels == cls].sum()) == 30
    assert int((removed & poison).sum()) == N_POISON  # every planted sample is caught
    class0_removed = removed & (labels == 0)
    assert (removed & poison).sum() / class0_removed.sum() > 0.6


# FastICA cannot converge on the Gaussian clean components by design of the synthetic data
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_activation_clustering_flags_planted_cluster(planted):
    feats, labels, poison = planted
    scores, flagged = activation_clustering(feats, labels, n_components=10, seed=0)
    assert scores.shape == flagged.shape == (feats.shape[0],)
    assert flagged.dtype == torch.bool
    assert roc_auc_score(poison.numpy(), scores.numpy()) > 0.8
    assert int((flagged & poison).sum()) >= N_POISON - 1
    assert int((flagged & ~poison).sum()) <= 5


# FastICA cannot converge on the Gaussian clean components by design of the synthetic data
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("seed", range(8))
def test_activation_clustering_finds_the_planted_split_for_every_seed(planted, seed):
    """The planted poison is the split of least inertia; KMeans with 30 restarts finds it whatever
    the seed (with scikit-learn's default 10 restarts, seeds 0, 2, 5 and 7 miss it)."""
    feats, labels, poison = planted
    _, flagged = activation_clustering(feats, labels, n_components=10, seed=seed)
    assert int((flagged & poison).sum()) >= N_POISON - 1
    assert int((flagged & ~poison).sum()) <= 5


def test_activation_clustering_scores_are_one_minus_cluster_share():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(16, 4, generator=g), torch.randn(4, 4, generator=g) + 20.0])
    scores, flagged = activation_clustering(x, torch.zeros(20, dtype=torch.long), reduce="pca")
    assert torch.allclose(scores, torch.tensor([0.2] * 16 + [0.8] * 4, dtype=scores.dtype))
    assert flagged.tolist() == [False] * 16 + [True] * 4  # 4/20 = 0.2 <= 0.35
    _, none = activation_clustering(x, torch.zeros(20, dtype=torch.long), reduce="pca", size_threshold=0.1)
    assert not none.any()


def test_activation_clustering_pca_variant(planted):
    feats, labels, poison = planted
    scores, _ = activation_clustering(feats, labels, reduce="pca")
    assert roc_auc_score(poison.numpy(), scores.numpy()) > 0.8


def test_loss_isolation_picks_lowest_losses():
    losses = torch.tensor([0.9, 0.01, 2.0, 0.02, 1.5, 0.5, 0.3, 0.8, 1.1, 0.7])
    mask = loss_isolation(losses, fraction=0.2)
    assert mask.tolist() == [False, True, False, True] + [False] * 6
    assert int(loss_isolation(losses, fraction=0.01).sum()) == 1  # at least one sample


def test_lga_loss_sign_behaviour():
    logits = torch.tensor([[5.0, 0.0], [0.0, 0.0]], requires_grad=True)  # CE ~0.0067 and ln 2
    labels = torch.tensor([0, 0])
    per_sample = lgA_loss(logits, labels, gamma=0.5, reduction="none")
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(per_sample, torch.stack([-ce[0], ce[1]]))
    per_sample.sum().backward()
    ce_grad = torch.autograd.grad(ce.sum(), logits)[0]
    assert torch.allclose(logits.grad[0], -ce_grad[0])  # below gamma: gradient ascent
    assert torch.allclose(logits.grad[1], ce_grad[1])  # above gamma: plain descent
    assert torch.isclose(lgA_loss(logits, labels), per_sample.mean())
    # released-code variant: sign of the batch-mean CE (~0.35)
    assert torch.isclose(lgA_loss(logits, labels, gamma=0.5, reduction="batch"), -ce.mean())
    assert torch.isclose(lgA_loss(logits, labels, gamma=0.3, reduction="batch"), ce.mean())


@pytest.mark.parametrize(
    "call",
    [
        lambda: spectral_scores(torch.zeros(5), torch.zeros(5, dtype=torch.long)),
        lambda: spectral_scores(torch.zeros(5, 2), torch.zeros(4, dtype=torch.long)),
        lambda: spectral_scores(torch.zeros(5, 2), torch.zeros(5)),
        lambda: spectral_remove(torch.zeros(5), torch.zeros(5, dtype=torch.long), eps=0.0),
        lambda: spectral_remove(torch.zeros(5), torch.zeros(5, dtype=torch.long), eps=0.5, factor=3.0),
        lambda: activation_clustering(torch.zeros(5, 2), torch.zeros(5, dtype=torch.long), size_threshold=0.6),
        lambda: activation_clustering(torch.zeros(5, 2), torch.zeros(5, dtype=torch.long), reduce="tsne"),
        lambda: activation_clustering(torch.zeros(5, 2), torch.zeros(5, dtype=torch.long), n_components=0),
        lambda: loss_isolation(torch.zeros(5), fraction=1.0),
        lambda: loss_isolation(torch.zeros(5, 1)),
        lambda: lgA_loss(torch.zeros(4), torch.zeros(4, dtype=torch.long)),
        lambda: lgA_loss(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), gamma=0.0),
        lambda: lgA_loss(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), reduction="sum"),
    ],
)
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()
