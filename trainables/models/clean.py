"""A clean classifier: the dataset and architecture of the standalone scenario trained without any
poisoning (docs/methods.md §7). Used as an upstream stage, e.g. by the LF attack (its universal
perturbation is computed against a clean model) and by backdoor re-injection (injection into a clean
model is the paper's baseline, §6.2). Training recipe as the backdoored models' (FTP §4.4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from secsweep import data as data_mod
from secsweep import models as models_mod
from secsweep.backdoor import build_victim_model, constant, fit, load_split, save_classifier
from secsweep.config import one_of, positive, require
from secsweep.names import CLEAN_ACC, DEVICE_HOURS, VAL_CLEAN_ACC
from secsweep.ops import augment as augment_ops
from secsweep.ops.metrics import accuracy
from secsweep.presets import resolve_augment
from secsweep.registry import register
from secsweep.training import predict


@dataclass(frozen=True)
class Config:
    dataset: str = "fashion_mnist"
    model: str = "smallcnn"
    train_size: int = 0          # training samples used, 0 = all
    image_size: int = 0          # pixels per side, 0 = native
    channels: int = 0            # 0 = native
    epochs: int = 3              # training epochs (FTP §4.4: 200)
    lr: float = 0.01             # SGD learning rate per step (FTP §4.4: 0.001)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128        # samples per step (FTP §4.4: 256)
    val_fraction: float = 0.1    # fraction of the training data held out for validation (as the victim's)
    augment: str = "none"        # training augmentation, as VictimConfig.augment
    augment_padding: int = 4     # pixels of zero padding before the random crop, as VictimConfig
    seed: int = 0

    def __post_init__(self) -> None:
        one_of("dataset", self.dataset, data_mod.DATASETS)
        one_of("model", self.model, models_mod.model_names())
        require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        require(0.0 <= self.val_fraction <= 0.5, "val_fraction", self.val_fraction, "must be in [0, 0.5]")
        positive("lr", self.lr)
        positive("batch_size", self.batch_size)
        one_of("augment", self.augment, (*augment_ops.AUGMENTATIONS, "auto"))
        require(self.augment_padding >= 0, "augment_padding", self.augment_padding, "must be >= 0 pixels")


@register("clean", kind="model", config=Config, metrics=(CLEAN_ACC, DEVICE_HOURS))
def run(cfg: Config, ctx) -> None:
    torch.manual_seed(cfg.seed)
    train = load_split(cfg, ctx, "train")
    test, val = load_split(cfg, ctx, "test"), load_split(cfg, ctx, "val")

    def evaluate(model, device):
        return {CLEAN_ACC: accuracy(predict(model, test.images, device), test.labels),
                VAL_CLEAN_ACC: accuracy(predict(model, val.images, device), val.labels)}

    model = fit(build_victim_model(cfg, train), train.images, train.labels, ctx, epochs=cfg.epochs,
                batch_size=cfg.batch_size, seed=cfg.seed, lr_at=constant(cfg.lr), momentum=cfg.momentum,
                weight_decay=cfg.weight_decay, evaluate=evaluate,
                transform=augment_ops.augmentation(resolve_augment(cfg.augment, cfg.dataset), cfg.augment_padding))
    save_classifier(ctx, model, cfg)
