"""Fine-Pruning, FP (Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring
Attacks on Deep Neural Networks", RAID 2018), a baseline defense of the FTP paper (docs/methods.md §5.4:
"prune low-influence neurons, then fine-tune"; all its hyperparameters are not stated there,
BackdoorBench defaults implied).

1. Rank the channels of the last convolutional layer by their mean activation on held-out clean
   data (Liu et al.: the defender's validation set). The activation of channel c is the c-th entry
   of ``model.features(x)``, the globally pooled output of the last conv layer after its BN and
   ReLU (models.py: ``last_conv.out_channels == feature_dim``). The raw ``last_conv`` output is not
   used: it precedes BN (smallcnn) or the residual sum (preact_resnet18), so a zero there does not
   silence the channel.
2. Prune channels in increasing order of activation (the most dormant first), one at a time,
   while the validation accuracy stays within ``acc_ratio`` (relative) of the unpruned model's and
   at most ``max_prune_ratio`` of the channels are gone. A pruned channel is removed by zeroing
   its input column of the head's first Linear layer (the head itself when it is one; a BatchNorm1d
   before it is per feature, so the column is the channel's only way in) and masking that layer's
   input during fine-tuning, which cuts
   the channel out of the prediction completely (as BackdoorBench's FP does; for preact_resnet18
   masking ``last_conv`` would silence only the residual branch). Pruning only touches the head,
   so the features are computed once and every pruning step costs a matrix product.
3. Fine-tune the pruned model on the defender's clean data (``clean_fraction``, validation part
   included) for ``epochs`` at the constant learning rate ``lr``. The masked columns get zero
   gradient and zero weight decay, so they stay exactly zero, and the saved weights are a plain
   state_dict that a standard model of the same architecture loads.

Defaults and where they come from:

* ``acc_ratio`` 0.1: BackdoorBench's FP ``acc_ratio: 0.1`` (pruning stops once the clean accuracy
  falls by 10 % relative to the unpruned model). Liu et al. stop at a pre-set accuracy drop on
  validation data too; BackdoorBench measures it on the clean test set, here it is measured on a
  held-out part of the defender's data (no test-set leakage).
* ``max_prune_ratio`` 0.8: a secsweep safety cap (not a paper value): never prune more than 80 % of
  the channels even if the accuracy criterion allows it. 1.0 disables the cap.
* ``prune_holdout`` 0.1: fraction of the defender's clean data held out to rank channels and to
  measure the accuracy drop while pruning (Liu et al.: a validation set, size not stated). It is
  separate from the sweep's validation split (`val_fraction`), which only scores the defended model.
* ``lr`` 0.01: BackdoorBench's FP fine-tuning learning rate (``lr: 0.01``, there with cosine
  annealing over 100 epochs; constant here so sweeps control it directly). Liu et al.: not stated.
* ``epochs``, ``batch_size``, ``momentum``, ``weight_decay``, ``clean_fraction``: DefenseConfig's
  CPU-sized defaults (BackdoorBench: 100 epochs, batch 256, momentum 0.9, weight decay 5e-4, 5 %
  clean data).

Reports: epoch 0 = the backdoored model; then every fine-tuning epoch, carrying ``asr_before`` /
``clean_acc_before`` and the pruning result: ``fp_pruned_fraction`` (pruned channels / channels),
``fp_pruned_channels``, ``fp_val_acc_before`` / ``fp_val_acc_pruned`` (validation accuracy before
and after pruning), ``asr_pruned`` / ``clean_acc_pruned`` (test metrics after pruning, before
fine-tuning). A restart recomputes the (deterministic, cheap) pruning and resumes fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from secsweep.backdoor import DefenseConfig, clean_subset, constant, fit, load_victim, report_before, save_classifier
from secsweep.config import in_half_open_unit, in_open_unit, positive
from secsweep.data import ImageSet
from secsweep.names import ASR, CLEAN_ACC, DEVICE_HOURS
from secsweep.ops.metrics import accuracy
from secsweep.registry import register
from secsweep.training import features

PRUNED_FRACTION = "fp_pruned_fraction"


@dataclass(frozen=True)
class Config(DefenseConfig):
    lr: float = 0.01              # fine-tuning learning rate per step, constant (BackdoorBench FP: 0.01)
    acc_ratio: float = 0.1        # stop pruning at this relative validation-accuracy drop (BackdoorBench FP: 0.1)
    max_prune_ratio: float = 0.8  # most channels of the last conv layer pruned, fraction (secsweep cap)
    prune_holdout: float = 0.1    # fraction of the defender's clean data held out for pruning (not stated)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("lr", self.lr)
        in_open_unit("acc_ratio", self.acc_ratio)
        in_half_open_unit("max_prune_ratio", self.max_prune_ratio)
        in_open_unit("prune_holdout", self.prune_holdout)


def held_out(data: ImageSet, fraction: float, seed: int) -> ImageSet:
    """A seeded `fraction` (at least one sample) of the defender's clean data for pruning decisions."""
    g = torch.Generator().manual_seed(seed + 3)
    n = max(1, round(fraction * len(data)))
    return data.subset(torch.randperm(len(data), generator=g)[:n].sort().values)


@torch.no_grad()
def prune_channels(model: nn.Module, val: ImageSet, device: torch.device, *, acc_ratio: float,
                   max_prune_ratio: float) -> tuple[torch.Tensor, float, float]:
    """Channels to prune (most dormant first) so the validation accuracy drops by at most
    `acc_ratio` relative to the unpruned model, and at most `max_prune_ratio` of them.

    Returns (pruned channel indices, validation accuracy before, validation accuracy after pruning).
    """
    feats = features(model, val.images, device).to(device)  # (n, D), eval mode
    order = feats.mean(dim=0).argsort()                       # increasing mean activation
    head = model.head
    labels = val.labels.to(device)
    acc_before = accuracy(head(feats).argmax(1), labels)
    mask = torch.ones(feats.shape[1], device=device)
    hook = input_linear(head).register_forward_pre_hook(lambda module, args: (args[0] * mask,))
    kept, acc_kept = 0, acc_before
    try:
        for k in range(1, int(max_prune_ratio * feats.shape[1]) + 1):
            mask[order[k - 1]] = 0.0
            acc = accuracy(head(feats).argmax(1), labels)
            if acc_before - acc > acc_ratio * acc_before:
                break
            kept, acc_kept = k, acc
    finally:
        hook.remove()
    return order[:kept].cpu(), acc_before, acc_kept


def input_linear(head: nn.Module) -> nn.Linear:
    """The head's first Linear layer, which reads the features (the head itself when it is one).

    A downstream head may put a BatchNorm1d (per feature, so channel c stays channel c) or nothing
    before an MLP; cutting a channel means cutting its column in this layer's weight and its input
    here, not the head's input (a BatchNorm would map a zeroed feature to its bias)."""
    first = next((m for m in head.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise TypeError(f"fine-pruning needs a head with a Linear layer; got {type(head).__name__}")
    return first


def apply_pruning(model: nn.Module, pruned: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    """Zero the head's input columns of `pruned` channels and mask the head's input so they stay cut
    during fine-tuning. Returns the hook handle (remove it before handing the model on)."""
    layer = input_linear(model.head)
    mask = torch.ones(layer.in_features, device=layer.weight.device, dtype=layer.weight.dtype)
    mask[pruned.to(mask.device)] = 0.0
    with torch.no_grad():
        layer.weight.mul_(mask)
    return layer.register_forward_pre_hook(lambda module, args: (args[0] * mask,))


@register("fp", kind="defense", config=Config, metrics=(ASR, CLEAN_ACC, DEVICE_HOURS, PRUNED_FRACTION))
def run(cfg: Config, ctx) -> None:
    victim = load_victim(cfg, ctx)
    data = clean_subset(victim.train, cfg.clean_fraction, cfg.seed)
    base = report_before(victim, ctx)
    model = victim.model
    pruned, val_before, val_pruned = prune_channels(
        model, held_out(data, cfg.prune_holdout, cfg.seed), ctx.device,
        acc_ratio=cfg.acc_ratio, max_prune_ratio=cfg.max_prune_ratio)
    hook = apply_pruning(model, pruned)
    after = victim.evaluate(model, ctx.device)
    extra = {
        **base,
        PRUNED_FRACTION: len(pruned) / input_linear(model.head).in_features,
        "fp_pruned_channels": float(len(pruned)),
        "fp_val_acc_before": val_before,
        "fp_val_acc_pruned": val_pruned,
        "asr_pruned": after[ASR],
        "clean_acc_pruned": after[CLEAN_ACC],
    }
    model = fit(model, data.images, data.labels, ctx, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                lr_at=constant(cfg.lr), momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                evaluate=victim.evaluate, extra=extra, transform=cfg.train_transform())
    hook.remove()  # the zeroed head columns alone keep the channels pruned in the saved weights
    save_classifier(ctx, model, cfg)
