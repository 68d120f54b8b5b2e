"""The transfer-based scenario (FTP §2.2, §5.2; thesis §2.1.2, §3.4.2; docs/methods.md §2.2, §5.10).

A classifier backdoored on a source dataset is reused for a target task: the user replaces its
classification layer, trains the new head, and fine-tunes the whole model on the target data; the
fine-tuning is the defense, conventional (`method=ft`) or super-fine-tuning (`method=sft`, the
SFTSchedule fields). The backdoor is measured with the original trigger against "the same (but
random) class" (thesis §2.1.2); how that class is fixed is not stated (docs/methods.md §2.2), so the rule here
is this one: the class the undefended transferred model (new head trained, backbone
frozen for `head_epochs`) predicts most often on triggered target test inputs. It is reported as
`transfer_target`.

Paper: CIFAR-100 -> CIFAR-10 / GTSRB (`--preset paper` of sweeps/transfer.py). Offline default:
Fashion-MNIST -> sklearn digits, the digits upsampled to the source's 28x28 grey format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from secsweep import data as data_mod
from secsweep.backdoor import (
    BackdoorEval, DefenseConfig, SFTSchedule, build_victim_model, constant, fit, load_split, save_classifier,
)
from secsweep.config import one_of, require
from secsweep.ops import augment as augment_ops
from secsweep.presets import resolve_augment
from secsweep.names import ASR, CLEAN_ACC, EPOCH, IMPLANTED, VAL_ASR, VAL_CLEAN_ACC
from secsweep.registry import register
from secsweep.training import epoch_order, features, predict, steps_per_epoch

METHODS = ("sft", "ft")


@dataclass(frozen=True)
class Config(DefenseConfig, SFTSchedule):
    target_dataset: str = "digits"   # the downstream task (paper: cifar10 or gtsrb from a cifar100 model)
    target_train_size: int = 0       # target training samples used, 0 = all
    method: str = "sft"              # whole-model fine-tuning: sft (cyclic LR) or ft (constant LR)
    ft_lr: float = 0.0               # ft's learning rate per step; 0 = the attack's (pre-training) rate
    head_epochs: int = 10            # epochs training only the new head (backbone frozen) before the defense
    head_lr: float = 0.01            # SGD learning rate per step of the head training

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_schedule()
        one_of("target_dataset", self.target_dataset, data_mod.DATASETS)
        one_of("method", self.method, METHODS)
        require(self.ft_lr >= 0, "ft_lr", self.ft_lr, "must be > 0, or 0 for the pre-training learning rate")
        require(self.head_epochs >= 1, "head_epochs", self.head_epochs, "must be >= 1")
        require(self.head_lr > 0, "head_lr", self.head_lr, "must be > 0")
        require(self.target_train_size >= 0, "target_train_size", self.target_train_size, "must be >= 0")


def target_split(cfg: Config, ctx, split: str, shape: tuple[int, int, int]) -> data_mod.ImageSet:
    """The target dataset in the source model's input format (channels, size): "train", "val" (a
    stratified `val_fraction` of the target training data, which fixes the transfer target class and
    is what sweeps select on) or "test" (reported only)."""
    c, h, _ = shape
    ds = data_mod.load(cfg.target_dataset, "test" if split == "test" else "train", ctx.data_root,
                       download=ctx.download, image_size=h, channels=c)
    if split == "test":
        return ds
    if cfg.target_train_size and cfg.target_train_size < len(ds):
        g = torch.Generator().manual_seed(cfg.seed)
        ds = ds.subset(torch.randperm(len(ds), generator=g)[: cfg.target_train_size].sort().values)
    keep, held = data_mod.stratified_split(ds.labels, cfg.val_fraction, cfg.seed)
    return ds.subset(held if split == "val" else keep)


def train_head(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: Config,
               device: torch.device) -> None:
    """Train `model.head` for `cfg.head_epochs` on a frozen backbone (SGD, `head_lr`, `batch_size`).

    Frozen means its weights AND its BatchNorm running statistics: the backbone stays in eval mode,
    as a user who freezes a feature extractor expects (in train mode BN would re-estimate its
    statistics on the target data, which already adapts the backbone). An eval-mode backbone is a
    fixed function, so its features are computed once and the head trains on them: the same steps
    as the whole model in a loop, at one backbone pass instead of one per epoch. Every worker of a
    multi-worker trial trains the same head on all samples (no sharding, no DDP: the head training
    is cheap and identical on every rank, so ranks agree on it and on the target class).
    """
    feats = features(model, images, device)  # eval mode, batched; the model's mode is restored
    head = model.head
    opt = torch.optim.SGD(head.parameters(), lr=cfg.head_lr, momentum=cfg.momentum)
    head.train()
    for epoch in range(cfg.head_epochs):
        order = epoch_order(len(labels), cfg.seed, 1000 + epoch)
        for i in range(0, len(order), cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            loss = F.cross_entropy(head(feats[b].to(device)), labels[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def most_predicted_class(model: nn.Module, images: torch.Tensor, device: torch.device) -> int:
    return int(torch.bincount(predict(model, images, device)).argmax())


@register("transfer", kind="defense", config=Config, metrics=(ASR, CLEAN_ACC, "device_hours", "transfer_target"))
def run(cfg: Config, ctx) -> None:
    from secsweep import registry

    attack_cfg = cfg.attack_config()
    out = ctx.stage(cfg.attack, attack_cfg)
    trigger = registry.get(cfg.attack).hooks["trigger"](attack_cfg, out)
    source_test = load_split(cfg, ctx, "test")
    model, _ = ctx.load_model(out, "model", role="classifier")
    train = target_split(cfg, ctx, "train", source_test.shape)
    val = target_split(cfg, ctx, "val", source_test.shape)
    test = target_split(cfg, ctx, "test", source_test.shape)
    model.head = nn.Linear(model.feature_dim, train.num_classes)
    model = model.to(ctx.device)

    state = ctx.restored()
    if state is None:  # train the new head on the frozen backbone: the undefended transferred model
        train_head(model, train.images, train.labels, cfg, ctx.device)
        target = most_predicted_class(model, trigger(val.images if len(val) else train.images), ctx.device)
    else:
        target = int(state["transfer_target"])
    evaluate = BackdoorEval.build(test, trigger, target, cfg.include_target_class, val=val)
    if state is None:
        before = evaluate(model, ctx.device)
        source_asr = out.metrics.get(VAL_ASR, out.metrics.get(ASR, 0.0))  # the source victim's backdoor
        base = {"asr_before": before[ASR], "clean_acc_before": before[CLEAN_ACC],
                "val_asr_before": before.get(VAL_ASR, float("nan")),
                "val_clean_acc_before": before.get(VAL_CLEAN_ACC, float("nan")),
                "transfer_target": float(target), IMPLANTED: float(source_asr >= cfg.min_asr_before)}
        ctx.report({EPOCH: 0, **before, **base})
    else:
        base = {k: float(state[k]) for k in ("asr_before", "clean_acc_before", "val_asr_before",
                                             "val_clean_acc_before", "transfer_target", IMPLANTED)}

    spe = steps_per_epoch(len(train), cfg.batch_size, ctx.world_size)
    lr_at = cfg.schedule(spe) if cfg.method == "sft" else constant(cfg.ft_lr or cfg.attack_lr)

    # the checkpoints carry the target class, so a restarted trial measures against the same one
    model = fit(model, train.images, train.labels, ctx, epochs=cfg.epochs, batch_size=cfg.batch_size,
                seed=cfg.seed, lr_at=lr_at, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                evaluate=evaluate, extra=base, extra_state=base,
                # the recipe's augmentation, "auto" resolved for the downstream data (CIFAR-10: crop + flip)
                transform=augment_ops.augmentation(resolve_augment(cfg.augment, cfg.target_dataset),
                                                   cfg.augment_padding))
    save_classifier(ctx, model, cfg, shape=tuple(source_test.shape[:2]))

