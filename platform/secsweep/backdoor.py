"""The standalone backdoor scenario shared by attacks and defenses (METHODS.md §4.0-§5.2).

`VictimConfig` is the recipe of a backdoored model (dataset, architecture, poisoning, training);
every attack's Config extends it. `DefenseConfig` adds which attack to defend against and the
fine-tuning budget; every defense's Config extends it. An attack trainable trains the backdoored
model; a defense obtains it through `load_victim`, which runs the attack as a cached stage, so a
sweep over defense knobs trains each backdoored model once.

Training of the backdoored model (FTP §4.4: SGD, lr 0.001, batch 256, 200 epochs) is the `paper`
preset; the defaults here are a CPU-sized recipe (SGD lr 0.01, momentum 0.9, 3 epochs, batch 128)
that reaches ASR > 0.9 on Fashion-MNIST in about a minute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from . import data as data_mod
from . import models as models_mod
from .config import build, fail, in_half_open_unit, in_open_unit, one_of, positive, require
from .context import Context
from .names import ASR, CLEAN_ACC, EPOCH, LR
from .ops.metrics import accuracy, attack_success_rate
from .ops.schedules import SHAPES, sft_lr
from .poison import PoisonedSet, Trigger, poison, triggered_test_set
from .training import predict, steps_per_epoch, train_epoch


@dataclass(frozen=True)
class VictimConfig:
    dataset: str = "fashion_mnist"      # secsweep.data.DATASETS
    model: str = "smallcnn"             # secsweep.models.model_names()
    poison_ratio: float = 0.1           # fraction of the training set poisoned (METHODS §4.1: 0.1)
    target_label: int = 0               # all-to-one target class (METHODS §4.1: not stated)
    train_size: int = 0                 # training samples used, 0 = the whole training set
    image_size: int = 0                 # pixels per side, 0 = the dataset's native size
    channels: int = 0                   # input channels, 0 = native (1 -> 3 repeats grey)
    attack_epochs: int = 3              # epochs of backdoor training (FTP §4.4: 200)
    attack_lr: float = 0.01             # SGD learning rate per step (FTP §4.4: 0.001)
    attack_momentum: float = 0.9        # SGD momentum (not stated in FTP)
    attack_weight_decay: float = 5e-4   # L2 weight decay (not stated in FTP)
    attack_batch_size: int = 128        # samples per step (FTP §4.4: 256)
    include_target_class: bool = False  # count target-class test samples in ASR (METHODS §2: not stated)
    seed: int = 0

    def __post_init__(self) -> None:
        one_of("dataset", self.dataset, data_mod.DATASETS)
        one_of("model", self.model, models_mod.model_names())
        in_open_unit("poison_ratio", self.poison_ratio)
        n_classes = data_mod.num_classes(self.dataset)
        require(0 <= self.target_label < n_classes, "target_label", self.target_label,
                f"must be a class of {self.dataset}: 0..{n_classes - 1}")
        require(self.train_size >= 0, "train_size", self.train_size, "must be >= 0 (0 = all)")
        require(self.image_size >= 0, "image_size", self.image_size, "must be >= 0 (0 = native)")
        one_of("channels", self.channels, (0, 1, 3))
        require(self.attack_epochs >= 1, "attack_epochs", self.attack_epochs, "must be >= 1")
        positive("attack_lr", self.attack_lr)
        positive("attack_batch_size", self.attack_batch_size)
        require(0 <= self.attack_momentum < 1, "attack_momentum", self.attack_momentum, "must be in [0, 1)")
        require(self.attack_weight_decay >= 0, "attack_weight_decay", self.attack_weight_decay, "must be >= 0")


VICTIM_FIELDS = tuple(f.name for f in dataclasses.fields(VictimConfig))


@dataclass(frozen=True)
class DefenseConfig(VictimConfig):
    attack: str = "badnets"             # an attack trainable (registry kind "attack")
    attack_options: dict = field(default_factory=dict)  # attack-specific fields, e.g. {"alpha": 0.2}
    clean_fraction: float = 1.0         # fraction of the clean training set the defender holds
    epochs: int = 2                     # defense epochs over the clean data
    batch_size: int = 128               # samples per step during the defense (FTP: not stated)
    momentum: float = 0.9               # SGD momentum during the defense (FTP: not stated)
    weight_decay: float = 5e-4          # L2 weight decay during the defense (FTP: not stated)

    def __post_init__(self) -> None:
        super().__post_init__()
        from . import registry

        one_of("attack", self.attack, registry.names("attack"))
        self.attack_config()  # validates attack_options against the attack's Config
        in_half_open_unit("clean_fraction", self.clean_fraction)
        require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        positive("batch_size", self.batch_size)
        require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")

    def attack_config(self) -> Any:
        from . import registry

        spec = registry.get(self.attack)
        shared = sorted(set(self.attack_options) & set(VICTIM_FIELDS))
        if shared:
            fail(f"attack_options.{shared[0]}", self.attack_options[shared[0]],
                 "is a shared setting of attack and defense; set it directly, not in attack_options")
        values = {k: getattr(self, k) for k in VICTIM_FIELDS}
        values.update(self.attack_options)
        return build(spec.config, values, what=f"attack {self.attack!r} (attack_options)")


@dataclass(frozen=True)
class SFTSchedule:
    """Super-fine-tuning's two-phase cyclic learning rate (FTP §3.2/§4.4; METHODS.md §5.2), as fields
    any config can mix in (the SFT defense, the transfer scenario). Call `check_schedule()` from
    `__post_init__`."""

    lr_base: float = 3e-4        # LR_BASE, learning rate per step at the bottom of every cycle (FTP: 3e-4)
    lr_max1: float = 0.1         # LR_MAX1, peak learning rate in phase 1 (FTP: 0.1)
    lr_max2: float = 0.001       # LR_MAX2, peak learning rate in phase 2 (FTP: 0.001)
    phase1_epochs: float = 1.0   # epochs of phase 1 (FTP: 10; CPU-sized default)
    ramp_steps: int = 0          # optimizer steps of one ramp LR_BASE -> peak (FTP: 500); 0 = a quarter epoch
    shape: str = "triangular"    # cycle shape: triangular (ramp down) or sawtooth (instant drop); FTP: figure only

    def check_schedule(self) -> None:
        for name in ("lr_base", "lr_max1", "lr_max2"):
            positive(name, getattr(self, name))
        require(self.lr_max1 > self.lr_max2, "lr_max1", self.lr_max1, f"must be greater than lr_max2={self.lr_max2}")
        require(self.lr_max2 >= self.lr_base, "lr_max2", self.lr_max2, f"must be >= lr_base={self.lr_base}")
        require(self.phase1_epochs >= 0, "phase1_epochs", self.phase1_epochs, "must be >= 0")
        require(self.ramp_steps >= 0, "ramp_steps", self.ramp_steps, "must be >= 1, or 0 for a quarter epoch")
        one_of("shape", self.shape, SHAPES)

    def schedule(self, steps_per_epoch: int) -> Callable[[int], float]:
        """The learning rate as a function of the optimizer step."""
        ramp = self.ramp_steps or max(1, steps_per_epoch // 4)
        return partial(sft_lr, steps_per_epoch=steps_per_epoch, lr_base=self.lr_base, lr_max1=self.lr_max1,
                       lr_max2=self.lr_max2, phase1_epochs=self.phase1_epochs, ramp_steps=ramp, shape=self.shape)


# -- data ---------------------------------------------------------------------------------------

def load_split(cfg: VictimConfig, ctx: Context, split: str) -> data_mod.ImageSet:
    ds = data_mod.load(
        cfg.dataset, split, ctx.data_root, download=ctx.download,
        image_size=cfg.image_size or None, channels=cfg.channels or None,
    )
    if split == "train" and cfg.train_size and cfg.train_size < len(ds):
        g = torch.Generator().manual_seed(cfg.seed)
        ds = ds.subset(torch.randperm(len(ds), generator=g)[: cfg.train_size].sort().values)
    return ds


def build_victim_model(cfg: VictimConfig, ds: data_mod.ImageSet) -> nn.Module:
    c, h, _ = ds.shape
    return models_mod.build_model(cfg.model, ds.num_classes, in_channels=c, image_size=h)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper."""
    return getattr(model, "module", model)


@dataclass
class BackdoorEval:
    """Clean and triggered test inputs, prepared once per trial."""

    images: torch.Tensor
    labels: torch.Tensor
    triggered: torch.Tensor
    triggered_labels: torch.Tensor
    target: int

    @classmethod
    def build(cls, test: data_mod.ImageSet, trigger: Trigger, target: int, include_target_class: bool) -> "BackdoorEval":
        tx, ty = triggered_test_set(test.images, test.labels, trigger, target, include_target_class=include_target_class)
        return cls(test.images, test.labels, tx, ty, target)

    def __call__(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        clean = accuracy(predict(model, self.images, device), self.labels)
        asr = attack_success_rate(predict(model, self.triggered, device), self.triggered_labels, self.target,
                                  include_target_class=True)  # already filtered in build()
        return {ASR: asr, CLEAN_ACC: clean}


# -- one training loop for attacks, retraining defenses and fine-tuning ---------------------------

def fit(
    model: nn.Module,
    images: torch.Tensor | Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    labels: torch.Tensor | None,
    ctx: Context,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    lr_at: Callable[[int], float],
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    evaluate: Callable[[nn.Module, torch.device], Mapping[str, float]] | None = None,
    extra: Mapping[str, float] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    extra_state: Mapping[str, Any] | None = None,
) -> nn.Module:
    """SGD over (images, labels) for `epochs`, learning rate `lr_at(step)`; after every epoch report
    `evaluate(model)` plus `extra` with a checkpoint, and resume from the last one after a restart.

    `images` may instead be a function of the 0-based epoch returning (images, labels), for training
    sets that change every epoch (WaNet's re-drawn poison and noise samples); `labels` is then None.
    `extra_state` joins every checkpoint (bookkeeping a restarted trial needs, read back with
    `ctx.restored()`). Returns the bare (unwrapped) model; the caller saves it.
    """
    model = ctx.prepare_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr_at(0), momentum=momentum, weight_decay=weight_decay)
    start, step = 0, 0
    state = ctx.restored()
    if state and "model" in state:
        unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, step = int(state["epoch"]), int(state["step"])
    kw = {"loss_fn": loss_fn} if loss_fn is not None else {}
    for epoch in range(start, epochs):
        x, y = images(epoch) if callable(images) else (images, labels)
        step, loss = train_epoch(model, x, y, opt, ctx, batch_size=batch_size, seed=seed, epoch=epoch,
                                 step=step, lr_at=lr_at, **kw)
        metrics = {EPOCH: epoch + 1, LR: lr_at(max(step - 1, 0)), "train_loss": loss, **(extra or {})}
        if evaluate is not None:
            metrics.update(evaluate(model, ctx.device))
        ctx.report(metrics, state={**(extra_state or {}), "model": unwrap(model).state_dict(),
                                   "optimizer": opt.state_dict(), "epoch": epoch + 1, "step": step})
    return unwrap(model)


def constant(lr: float) -> Callable[[int], float]:
    return lambda step: lr


# -- attacks ------------------------------------------------------------------------------------

def poisoned_train_set(cfg: VictimConfig, ctx: Context, trigger: Trigger) -> PoisonedSet:
    """The attack's training set: a seeded `poison_ratio` of it triggered and relabelled to the target."""
    train = load_split(cfg, ctx, "train")
    return poison(train.images, train.labels, trigger, ratio=cfg.poison_ratio, target=cfg.target_label, seed=cfg.seed)


def train_backdoored(cfg: VictimConfig, ctx: Context, trigger: Trigger) -> nn.Module:
    """Poison the training set with `trigger`, train the victim, report asr/clean_acc each epoch,
    and save the weights as the output `model`."""
    torch.manual_seed(cfg.seed)
    pset = poisoned_train_set(cfg, ctx, trigger)
    test = load_split(cfg, ctx, "test")
    evaluate = BackdoorEval.build(test, trigger, cfg.target_label, cfg.include_target_class)
    model = build_victim_model(cfg, test)
    model = fit(model, pset.images, pset.labels, ctx, epochs=cfg.attack_epochs, batch_size=cfg.attack_batch_size,
                seed=cfg.seed, lr_at=constant(cfg.attack_lr), momentum=cfg.attack_momentum,
                weight_decay=cfg.attack_weight_decay, evaluate=evaluate)
    ctx.save_output("model", model.state_dict())
    return model


# -- defenses -----------------------------------------------------------------------------------

@dataclass
class Victim:
    """A backdoored model with everything a defense needs to run and to be scored."""

    model: nn.Module
    trigger: Trigger
    train: data_mod.ImageSet        # the clean training set (the defender's data, before clean_fraction)
    evaluate: BackdoorEval
    attack_config: Any
    attack_metrics: Mapping[str, float]

    def poisoned_train_set(self, ctx: Context) -> PoisonedSet:
        """The poisoned training set the backdoored model was trained on (for data-based defenses)."""
        cfg = self.attack_config
        return poison(self.train.images, self.train.labels, self.trigger, ratio=cfg.poison_ratio,
                      target=cfg.target_label, seed=cfg.seed)


def load_victim(cfg: DefenseConfig, ctx: Context) -> Victim:
    """The backdoored model of `cfg` (trained once per attack config, cached) and its trigger."""
    from . import registry

    attack_cfg = cfg.attack_config()
    spec = registry.get(cfg.attack)
    out = ctx.stage(cfg.attack, attack_cfg)
    trigger = spec.hooks["trigger"](attack_cfg, out)
    train = load_split(cfg, ctx, "train")
    test = load_split(cfg, ctx, "test")
    model = build_victim_model(cfg, train)
    model.load_state_dict(out.tensors("model"))
    evaluate = BackdoorEval.build(test, trigger, cfg.target_label, cfg.include_target_class)
    return Victim(model.to(ctx.device), trigger, train, evaluate, attack_cfg, out.metrics)


def clean_subset(train: data_mod.ImageSet, fraction: float, seed: int) -> data_mod.ImageSet:
    """A seeded `fraction` of the clean training set (the defender's fine-tuning data)."""
    if fraction >= 1.0:
        return train
    g = torch.Generator().manual_seed(seed + 1)
    n = max(1, round(fraction * len(train)))
    return train.subset(torch.randperm(len(train), generator=g)[:n].sort().values)


def report_before(victim: Victim, ctx: Context, **extra: float) -> dict[str, float]:
    """Report epoch 0 (the backdoored model, before the defense) unless resuming; return the
    `asr_before`/`clean_acc_before` pair every later report of the defense carries."""
    before = victim.evaluate(victim.model, ctx.device)
    base = {"asr_before": before[ASR], "clean_acc_before": before[CLEAN_ACC]}
    if ctx.restored() is None:
        ctx.report({EPOCH: 0, **before, **base, **extra})
    return base


def finetune(
    cfg: DefenseConfig,
    ctx: Context,
    lr_at_factory: Callable[[int], Callable[[int], float]],
    *,
    victim: Victim | None = None,
    data: data_mod.ImageSet | None = None,
) -> nn.Module:
    """Whole-model fine-tuning on clean data (METHODS §5.1/§5.2) with the schedule `lr_at(step)`.

    `lr_at_factory(steps_per_epoch)` returns the schedule. Reports epoch 0 (the backdoored model,
    before the defense) and every epoch after, each carrying asr_before/clean_acc_before too.
    Saves the defended weights as the output `model` for downstream stages (sequela).
    """
    from .plots import plot_lr_schedule

    victim = victim or load_victim(cfg, ctx)
    data = data or clean_subset(victim.train, cfg.clean_fraction, cfg.seed)
    spe = steps_per_epoch(len(data), cfg.batch_size, ctx.world_size)
    lr_at = lr_at_factory(spe)
    if ctx.restored() is None:
        plot_lr_schedule(lr_at, cfg.epochs * spe, spe, ctx.artifact_path("lr_schedule.png"),
                         title=f"learning rate schedule ({type(cfg).__module__.rsplit('.', 1)[-1]})")
    base = report_before(victim, ctx, **{LR: lr_at(0)})
    model = fit(victim.model, data.images, data.labels, ctx, epochs=cfg.epochs, batch_size=cfg.batch_size,
                seed=cfg.seed, lr_at=lr_at, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                evaluate=victim.evaluate, extra=base)
    ctx.save_output("model", model.state_dict())
    return model
