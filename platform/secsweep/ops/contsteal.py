"""Cont-Steal's contrastive stealing loss (Sha et al., "Can't steal? Cont-Steal!", CVPR 2023; thesis
ch. 4, T-Eq 4.3-4.7; docs/methods.md, Cont-Steal).

For a batch of N images, two RandAugment views each: s_i = E_S(x~_{i,s}) (surrogate encoder, trained)
and t_i = E_T(x~_{i,t}) (the target's answers, fixed), sim(u, v) = u.v / (|u| |v|), temperature tau:

    D+(i)          = exp(sim(s_i, t_i) / tau)
    D-_encoder(i)  = sum_{k=1..N}       exp(sim(s_i, t_k) / tau)      k = i INCLUDED (as written)
    D-_self(i)     = sum_{k=1..N, k!=i} exp(sim(s_i, s_k) / tau)
    l(i)           = -log( D+(i) / (D-_encoder(i) + D-_self(i)) )
    L              = (1/N) sum_i l(i)

Anchors are surrogate embeddings only; there are no target-target terms. Because D-_encoder holds
D+ itself, l(i) >= 0 and L -> 0 only when every positive dominates every negative.

Ablation switches (T-Tab 4.3): `use_encoder_negatives=False` drops the target negatives
(k != i) from the denominator but keeps D+ there, so l(i) = -log(D+ / (D+ + D-_self)) stays a
proper contrastive (softmax) loss bounded below by 0; dropping D+ as well would give
-log(D+ / D-_self), unbounded below (the surrogate could win by only pushing its own embeddings
apart). `use_self_negatives=False` drops D-_self. At least one negative term must stay on (with
both off the denominator is D+ alone and l(i) = 0 for any embeddings).

`symmetric_ntxent` is the released code's variant: NT-Xent (SimCLR's loss) over the 2N embeddings
[t; s]: a (2N x 2N) cosine-similarity matrix over tau, each row's own entry removed, row i's positive
its other view, mean cross-entropy over all 2N rows. It adds target-anchored rows and target-target
negatives to the thesis formula (the target-target terms carry no gradient but change the value).
It equals `lightly.loss.NTXentLoss(temperature=tau)(t, s)` (tests/test_ops_contsteal.py checks it).

Temperature default: tau = 0.5, the released code's default; the thesis never states tau (it is the
sweep's headline dimension, docs/methods.md).

Everything is computed in log space (`logsumexp`), so small tau does not overflow. The target's
embeddings are constants (the target is a black box behind an oracle): a `t` that requires grad is
refused, so gradient reaches the surrogate's `s` only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["TEMPERATURE", "cont_steal_loss", "cont_steal_terms", "symmetric_ntxent"]

TEMPERATURE = 0.5  # tau: the released code's default; the thesis does not state it (docs/methods.md)


def _check(s: torch.Tensor, t: torch.Tensor, temperature: float) -> None:
    for name, z in (("s", s), ("t", t)):
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] == 0:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"{name} shape={shape}: must be a non-empty (N, D) embedding tensor")
    if s.shape != t.shape:
        raise ValueError(f"t shape={tuple(t.shape)}: must equal s shape={tuple(s.shape)} (row i of both "
                         "embeds two views of image i)")
    if t.requires_grad:
        raise ValueError("t.requires_grad=True: the target encoder is a fixed black box; pass its "
                         "answers computed under torch.no_grad() or .detach()ed")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature!r}: must be a finite number > 0")


def cont_steal_terms(s: torch.Tensor, t: torch.Tensor, temperature: float = TEMPERATURE, *,
                     use_encoder_negatives: bool = True, use_self_negatives: bool = True) -> torch.Tensor:
    """Per-anchor losses l(i), shape (N,); see the module docstring for the formula and switches."""
    _check(s, t, temperature)
    if not (use_encoder_negatives or use_self_negatives):
        raise ValueError("use_encoder_negatives=False, use_self_negatives=False: at least one negative "
                         "term must stay on (with none the loss is 0 for any embeddings)")
    n = s.shape[0]
    sn, tn = F.normalize(s, dim=1), F.normalize(t, dim=1)
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    st = sn @ tn.T / temperature                    # [i, k] = sim(s_i, t_k) / tau
    pos = st.diagonal()                             # log D+(i)
    parts = [st if use_encoder_negatives else pos.unsqueeze(1)]   # D-_encoder includes k = i, else D+ alone
    if use_self_negatives:
        ss = (sn @ sn.T / temperature).masked_fill(eye, float("-inf"))  # k != i
        parts.append(ss)
    log_denominator = torch.logsumexp(torch.cat(parts, dim=1), dim=1)
    return log_denominator - pos


def cont_steal_loss(s: torch.Tensor, t: torch.Tensor, temperature: float = TEMPERATURE, *,
                    use_encoder_negatives: bool = True, use_self_negatives: bool = True) -> torch.Tensor:
    """L_Cont-Steal = mean_i l(i) (T-Eq 4.7), a scalar carrying the gradient to `s`.

    Args:
        s: (N, D) surrogate embeddings E_S(x~_{i,s}) (require grad while training).
        t: (N, D) target embeddings E_T(x~_{i,t}) of the other views, constants.
        temperature: tau > 0.
        use_encoder_negatives, use_self_negatives: the T-Tab 4.3 ablation switches.
    """
    return cont_steal_terms(s, t, temperature, use_encoder_negatives=use_encoder_negatives,
                            use_self_negatives=use_self_negatives).mean()


def symmetric_ntxent(s: torch.Tensor, t: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """The released code's loss: NT-Xent over z = [t; s] (2N rows), positives (t_i, s_i), every other
    non-self entry a negative, mean over all 2N anchors:

        l(a) = -log( exp(sim(z_a, z_pos(a)) / tau) / sum_{b != a} exp(sim(z_a, z_b) / tau) )
    """
    _check(s, t, temperature)
    n = s.shape[0]
    z = F.normalize(torch.cat([t, s], dim=0), dim=1)
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device),
                                                 float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, positive)
