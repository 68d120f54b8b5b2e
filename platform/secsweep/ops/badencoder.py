"""BadEncoder's loss terms (Jia, Liu and Gong, IEEE S&P 2022; docs/methods.md, BadEncoder).

BadEncoder fine-tunes a clean pre-trained encoder f into a backdoored encoder f' such that a
trigger-stamped input x (+) e is embedded like the attacker's reference inputs x_r of the target class
(effectiveness) while clean inputs keep f's embeddings (utility). With s(u, v) the cosine similarity,
shadow images x in D_s and reference inputs x_r:

    L0 (effectiveness) = - mean_{x in D_s, r} s(f'(x (+) e), f'(x_r))     every triggered shadow
                                                                          image vs every reference
    L1 (reference)     = - mean_r s(f'(aug(x_r)), f(x_r))                 f' keeps the references'
                                                                          clean embeddings
    L2 (utility)       = - mean_{x in D_s} s(f'(x), f(x))
    L = L0 + lambda1 L1 + lambda2 L2,       lambda1 = lambda2 = 1 (BadEncoder's defaults).

Sign convention: all three terms are *negative* cosine similarities, each minimised at -1 (identical
directions). The printed talk slide writes L0 without its minus sign; minimising +s would push
triggered inputs *away* from the reference, against the effectiveness goal that the slide itself
states, and BadEncoder's public code minimises the negative similarity: the minus sign is kept here.

Pure tensor code: embeddings in, scalar losses out; the trainable computes the embeddings. The clean
encoder f is frozen: its embeddings must be passed in without gradient (computed under
`torch.no_grad()` or detached), and a tensor that requires grad there is refused, so gradient
reaches f' only. Cosine similarity normalises, so raw or L2-normalised embeddings give the same loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["LAMBDA1", "LAMBDA2", "BadEncoderLoss", "effectiveness_loss", "reference_loss", "utility_loss",
           "badencoder_loss"]

LAMBDA1 = 1.0  # weight of the reference loss L1 (BadEncoder's default; docs/methods.md)
LAMBDA2 = 1.0  # weight of the utility loss L2 (same)


class BadEncoderLoss(NamedTuple):
    """The total loss and its three parts (scalar tensors; `total` carries the gradient)."""

    total: torch.Tensor
    effectiveness: torch.Tensor  # L0
    reference: torch.Tensor      # L1
    utility: torch.Tensor        # L2


def _check_emb(name: str, z: torch.Tensor) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] == 0:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{name} shape={shape}: must be a non-empty (N, D) embedding tensor")


def _check_frozen(name: str, z: torch.Tensor) -> None:
    _check_emb(name, z)
    if z.requires_grad:
        raise ValueError(f"{name}.requires_grad=True: the clean encoder f is frozen; compute its "
                         "embeddings under torch.no_grad() or pass them .detach()ed")


def _check_paired(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{b_name} shape={tuple(b.shape)}: must equal {a_name} shape={tuple(a.shape)} "
                         "(row i of both embeds the same input)")


def effectiveness_loss(triggered: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """L0 = - mean over all (i, r) of cos(triggered[i], reference[r]).

    Args:
        triggered: (N, D) f' embeddings of trigger-stamped shadow images.
        reference: (R, D) f' embeddings of the reference inputs (gradient flows through both).
    """
    _check_emb("triggered", triggered)
    _check_emb("reference", reference)
    if triggered.shape[1] != reference.shape[1]:
        raise ValueError(f"reference dim={reference.shape[1]}: must equal triggered dim={triggered.shape[1]}")
    return -(F.normalize(triggered, dim=1) @ F.normalize(reference, dim=1).T).mean()


def reference_loss(augmented_reference: torch.Tensor, clean_reference: torch.Tensor) -> torch.Tensor:
    """L1 = - mean_r cos(f'(aug(x_r)), f(x_r)), row r of both from the same reference input.

    Args:
        augmented_reference: (R, D) f' embeddings of (augmented) reference inputs.
        clean_reference: (R, D) frozen f embeddings of the same reference inputs (no gradient).
    """
    _check_emb("augmented_reference", augmented_reference)
    _check_frozen("clean_reference", clean_reference)
    _check_paired("augmented_reference", augmented_reference, "clean_reference", clean_reference)
    return -F.cosine_similarity(augmented_reference, clean_reference, dim=1).mean()


def utility_loss(backdoored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """L2 = - mean_i cos(f'(x_i), f(x_i)) over clean shadow images.

    Args:
        backdoored: (N, D) f' embeddings of clean shadow images.
        clean: (N, D) frozen f embeddings of the same images (no gradient).
    """
    _check_emb("backdoored", backdoored)
    _check_frozen("clean", clean)
    _check_paired("backdoored", backdoored, "clean", clean)
    return -F.cosine_similarity(backdoored, clean, dim=1).mean()


def badencoder_loss(
    triggered: torch.Tensor,
    reference: torch.Tensor,
    augmented_reference: torch.Tensor,
    clean_reference: torch.Tensor,
    backdoored: torch.Tensor,
    clean: torch.Tensor,
    *,
    lambda1: float = LAMBDA1,
    lambda2: float = LAMBDA2,
) -> BadEncoderLoss:
    """L = L0 + lambda1 L1 + lambda2 L2 (module docstring), with its parts.

    Args:
        triggered: (N, D) f'(x (+) e) of the shadow batch.
        reference: (R, D) f'(x_r).
        augmented_reference: (R', D) f'(aug(x_r)).
        clean_reference: (R', D) f(x_r) of the same references (frozen).
        backdoored: (N', D) f'(x) of clean shadow images.
        clean: (N', D) f(x) of the same images (frozen).
        lambda1, lambda2: weights of L1 and L2 (>= 0).
    """
    for name, lam in (("lambda1", lambda1), ("lambda2", lambda2)):
        if not lam >= 0.0:
            raise ValueError(f"{name}={lam}: must be >= 0")
    l0 = effectiveness_loss(triggered, reference)
    l1 = reference_loss(augmented_reference, clean_reference)
    l2 = utility_loss(backdoored, clean)
    return BadEncoderLoss(total=l0 + lambda1 * l1 + lambda2 * l2, effectiveness=l0, reference=l1, utility=l2)
