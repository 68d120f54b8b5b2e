"""Unit tests for secsweep.ops.badencoder: BadEncoder's L0, L1, L2 and their weighted sum."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from secsweep.ops.badencoder import (
    BadEncoderLoss,
    badencoder_loss,
    effectiveness_loss,
    reference_loss,
    utility_loss,
)

D = 8


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_losses_are_minus_one_at_their_optimum():
    ref = _rand(1, D, seed=0)
    # every triggered sample embedded along the (single) reference direction, any length
    triggered = ref.repeat(5, 1) * torch.tensor([[0.5], [1.0], [2.0], [3.0], [7.0]])
    assert effectiveness_loss(triggered, ref).item() == pytest.approx(-1.0)
    z = _rand(6, D, seed=1)
    assert reference_loss(z * 3.0, z).item() == pytest.approx(-1.0)
    assert utility_loss(z, z.clone()).item() == pytest.approx(-1.0)
    # opposite directions: +1, the worst value (the minus sign of L0 is there)
    assert effectiveness_loss(-triggered, ref).item() == pytest.approx(1.0)


def test_effectiveness_is_mean_over_every_triggered_reference_pair():
    t, r = _rand(4, D, seed=2), _rand(3, D, seed=3)
    expected = -torch.stack([F.cosine_similarity(t[i], r[j], dim=0) for i in range(4) for j in range(3)]).mean()
    torch.testing.assert_close(effectiveness_loss(t, r), expected)


def test_paired_losses_are_rowwise_means():
    a, b = _rand(5, D, seed=4), _rand(5, D, seed=5)
    expected = -torch.stack([F.cosine_similarity(a[i], b[i], dim=0) for i in range(5)]).mean()
    torch.testing.assert_close(utility_loss(a, b), expected)
    torch.testing.assert_close(reference_loss(a, b), expected)


def _parts(seed: int):
    e = [_rand(n, D, seed=seed + k) for k, n in enumerate((6, 2, 4, 4, 6, 6))]
    for i in (0, 1, 2, 4):
        e[i].requires_grad_(True)  # f' outputs
    return e


@pytest.mark.parametrize("lambda1,lambda2", [(1.0, 1.0), (0.5, 2.0), (0.0, 0.0)])
def test_total_is_weighted_sum(lambda1, lambda2):
    trig, ref, aug_ref, clean_ref, bd, clean = _parts(10)
    out = badencoder_loss(trig, ref, aug_ref, clean_ref, bd, clean, lambda1=lambda1, lambda2=lambda2)
    assert isinstance(out, BadEncoderLoss)
    torch.testing.assert_close(out.effectiveness, effectiveness_loss(trig, ref))
    torch.testing.assert_close(out.reference, reference_loss(aug_ref, clean_ref))
    torch.testing.assert_close(out.utility, utility_loss(bd, clean))
    torch.testing.assert_close(out.total, out.effectiveness + lambda1 * out.reference + lambda2 * out.utility)


def test_gradient_reaches_only_the_backdoored_encoder():
    """A tiny f' (trainable) and a frozen copy f: the loss's gradient lands on f' only, and a clean
    embedding that still requires grad (f not frozen) is refused."""
    torch.manual_seed(0)
    f_bd = torch.nn.Linear(D, D)
    f_clean = torch.nn.Linear(D, D)
    x, x_ref, x_trig = _rand(6, D, seed=20), _rand(2, D, seed=21), _rand(6, D, seed=22)
    with torch.no_grad():
        clean, clean_ref = f_clean(x), f_clean(x_ref)
    out = badencoder_loss(f_bd(x_trig), f_bd(x_ref), f_bd(x_ref), clean_ref, f_bd(x), clean)
    out.total.backward()
    assert f_bd.weight.grad is not None and f_bd.weight.grad.abs().sum() > 0
    assert f_clean.weight.grad is None
    with pytest.raises(ValueError, match="clean.requires_grad"):
        utility_loss(f_bd(x), f_clean(x))
    with pytest.raises(ValueError, match="clean_reference.requires_grad"):
        reference_loss(f_bd(x_ref), f_clean(x_ref))


def test_gradient_step_decreases_each_term():
    """One SGD step on free f' embeddings lowers the total: the signs point the right way."""
    trig, ref, aug_ref, clean_ref, bd, clean = _parts(30)
    before = badencoder_loss(trig, ref, aug_ref, clean_ref, bd, clean)
    before.total.backward()
    with torch.no_grad():
        for t in (trig, ref, aug_ref, bd):
            t -= 0.5 * t.grad
    after = badencoder_loss(trig, ref, aug_ref, clean_ref, bd, clean)
    assert after.effectiveness < before.effectiveness
    assert after.reference < before.reference and after.utility < before.utility


def test_bad_input_refused():
    a = _rand(4, D, seed=40)
    with pytest.raises(ValueError, match="clean shape"):
        utility_loss(a, a[:3])
    with pytest.raises(ValueError, match="reference dim"):
        effectiveness_loss(a, a[:, :3])
    with pytest.raises(ValueError, match="lambda1"):
        badencoder_loss(a, a, a, a, a, a, lambda1=-1.0)
