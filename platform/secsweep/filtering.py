"""Shared pieces of the data-filtering defenses (Spectral Signatures, Activation Clustering, ABL):
per-label representations of the training set, detection metrics against the true poisoned mask,
and retraining from scratch without the flagged samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .backdoor import DefenseConfig, Victim, build_victim_model, constant, fit, save_classifier
from .config import one_of
from .context import Context
from .names import AUC, FPR, TPR
from .poison import PoisonedSet
from .training import features

REPRESENTATIONS = ("last_block", "penultimate")
NUM_REMOVED = "num_removed"  # training samples the defense drops before retraining


@torch.no_grad()
def representations(model: nn.Module, images: torch.Tensor, device: torch.device, kind: str,
                    batch_size: int = 1024) -> torch.Tensor:
    """(N, D) CPU representations: "penultimate" = `model.features(x)`; "last_block" = the output of
    `model.attention_layers()[-1]` (the last stage before global pooling), flattened."""
    if kind == "penultimate":
        return features(model, images, device, batch_size=batch_size)
    one_of("representation", kind, REPRESENTATIONS)
    captured: list[torch.Tensor] = []
    hook = model.attention_layers()[-1].register_forward_hook(
        lambda module, inputs, output: captured.append(output.detach().flatten(1).cpu()))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size].to(device))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured) if captured else torch.empty(0)


def per_label_representations(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                              kind: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(indices, representations) of one label at a time: both defenses analyse labels separately,
    and an unpooled map is large (Fashion-MNIST/smallcnn: 3136 values a sample; CIFAR-10/PreAct-ResNet18:
    8192), so only one label's representations are held at once."""
    for cls in torch.unique(labels):
        idx = (labels == cls).nonzero(as_tuple=True)[0]
        yield idx, representations(model, images[idx], device, kind)


def detection_metrics(scores: torch.Tensor, flagged: torch.Tensor, poisoned: torch.Tensor) -> dict[str, float]:
    """AUC of `scores` (higher = more suspicious) and TPR/FPR of the `flagged` mask against the
    ground-truth `poisoned` mask (AUC 0.5 and the rate 0.0 where a group is empty)."""
    poisoned = poisoned.bool().cpu()
    flagged = flagged.bool().cpu()
    n_pos, n_neg = int(poisoned.sum()), int((~poisoned).sum())
    scores = scores.detach().cpu().to(torch.float64)
    from sklearn.metrics import roc_auc_score  # lazy: importing scikit-learn costs 1-3 s per process

    auc = roc_auc_score(poisoned.numpy(), scores.numpy()) if n_pos and n_neg else 0.5
    return {
        AUC: float(auc),
        TPR: float((flagged & poisoned).sum()) / n_pos if n_pos else 0.0,
        FPR: float((flagged & ~poisoned).sum()) / n_neg if n_neg else 0.0,
    }


def retrain_without(cfg: DefenseConfig, ctx: Context, victim: Victim, pset: PoisonedSet, keep: torch.Tensor,
                    extra: Mapping[str, float]) -> nn.Module:
    """Train a fresh victim model from scratch on `pset[keep]` with the victim's recipe for
    `cfg.epochs`, reporting asr/clean_acc and `extra` every epoch; save it as the output `model`."""
    torch.manual_seed(cfg.seed)  # the same initialisation as the backdoored model (train_backdoored)
    model = build_victim_model(cfg, victim.train)
    model = fit(model, pset.images[keep], pset.labels[keep], ctx, epochs=cfg.epochs,
                batch_size=cfg.attack_batch_size, seed=cfg.seed, lr_at=constant(cfg.attack_lr),
                momentum=cfg.attack_momentum, weight_decay=cfg.attack_weight_decay,
                evaluate=victim.evaluate, extra=extra, transform=cfg.train_transform())
    save_classifier(ctx, model, cfg)
    return model
