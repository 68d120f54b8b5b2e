"""A downstream classifier on a pre-trained encoder: the downstream user of the encoder-based
scenario (FTP §5.1, thesis §3.4.1; docs/methods.md, "The encoder-based scenario").

The user takes a pre-trained encoder (the upstream stage `encoder`: a clean SSL encoder, or a
backdoored one from an encoder attack such as BadEncoder), puts a head on it (FTP: an MLP; `hidden_dim`
0 = a linear layer) and trains on its labelled downstream data (`dataset`, by default the real MNIST
digits: a different dataset from the Fashion-MNIST pre-training) in one of two ways:

* `finetune="classifier"`: classifier-only fine-tuning; the encoder is frozen (no gradient, and
  eval mode, so its BatchNorm statistics stay the pre-trained ones) and only the head trains;
* `finetune="whole"`: whole-model fine-tuning; encoder and head train together (BatchNorm in
  training mode). FTP: this already removes a BadEncoder backdoor (ASR 0.998 with classifier-only
  fine-tuning, 0.127 after one epoch of whole-model fine-tuning, CIFAR-10 -> STL-10).

`schedule="sft"` trains with super-fine-tuning's two-phase cyclic learning rate
(`secsweep.backdoor.SFTSchedule`, FTP §3.2; SGD only: LR_MAX1 = 0.1 is an SGD rate), so "SFT
alongside" is the same trainable. FTP §4.4 trains the downstream MLP 200 epochs at lr 3e-4 and
states no optimizer; Adam is the choice here (the rate is Adam's usual scale), the epochs are
CPU-sized (`--preset paper`: 200). Batch size, weight decay and the MLP's width are not stated:
fields (128, 0, 512: choices).

Reported every epoch: `clean_acc` / `val_clean_acc` (test split / validation hold-out of the
downstream training split) — the clean accuracy CA when the encoder is clean, the backdoored
accuracy BA when it is backdoored — and, when the upstream stage registers a `trigger=` hook
(BadEncoder), `asr` / `val_asr`: the fraction of triggered downstream images whose label is not the
attack's `target_label` that are classified as it (`has_trigger` = 1.0). Without a trigger (a clean
encoder) there is no backdoor to measure: `asr` and `val_asr` are reported as 0.0 with
`has_trigger` = 0.0, so every report carries the same metrics.

Output: the classifier as the model artifact `model` (role classifier, architecture
`encoder_classifier` with the encoder's card), loadable like every other classifier.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from secsweep import data as data_mod
from secsweep import models as models_mod
from secsweep import refs
from secsweep.artifacts import InputContract
from secsweep.backdoor import BackdoorEval, SFTSchedule, load_split
from secsweep.config import fail, one_of, positive, require
from secsweep.loop import OPTIMIZERS, fit
from secsweep.names import ASR, CLEAN_ACC, DEVICE_HOURS, VAL_ASR, VAL_CLEAN_ACC
from secsweep.ops.metrics import accuracy
from secsweep.refs import StageRef
from secsweep.registry import register
from secsweep.training import predict, steps_per_epoch

log = logging.getLogger(__name__)

HAS_TRIGGER = "has_trigger"
METRICS = (CLEAN_ACC, VAL_CLEAN_ACC, ASR, VAL_ASR, HAS_TRIGGER, DEVICE_HOURS)
FINETUNE = ("classifier", "whole")
SCHEDULES = ("constant", "sft")


@dataclass(frozen=True)
class Config(SFTSchedule):
    # the pre-trained encoder (kind encoder or encoder_attack); the scenario sweep sets badencoder
    encoder: StageRef = field(default_factory=lambda: StageRef("simclr"))
    dataset: str = "mnist"          # downstream data (secsweep.data.DATASETS)
    train_size: int = 0             # downstream training images (train + val), 0 = all
    image_size: int = 0             # pixels per side, 0 = the encoder's input size
    channels: int = 0               # 0 = the encoder's input channels
    finetune: str = "classifier"    # classifier (encoder frozen, BN in eval mode) or whole (all trains)
    hidden_dim: int = 512           # MLP head width (FTP: "MLP", width not stated); 0 = a linear head
    # a BatchNorm1d on the encoder's features before the head (FTP: not stated; chosen for the offline
    # CPU default: the Fashion-MNIST encoder's MNIST features lie in a narrow cone, docs/methods.md)
    head_norm: bool = True
    epochs: int = 5                 # downstream epochs (FTP §4.4: 200)
    optimizer: str = "adam"         # sgd, adam, adamw, lars (FTP: not stated)
    lr: float = 3e-4                # learning rate per step, schedule "constant" (FTP §4.4: 3e-4)
    momentum: float = 0.9           # SGD momentum
    weight_decay: float = 0.0       # L2 weight decay (FTP: not stated)
    batch_size: int = 128           # images per step (FTP: not stated)
    # "constant": `lr` throughout; "sft": SFT's cyclic rate from the SFTSchedule fields (SGD). The
    # field shadows SFTSchedule.schedule(), which is therefore called as SFTSchedule.schedule(cfg, n).
    schedule: str = "constant"
    include_target_class: bool = False  # count target-class test images in ASR (as VictimConfig)
    val_fraction: float = 0.1       # stratified hold-out of the downstream training data (selection)
    seed: int = 0

    def __post_init__(self) -> None:
        refs.check(self, "encoder", kinds=("encoder", "encoder_attack"))
        one_of("dataset", self.dataset, data_mod.DATASETS)
        require(self.train_size >= 0, "train_size", self.train_size, "must be >= 0 (0 = all)")
        require(self.image_size >= 0, "image_size", self.image_size, "must be >= 0 (0 = the encoder's)")
        one_of("channels", self.channels, (0, 1, 3))
        one_of("finetune", self.finetune, FINETUNE)
        require(self.hidden_dim >= 0, "hidden_dim", self.hidden_dim, "must be >= 0 (0 = a linear head)")
        require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        positive("lr", self.lr)
        require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        one_of("schedule", self.schedule, SCHEDULES)
        self.check_schedule()
        if self.schedule == "sft":
            require(self.optimizer == "sgd", "optimizer", self.optimizer,
                    "must be sgd with schedule=sft (SFT's LR_MAX1 0.1 is an SGD learning rate)")
        require(0.0 < self.val_fraction <= 0.5, "val_fraction", self.val_fraction, "must be in (0, 0.5]")


def upstream_trigger(cfg: Config, output):
    """(trigger, target label) of the upstream encoder stage when it registers a trigger, else None."""
    spec = cfg.encoder.spec()
    hook = spec.hooks.get("trigger")
    if hook is None:
        return None
    ucfg = cfg.encoder.config()
    target = getattr(ucfg, "target_label", None)
    if target is None:
        return None
    return hook(ucfg, output), int(target)


@register("downstream", kind="downstream", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    torch.manual_seed(cfg.seed)
    out = ctx.stage(cfg.encoder)
    encoder, card = ctx.load_model(out, "encoder", role="encoder")
    c = cfg.channels or (card.input.channels if card.input else 0)
    h = cfg.image_size or (card.input.size if card.input else 0)
    dcfg = SimpleNamespace(dataset=cfg.dataset, train_size=cfg.train_size, image_size=h, channels=c,
                           val_fraction=cfg.val_fraction, seed=cfg.seed)
    train, val, test = (load_split(dcfg, ctx, s) for s in ("train", "val", "test"))
    if card.input is not None:
        card.input.check(train.images[:1], f"dataset={cfg.dataset}")
    if cfg.head_norm and len(train) % cfg.batch_size == 1:  # BatchNorm1d cannot train on one sample
        fail("batch_size", cfg.batch_size, f"must not leave a last batch of 1 of the {len(train)} training "
             "images with head_norm=true (choose another batch_size or train_size)")

    backdoor = upstream_trigger(cfg, out)
    if backdoor is not None:
        trig, target = backdoor
        udata = getattr(cfg.encoder.config(), "downstream_dataset", cfg.dataset)
        if udata != cfg.dataset:
            log.warning("the encoder attack targets downstream dataset %s, this classifier trains on %s: "
                        "its ASR measures class %d of %s", udata, cfg.dataset, target, cfg.dataset)
        evaluate_backdoor = BackdoorEval.build(test, trig, target, cfg.include_target_class, val=val)

        def evaluate(model, device):
            return {**evaluate_backdoor(model, device), HAS_TRIGGER: 1.0}
    else:
        def evaluate(model, device):
            return {CLEAN_ACC: accuracy(predict(model, test.images, device), test.labels),
                    VAL_CLEAN_ACC: accuracy(predict(model, val.images, device), val.labels),
                    ASR: 0.0, VAL_ASR: 0.0, HAS_TRIGGER: 0.0}

    args = {"encoder": card.describe(), "num_classes": int(train.num_classes), "hidden_dim": int(cfg.hidden_dim),
            "head_norm": bool(cfg.head_norm)}
    model = models_mod.build("encoder_classifier", args)
    model.encoder.load_state_dict(encoder.state_dict())
    del encoder
    frozen = [model.encoder] if cfg.finetune == "classifier" else []
    if cfg.schedule == "sft":
        lr_at = SFTSchedule.schedule(cfg, steps_per_epoch(len(train), cfg.batch_size, ctx.world_size))
        lr = None
    else:
        lr_at, lr = None, cfg.lr
    trained = fit(model, (train.images, train.labels), ctx, epochs=cfg.epochs, batch_size=cfg.batch_size,
                  seed=cfg.seed, opt=cfg.optimizer, lr=lr, lr_at=lr_at, momentum=cfg.momentum,
                  weight_decay=cfg.weight_decay, frozen=frozen, evaluate=evaluate)
    ctx.save_model("model", trained, "encoder_classifier", args, "classifier",
                   input=InputContract(*train.shape[:2]))
