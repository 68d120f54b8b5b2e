"""Unit tests for secsweep.ops.contsteal: Cont-Steal's loss (T-Eq 4.3-4.7), its ablation switches and
the released code's symmetric NT-Xent variant."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from lightly.loss import NTXentLoss

from secsweep.ops.contsteal import cont_steal_loss, cont_steal_terms, symmetric_ntxent

# the 3 x 2 example: s1 = (1, 0), s2 = (0, 1), s3 = (1, 1); t1 = (1, 1), t2 = (0, 1), t3 = (1, 0)
S3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
T3 = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)


def _cos(u, v) -> float:
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def _by_formula(s, t, tau, encoder=True, self_=True) -> float:
    """T-Eq 4.3-4.7 written as loops over plain floats (an independent path from the tensor code)."""
    s, t = s.tolist(), t.tolist()
    n, total = len(s), 0.0
    for i in range(n):
        d_pos = math.exp(_cos(s[i], t[i]) / tau)
        d_enc = sum(math.exp(_cos(s[i], t[k]) / tau) for k in range(n)) if encoder else d_pos
        d_self = sum(math.exp(_cos(s[i], s[k]) / tau) for k in range(n) if k != i) if self_ else 0.0
        total += -math.log(d_pos / (d_enc + d_self))
    return total / n


def test_hand_computed_3x2_example():
    # by hand with tau = 0.5 (a = sqrt 2, sim/tau in {0, a, 2}):
    #   l1 = log((e^a + 1 + e^2 + 1 + e^a) / e^a)  = 1.45457
    #   l2 = log((e^a + e^2 + 1 + 1 + e^a) / e^2)  = 0.86878
    #   l3 = log((e^2 + 2 e^a + 2 e^a) / e^a)      = 1.75724      mean = 1.36020
    loss = cont_steal_loss(S3, T3, 0.5)
    assert loss.item() == pytest.approx(1.36020, abs=1e-4)
    terms = cont_steal_terms(S3, T3, 0.5)
    torch.testing.assert_close(terms, torch.tensor([1.45457, 0.86878, 1.75724], dtype=torch.float64),
                               atol=1e-4, rtol=0)
    assert loss.item() == pytest.approx(_by_formula(S3, T3, 0.5), abs=1e-12)


@pytest.mark.parametrize("encoder,self_", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_switches_change_the_denominator_as_specified(encoder, self_, tau):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    got = cont_steal_loss(s, t, tau, use_encoder_negatives=encoder, use_self_negatives=self_).item()
    assert got == pytest.approx(_by_formula(s, t, tau, encoder, self_), abs=1e-10)


def test_switches_give_different_values_and_both_off_is_refused():
    full = cont_steal_loss(S3, T3, 0.5).item()
    no_self = cont_steal_loss(S3, T3, 0.5, use_self_negatives=False).item()
    no_enc = cont_steal_loss(S3, T3, 0.5, use_encoder_negatives=False).item()
    # each term only adds positive mass to the denominator: dropping one lowers the loss
    assert full > no_self > 0 and full > no_enc > 0
    with pytest.raises(ValueError, match="at least one negative"):
        cont_steal_loss(S3, T3, 0.5, use_encoder_negatives=False, use_self_negatives=False)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_perfect_alignment_with_orthogonal_others(tau):
    n = 4
    basis = torch.eye(n, 6, dtype=torch.float64)
    scale = torch.tensor([[0.5], [1.0], [2.0], [3.0]], dtype=torch.float64)  # lengths do not matter (cosine)
    aligned = cont_steal_loss(basis * scale, basis, tau).item()
    # every positive at cos 1, every negative at cos 0: l = log(1 + 2 (n - 1) e^{-1/tau})
    assert aligned == pytest.approx(math.log(1 + 2 * (n - 1) * math.exp(-1 / tau)), rel=1e-12)
    enc_only = cont_steal_loss(basis, basis, tau, use_self_negatives=False).item()
    assert enc_only == pytest.approx(math.log(1 + (n - 1) * math.exp(-1 / tau)), rel=1e-12)
    # anything misaligned is worse: permuted targets, random embeddings
    assert cont_steal_loss(basis, basis[[1, 2, 3, 0]], tau).item() > aligned
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        s = torch.randn(n, 6, generator=g, dtype=torch.float64)
        t = torch.randn(n, 6, generator=g, dtype=torch.float64)
        assert cont_steal_loss(s, t, tau).item() > aligned
        assert cont_steal_loss(s, t, tau).item() >= 0.0  # D-_encoder holds D+: l(i) >= 0 always


def test_gradient_reaches_only_the_surrogate():
    torch.manual_seed(0)
    target_encoder, surrogate = nn.Linear(8, 4), nn.Linear(8, 4)
    x1, x2 = torch.randn(6, 8), torch.randn(6, 8)
    with torch.no_grad():
        t = target_encoder(x2)
    cont_steal_loss(surrogate(x1), t).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in surrogate.parameters())
    assert all(p.grad is None for p in target_encoder.parameters())
    with pytest.raises(ValueError, match="t.requires_grad=True"):
        cont_steal_loss(surrogate(x1), target_encoder(x2))
    with pytest.raises(ValueError, match="t.requires_grad=True"):
        symmetric_ntxent(surrogate(x1), target_encoder(x2))


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_symmetric_variant_equals_lightly_ntxent(tau):
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    ours = symmetric_ntxent(s, t, tau)
    torch.testing.assert_close(ours, NTXentLoss(temperature=tau)(t, s), atol=1e-6, rtol=0)
    # it differs from the thesis formula (target-anchored rows, target-target negatives)
    assert abs(ours.item() - cont_steal_loss(s, t, tau).item()) > 1e-3


def test_temperature_changes_the_loss_and_small_tau_is_stable():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    values = [cont_steal_loss(s, t, tau).item() for tau in (0.05, 0.2, 0.5, 1.0)]
    assert len(set(round(v, 6) for v in values)) == 4
    # tau = 0.005 makes exp(sim / tau) up to e^200, past float32: log space keeps it finite and exact
    tiny = cont_steal_loss(s, t, 0.005)
    assert torch.isfinite(tiny)
    assert tiny.item() == pytest.approx(cont_steal_loss(s.double(), t.double(), 0.005).item(), rel=1e-4)
    assert torch.isfinite(symmetric_ntxent(s, t, 0.005))


def test_input_checks():
    with pytest.raises(ValueError, match="t shape="):
        cont_steal_loss(S3, T3[:2])
    with pytest.raises(ValueError, match="s shape="):
        cont_steal_loss(S3[0], T3[0])
    with pytest.raises(ValueError, match="temperature="):
        cont_steal_loss(S3, T3, 0.0)
