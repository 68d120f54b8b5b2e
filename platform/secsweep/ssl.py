"""Self-supervised pre-training of encoders, shared by SimCLR, MoCo, BYOL and SimSiam
(docs/methods.md, "Self-supervised encoders").

A method is a file in `trainables/encoders/` that builds an `SSLModel` (the backbone plus its heads
and targets) and a step (the loss of one batch of unlabelled images); `pretrain` does the rest:

* data: the pre-training set's training split without labels (a seeded `train_size` subset; the
  labels are used only by the monitors), augmented on the device into two views
  (`secsweep.ops.ssl.two_views`);
* the training loop (`secsweep.loop.fit`) with the method's optimizer and a per-step schedule;
* monitors after every epoch: the weighted kNN accuracy (`secsweep.ops.ssl.knn_accuracy`; bank =
  a labelled sample of the training split, queries = the validation and test splits), and after
  the last epoch a linear probe (`secsweep.ops.ssl.linear_probe`) trained on the bank's features;
* the output: the backbone as the model artifact `encoder` (role encoder, `ctx.load_model`).

Validation metrics (`val_knn_acc`, `val_linear_acc`) are what sweeps select on; the test metrics
(`knn_acc`, `linear_acc`) are reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import data as data_mod
from . import models as models_mod
from .artifacts import InputContract
from .config import in_half_open_unit, one_of, positive, require
from .context import Context
from .loop import OPTIMIZERS, SCHEDULES, fit, lr_schedule
from .names import DEVICE_HOURS
from .ops import ssl as ssl_ops
from .training import features, steps_per_epoch

KNN_ACC, VAL_KNN_ACC = "knn_acc", "val_knn_acc"
LINEAR_ACC, VAL_LINEAR_ACC = "linear_acc", "val_linear_acc"
METRICS = (KNN_ACC, VAL_KNN_ACC, LINEAR_ACC, VAL_LINEAR_ACC, DEVICE_HOURS)


@dataclass(frozen=True)
class SSLConfig:
    """What every self-supervised pre-training shares. CPU-sized defaults; `--preset paper` gives
    the documents' recipe (ResNet-18 on CIFAR-10; docs/paper_preset.md)."""

    dataset: str = "fashion_mnist"   # pre-training data (labels only feed the kNN / linear monitors)
    model: str = "smallcnn"          # backbone: an image model without its head (secsweep.models)
    train_size: int = 10000          # pre-training images, 0 = the whole training split
    image_size: int = 0              # pixels per side, 0 = native
    channels: int = 0                # 0 = native
    epochs: int = 5                  # pre-training epochs (lightly's CIFAR-10 kNN figures: 200)
    batch_size: int = 256            # images per step (two views each); SimCLR's loss gets 2N-2 negatives
    optimizer: str = "adam"          # sgd, adam, adamw, lars (FTP §4.4 pre-trains its SimCLR with Adam)
    lr: float = 1e-3                 # peak learning rate per step (FTP §4.4: 3e-4 at batch 256, 1,000 epochs)
    momentum: float = 0.9            # SGD / LARS momentum
    weight_decay: float = 1e-6       # L2 weight decay (FTP: not stated)
    schedule: str = "cosine"         # constant, cosine, warmup_cosine (per step)
    warmup_epochs: float = 0.0       # linear warm-up (warmup_cosine)
    proj_hidden_dim: int = 512       # projection head's hidden width (not stated in the documents)
    proj_dim: int = 128              # projection output width (SimCLR: 128)
    crop_min: float = 0.2            # smallest area fraction of the random resized crop (lightly CIFAR-10: 0.2)
    jitter: float = 0.4              # colour-jitter strength (SimCLR CIFAR-10: 0.4 = 0.8 x 0.5)
    knn_k: int = 200                 # neighbours of the kNN monitor (lightly benchmarks: 200)
    knn_temperature: float = 0.1     # kNN vote temperature (lightly benchmarks: 0.1)
    monitor_size: int = 2000         # labelled training images in the kNN bank / linear-probe set
    val_fraction: float = 0.1        # fraction of the training split held out as validation queries
    seed: int = 0

    def __post_init__(self) -> None:
        one_of("dataset", self.dataset, data_mod.DATASETS)
        one_of("model", self.model, models_mod.encoder_names())
        require(self.train_size >= 0, "train_size", self.train_size, "must be >= 0 (0 = all)")
        require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        require(self.batch_size >= 2, "batch_size", self.batch_size, "must be >= 2 (contrastive losses need negatives)")
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        one_of("schedule", self.schedule, SCHEDULES)
        positive("lr", self.lr)
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        require(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "must be >= 0")
        positive("proj_hidden_dim", self.proj_hidden_dim)
        positive("proj_dim", self.proj_dim)
        in_half_open_unit("crop_min", self.crop_min)
        require(0.0 <= self.jitter <= 1.0, "jitter", self.jitter, "must be in [0, 1]")
        positive("knn_k", self.knn_k)
        positive("knn_temperature", self.knn_temperature)
        positive("monitor_size", self.monitor_size)
        require(0.0 < self.val_fraction <= 0.5, "val_fraction", self.val_fraction, "must be in (0, 0.5]")

    def views(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The two augmented views of a batch (on its device)."""
        return ssl_ops.two_views(x, gen, crop_scale=(self.crop_min, 1.0), jitter=self.jitter)


def backbone(cfg: Any, shape: tuple[int, int, int]) -> tuple[nn.Module, dict[str, Any]]:
    """The encoder of `cfg.model` for images of `shape` (C, H, W), and its artifact arguments.

    Seeds torch with `cfg.seed` first, so the backbone and the heads a method builds right after
    it start from the same weights in every run (and a resumed run's first epoch equals an
    uninterrupted one's)."""
    c, h, _ = shape
    args = {"num_classes": 0, "in_channels": int(c), "image_size": int(h)}
    torch.manual_seed(cfg.seed)
    return models_mod.build(cfg.model, args), args


@dataclass
class Splits:
    """The pre-training data: unlabelled training images, and the labelled monitor sets."""

    train: data_mod.ImageSet
    bank: data_mod.ImageSet
    val: data_mod.ImageSet
    test: data_mod.ImageSet


def load_splits(cfg: Any, ctx: Context) -> Splits:
    """Training split (seeded `train_size` subset), its stratified validation hold-out, the test
    split, and a `monitor_size` labelled sample of the training images as the monitors' bank."""
    from .backdoor import load_split  # the same split logic as every other recipe

    train, val, test = (load_split(cfg, ctx, s) for s in ("train", "val", "test"))
    g = torch.Generator().manual_seed(cfg.seed + 7)
    bank = train.subset(torch.randperm(len(train), generator=g)[: cfg.monitor_size].sort().values)
    cap = max(cfg.monitor_size, 1)
    test = test.subset(torch.arange(min(len(test), cap)))
    val = val.subset(torch.arange(min(len(val), cap)))
    return Splits(train, bank, val, test)


def monitors(cfg: Any, splits: Splits, encoder_of: Callable[[nn.Module], nn.Module]):
    """(every-epoch kNN monitor, final linear probe) as `fit` evaluators of the SSL model."""
    n_classes = splits.bank.num_classes

    def feats(model, device):
        enc = encoder_of(model)
        return [features_of(enc, s.images, device) for s in (splits.bank, splits.val, splits.test)]

    def knn(model, device):
        bank, val, test = feats(model, device)
        kw = dict(k=cfg.knn_k, temperature=cfg.knn_temperature, num_classes=n_classes)
        return {VAL_KNN_ACC: ssl_ops.knn_accuracy(bank, splits.bank.labels, val, splits.val.labels, **kw),
                KNN_ACC: ssl_ops.knn_accuracy(bank, splits.bank.labels, test, splits.test.labels, **kw)}

    def probe(model, device):
        bank, val, test = feats(model, device)
        res = ssl_ops.linear_probe(bank, splits.bank.labels, test, splits.test.labels, val_feats=val,
                                   val_labels=splits.val.labels, num_classes=n_classes, seed=cfg.seed)
        return {LINEAR_ACC: res.test_acc, VAL_LINEAR_ACC: float(res.val_acc)}

    return knn, probe


def features_of(encoder: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Encoder outputs (N, D) in eval mode (an encoder's forward is its features)."""
    from .training import batched_eval

    return batched_eval(encoder, encoder, images, device)


def pretrain(cfg: SSLConfig, ctx: Context, model: nn.Module, step, *, after_step_of=None,
             encoder_of: Callable[[nn.Module], nn.Module] = lambda m: m.backbone, arch_args: dict[str, Any],
             lr_scale: float = 1.0, train_images: torch.Tensor | None = None,
             final_evaluate: Callable[[nn.Module, torch.device], dict[str, float]] | None = None) -> nn.Module:
    """Pre-train `model` (whose `encoder_of(model)` is the backbone) with `step(model, x, y, gen)`
    on the unlabelled training split; monitor and save the backbone as the artifact `encoder`.

    `after_step_of(model)` returns the per-step callback (momentum targets), built on the model as
    the loop prepared it. `train_images` (N, C, H, W), if given, is what the model trains on instead
    of the training split's images (a poisoned pre-training set: PoisonedEncoder); the monitors keep
    the splits. `final_evaluate(backbone, device)` adds metrics to the last epoch's report."""
    torch.manual_seed(cfg.seed)
    splits = load_splits(cfg, ctx)
    images = splits.train.images if train_images is None else train_images
    spe = steps_per_epoch(len(images), cfg.batch_size, ctx.world_size)
    lr_at = lr_schedule(cfg.schedule, cfg.lr * lr_scale, cfg.epochs * spe,
                        warmup_steps=round(cfg.warmup_epochs * spe))
    knn, probe = monitors(cfg, splits, lambda m: encoder_of(getattr(m, "module", m)))

    def final(m, device):
        out = dict(probe(m, device))
        if final_evaluate is not None:
            out.update(final_evaluate(encoder_of(getattr(m, "module", m)), device))
        return out

    trained = fit(model, (images, None), ctx, epochs=cfg.epochs, batch_size=cfg.batch_size,
                  seed=cfg.seed, step=step, opt=cfg.optimizer, lr_at=lr_at, momentum=cfg.momentum,
                  weight_decay=cfg.weight_decay, evaluate=knn, final_evaluate=final,
                  after_step=after_step_of(model) if after_step_of else None)
    c, h, _ = splits.train.shape
    ctx.save_model("encoder", encoder_of(trained), cfg.model, arch_args, "encoder", input=InputContract(c, h))
    return trained
