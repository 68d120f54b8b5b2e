"""The standalone backdoor scenario shared by attacks and defenses (docs/methods.md §2.1, §5.1-§5.3).

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
import logging
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
from .names import (
    ASR, ASR_BEFORE, CLEAN_ACC, CLEAN_ACC_BEFORE, EPOCH, IMPLANTED, LR, VAL_ASR, VAL_ASR_BEFORE, VAL_CLEAN_ACC,
    VAL_CLEAN_ACC_BEFORE,
)
from .ops import augment as augment_ops
from .ops.metrics import accuracy, attack_success_rate
from .ops.schedules import SHAPES, sft_lr
from .poison import PoisonedSet, Trigger, poison, triggered_test_set
from . import trainset
from .errors import ArtifactError
from .training import predict, steps_per_epoch, train_epoch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VictimConfig:
    dataset: str = "fashion_mnist"      # secsweep.data.DATASETS
    model: str = "smallcnn"             # secsweep.models.model_names()
    poison_ratio: float = 0.1           # fraction of the training set poisoned (docs/methods.md §4.1: 0.1)
    target_label: int = 0               # all-to-one target class (docs/methods.md §2.1: not stated)
    train_size: int = 0                 # training samples used, 0 = the whole training set
    image_size: int = 0                 # pixels per side, 0 = the dataset's native size
    channels: int = 0                   # input channels, 0 = native (1 -> 3 repeats grey)
    attack_epochs: int = 3              # epochs of backdoor training (FTP §4.4: 200)
    attack_lr: float = 0.01             # SGD learning rate per step (FTP §4.4: 0.001)
    attack_momentum: float = 0.9        # SGD momentum (not stated in FTP)
    attack_weight_decay: float = 5e-4   # L2 weight decay (not stated in FTP)
    attack_batch_size: int = 128        # samples per step (FTP §4.4: 256)
    include_target_class: bool = False  # count target-class test samples in ASR (docs/methods.md §2.3: not stated)
    augment: str = "none"               # training augmentation: none, crop, crop_flip, auto (secsweep.presets)
    augment_padding: int = 4            # zero padding in pixels a side before the random crop (BackdoorBench: 4)
    val_fraction: float = 0.1           # fraction of the training data held out (stratified) for validation
    seed: int = 0                       # the victim's seed: data subset, validation split, poison draw, training

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
        require(0.0 <= self.val_fraction <= 0.5, "val_fraction", self.val_fraction, "must be in [0, 0.5]")
        one_of("augment", self.augment, (*augment_ops.AUGMENTATIONS, "auto"))
        require(self.augment_padding >= 0, "augment_padding", self.augment_padding, "must be >= 0 pixels")
        require(self.attack_epochs >= 1, "attack_epochs", self.attack_epochs, "must be >= 1")
        positive("attack_lr", self.attack_lr)
        positive("attack_batch_size", self.attack_batch_size)
        require(0 <= self.attack_momentum < 1, "attack_momentum", self.attack_momentum, "must be in [0, 1)")
        require(self.attack_weight_decay >= 0, "attack_weight_decay", self.attack_weight_decay, "must be >= 0")

    def train_transform(self) -> augment_ops.Transform | None:
        """The per-batch augmentation of every training loop of this recipe (the attack's, and a
        defense's fine-tuning or retraining), applied on the device after the trigger: poisoned
        samples are stored triggered and augmented like the rest, as in BackdoorBench. "auto" is
        crop_flip or crop by dataset (`secsweep.presets.flip_allowed`)."""
        from .presets import resolve_augment

        return augment_ops.augmentation(resolve_augment(self.augment, self.dataset), self.augment_padding)

    @property
    def data_seed(self) -> int:
        """Seed of the victim's data: training subset and validation split (a defense overrides it)."""
        return self.seed


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
    victim_seed: int = 0                # the backdoored model's seed (`seed` is the defense's own)
    min_asr_before: float = 0.8         # val ASR the backdoor must reach for the defense to count
    # "" = the model `attack` trains; "zoo:NAME" = bring your own model: a registry model (secsweep.zoo)
    # defended on this recipe's clean data, its backdoor (if any) measured with `attack`'s trigger
    victim: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        from . import registry

        require(0.0 <= self.min_asr_before <= 1.0, "min_asr_before", self.min_asr_before, "must be in [0, 1]")

        one_of("attack", self.attack, registry.names("attack"))
        self.attack_config()  # validates attack_options against the attack's Config
        if self.victim:
            self.zoo_config()  # the registry model exists, is a classifier, fits this recipe's data
        in_half_open_unit("clean_fraction", self.clean_fraction)
        require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        positive("batch_size", self.batch_size)
        require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")

    @property
    def data_seed(self) -> int:
        return self.victim_seed  # the defender holds the victim's clean training data, split the same way

    def upstream_stages(self) -> list[tuple[str, Any]]:
        """The stage a trial of this defense needs first: the backdoored model, or the registry model
        it brings (`secsweep.refs.upstream`)."""
        return [("zoo", self.zoo_config())] if self.victim else [(self.attack, self.attack_config())]

    def zoo_config(self) -> Any:
        """The `zoo` stage's config of `victim="zoo:NAME"`: that model on this recipe's data and split."""
        from . import registry

        kind, sep, name = self.victim.partition(":")
        if kind != "zoo" or not sep or not name:
            fail("victim", self.victim, "must be empty (train the attack's model) or zoo:NAME (a registry model)")
        from . import zoo

        if name not in zoo.names():
            fail("victim", self.victim, "names no registry model; choices: "
                 + ", ".join(f"zoo:{n}" for n in zoo.names() if zoo.get(n).role == "classifier"))
        card = zoo.get(name)
        if card.role != "classifier":
            fail("victim", self.victim, f"is a {card.role}, not a classifier")
        if card.dataset != self.dataset:
            fail("victim", self.victim, f"was trained on {card.dataset}; set dataset={card.dataset} "
                 "(the clean data the defender holds must be the model's task)")
        values = {"name": name, "dataset": self.dataset, "train_size": self.train_size, "image_size": self.image_size,
                  "channels": self.channels, "val_fraction": self.val_fraction, "seed": self.victim_seed}
        return build(registry.get("zoo").config, values, what=f"victim {self.victim!r}")

    def attack_config(self) -> Any:
        from . import registry

        spec = registry.get(self.attack)
        shared = sorted(set(self.attack_options) & set(VICTIM_FIELDS))
        if shared:
            fail(f"attack_options.{shared[0]}", self.attack_options[shared[0]],
                 "is a shared setting of attack and defense; set it directly (the victim's seed: "
                 "victim_seed), not in attack_options")
        values = {k: getattr(self, k) for k in VICTIM_FIELDS}
        values["seed"] = self.victim_seed
        values.update(self.attack_options)
        return build(spec.config, values, what=f"attack {self.attack!r} (attack_options)",
                     nested=("attack_options", self.attack_options))


@dataclass(frozen=True)
class SFTSchedule:
    """Super-fine-tuning's two-phase cyclic learning rate (FTP §3.2/§4.4; docs/methods.md §5.3), as fields
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

SPLITS = ("train", "val", "test")


def _data_seed(cfg: Any) -> int:
    return getattr(cfg, "data_seed", cfg.seed)  # configs without a victim (a clean model) use their seed


def load_split(cfg: VictimConfig, ctx: Context, split: str) -> data_mod.ImageSet:
    """One split of the victim's data: "train" (what the attack poisons and trains on, and the
    defender's clean data), "val" (a stratified `val_fraction` held out of the training data, seeded
    by the victim's seed: what sweeps select on) or "test" (the dataset's test split: reported only).
    `train_size` limits train + val together."""
    one_of("split", split, SPLITS)
    ds = data_mod.load(
        cfg.dataset, "test" if split == "test" else "train", ctx.data_root, download=ctx.download,
        image_size=cfg.image_size or None, channels=cfg.channels or None,
    )
    if split == "test":
        return ds
    if cfg.train_size and cfg.train_size < len(ds):
        g = torch.Generator().manual_seed(_data_seed(cfg))
        ds = ds.subset(torch.randperm(len(ds), generator=g)[: cfg.train_size].sort().values)
    keep, held = data_mod.stratified_split(ds.labels, cfg.val_fraction, _data_seed(cfg))
    return ds.subset(held if split == "val" else keep)


def build_victim_model(cfg: VictimConfig, ds: data_mod.ImageSet) -> nn.Module:
    c, h, _ = ds.shape
    return models_mod.build_model(cfg.model, ds.num_classes, in_channels=c, image_size=h)


def input_shape(cfg: Any) -> tuple[int, int]:
    """(channels, size) of the images a recipe's `load_split` yields (its dataset, `channels`, `image_size`)."""
    c, h, _ = data_mod.native_shape(cfg.dataset)
    return (getattr(cfg, "channels", 0) or c, getattr(cfg, "image_size", 0) or h)


def save_classifier(ctx: Context, model: nn.Module, cfg: Any, *, name: str = "model",
                    shape: tuple[int, int] | None = None) -> None:
    """Save a classifier of the recipe `cfg` (architecture `cfg.model`) as the model artifact `name`
    (`Context.save_model`): its card records the architecture, the classes of its head and the
    input contract, so consumers rebuild it with `ctx.load_model` alone."""
    from .artifacts import InputContract

    bare = unwrap(model)
    card = ctx.card_of(bare)
    if card is not None and card.arch != cfg.model:  # a loaded model of another architecture (a registry model)
        args = dict(card.args)
        if "num_classes" in args and hasattr(bare, "head") and hasattr(bare.head, "out_features"):
            args["num_classes"] = int(bare.head.out_features)
        ctx.save_model(name, bare, card.arch, args, "classifier", input=card.input)
        return
    c, h = shape or input_shape(cfg)
    args = {"num_classes": int(bare.head.out_features), "in_channels": int(c), "image_size": int(h)}
    ctx.save_model(name, bare, cfg.model, args, "classifier", input=InputContract(int(c), int(h)))


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper."""
    return getattr(model, "module", model)


@dataclass
class BackdoorEval:
    """Clean and triggered test inputs (and, when given, validation inputs), prepared once per trial.

    Calling it returns `asr`/`clean_acc` on the test split and `val_asr`/`val_clean_acc` on the
    validation split: sweeps select on the latter, tables report the former.
    """

    images: torch.Tensor
    labels: torch.Tensor
    triggered: torch.Tensor
    triggered_labels: torch.Tensor
    target: int
    val: "BackdoorEval | None" = None

    @classmethod
    def build(cls, test: data_mod.ImageSet, trigger: Trigger, target: int, include_target_class: bool,
              val: data_mod.ImageSet | None = None) -> "BackdoorEval":
        tx, ty = triggered_test_set(test.images, test.labels, trigger, target, include_target_class=include_target_class)
        inner = cls.build(val, trigger, target, include_target_class) if val is not None and len(val) else None
        return cls(test.images, test.labels, tx, ty, target, inner)

    @classmethod
    def for_victim(cls, cfg: VictimConfig, ctx: Context, trigger: Trigger, target: int | None = None) -> "BackdoorEval":
        """Test and validation evaluation of the victim of `cfg` under `trigger`."""
        target = cfg.target_label if target is None else target
        return cls.build(load_split(cfg, ctx, "test"), trigger, target, cfg.include_target_class,
                         val=load_split(cfg, ctx, "val"))

    def __call__(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        clean = accuracy(predict(model, self.images, device), self.labels)
        asr = attack_success_rate(predict(model, self.triggered, device), self.triggered_labels, self.target,
                                  include_target_class=True)  # already filtered in build()
        out = {ASR: asr, CLEAN_ACC: clean}
        if self.val is not None:
            v = self.val(model, device)
            out.update({VAL_ASR: v[ASR], VAL_CLEAN_ACC: v[CLEAN_ACC]})
        return out


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
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> nn.Module:
    """SGD over (images, labels) for `epochs`, learning rate `lr_at(step)` (`secsweep.loop.fit` with
    the SGD recipe of the standalone scenario); after every epoch report
    `evaluate(model)` plus `extra` with a checkpoint, and resume from the last one after a restart.

    `images` may instead be a function of the 0-based epoch returning (images, labels), for training
    sets that change every epoch (WaNet's re-drawn poison and noise samples); `labels` is then None.
    `extra_state` joins every checkpoint (bookkeeping a restarted trial needs, read back with
    `ctx.restored()`). `transform(batch, generator)` augments every training batch on the device
    (`VictimConfig.train_transform`; `secsweep.training.train_epoch`). The state is built and saved
    on the epochs `ctx.checkpoint_due` names (every `ctx.checkpoint_every`, and the last); the other
    epochs report metrics only. Returns the bare (unwrapped) model; the caller saves it.
    """
    from .loop import fit as loop_fit  # the one training loop (secsweep.loop); this is its SGD recipe

    data = images if callable(images) else (images, labels)
    return loop_fit(model, data, ctx, epochs=epochs, batch_size=batch_size, seed=seed, lr_at=lr_at, opt="sgd",
                    momentum=momentum, weight_decay=weight_decay, evaluate=evaluate, extra=extra,
                    loss_fn=loss_fn, extra_state=extra_state, transform=transform)


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
    train = load_split(cfg, ctx, "train")
    pset = poison(train.images, train.labels, trigger, ratio=cfg.poison_ratio, target=cfg.target_label, seed=cfg.seed)
    evaluate = BackdoorEval.for_victim(cfg, ctx, trigger)
    model = build_victim_model(cfg, load_split(cfg, ctx, "test"))
    model = fit(model, pset.images, pset.labels, ctx, epochs=cfg.attack_epochs, batch_size=cfg.attack_batch_size,
                seed=cfg.seed, lr_at=constant(cfg.attack_lr), momentum=cfg.attack_momentum,
                weight_decay=cfg.attack_weight_decay, evaluate=evaluate, transform=cfg.train_transform())
    save_classifier(ctx, model, cfg)
    # the same static set in every epoch: the trigger rebuilds it from the record's mask (secsweep.trainset)
    trainset.save_record(ctx, train, labels=pset.labels, true_labels=pset.true_labels, poisoned=pset.poisoned,
                         epoch=cfg.attack_epochs - 1, mode=trainset.STATIC)
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
    min_asr_before: float = 0.0     # the defense's floor on the victim's val ASR (DefenseConfig.min_asr_before)
    output: Any = None              # the attack's StageOutput (its `training_set` record)
    attack: str = ""                # the attack trainable's name

    def record(self) -> dict[str, torch.Tensor]:
        """The attack's record of the training set it used (secsweep.trainset)."""
        if self.output is None:
            raise ArtifactError("victim=zoo:...: a registry model comes without the training set it was trained "
                                "on, which this defense needs (data-based defenses: ac, spectral, abl; mia); "
                                "use a defense that only needs clean data (ft, sft, fp, nad, nc)")
        return trainset.load_record(self.output)

    def poisoned_train_set(self, ctx: Context) -> PoisonedSet:
        """The training set the backdoored model was trained on in its last epoch, exactly as the attack
        recorded it (for data-based defenses and their ground-truth masks): WaNet's re-drawn poison
        and noise-mode samples and Input-Aware's generated ones included."""
        from . import registry

        hook = registry.get(self.attack).hooks.get("training_set") if self.attack else None
        regenerate = (lambda clean, epoch: hook(self.attack_config, clean, epoch)) if hook else None
        return trainset.rebuild(self.record(), self.train, self.trigger, regenerate)

    def members(self) -> data_mod.ImageSet:
        """The clean training samples (true labels) the backdoored model was trained on, from the
        record: membership inference's member pool."""
        return trainset.members(self.record(), self.train)


def load_victim(cfg: DefenseConfig, ctx: Context) -> Victim:
    """The backdoored model of `cfg` (trained once per attack config, cached) and its trigger."""
    from . import registry

    attack_cfg = cfg.attack_config()
    spec = registry.get(cfg.attack)
    if cfg.victim:  # bring your own model: the registry model; the attack only names the trigger tested
        out = ctx.stage("zoo", cfg.zoo_config())
        trigger = spec.hooks["trigger"](attack_cfg, None)
    else:
        out = ctx.stage(cfg.attack, attack_cfg)
        trigger = spec.hooks["trigger"](attack_cfg, out)
    train = load_split(cfg, ctx, "train")
    model, _ = ctx.load_model(out, "model", role="classifier")
    evaluate = BackdoorEval.for_victim(cfg, ctx, trigger)
    return Victim(model, trigger, train, evaluate, attack_cfg, out.metrics, cfg.min_asr_before,
                  output=None if cfg.victim else out, attack=cfg.attack)


def clean_subset(train: data_mod.ImageSet, fraction: float, seed: int) -> data_mod.ImageSet:
    """A seeded `fraction` of the clean training set (the defender's fine-tuning data)."""
    if fraction >= 1.0:
        return train
    g = torch.Generator().manual_seed(seed + 1)
    n = max(1, round(fraction * len(train)))
    return train.subset(torch.randperm(len(train), generator=g)[:n].sort().values)


def report_before(victim: Victim, ctx: Context, **extra: float) -> dict[str, float]:
    """Report epoch 0 (the backdoored model, before the defense) unless resuming; return the
    metrics every later report of the defense carries: `asr_before`/`clean_acc_before` (test), their
    `val_` twins, and `backdoor_implanted` (1.0 when the val ASR before the defense reached
    `min_asr_before`; 0.0 marks a defense of a backdoor that never took: not a success)."""
    before = victim.evaluate(victim.model, ctx.device)
    base = {ASR_BEFORE: before[ASR], CLEAN_ACC_BEFORE: before[CLEAN_ACC]}
    if VAL_ASR in before:
        base.update({VAL_ASR_BEFORE: before[VAL_ASR], VAL_CLEAN_ACC_BEFORE: before[VAL_CLEAN_ACC]})
    selected_asr = before.get(VAL_ASR, before[ASR])
    base[IMPLANTED] = float(selected_asr >= victim.min_asr_before)
    if not base[IMPLANTED] and victim.output is None:  # a registry model (victim=zoo:...)
        log.warning("no backdoor under the %s trigger: ASR before the defense %.3f < min_asr_before %.2f "
                    "(a registry model: the defense's ASR rows are no evidence)", victim.attack, selected_asr,
                    victim.min_asr_before)
    elif not base[IMPLANTED]:
        log.warning("backdoor not implanted: ASR before the defense %.3f < min_asr_before %.2f; "
                    "raise attack_epochs or poison_ratio", selected_asr, victim.min_asr_before)
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
    """Whole-model fine-tuning on clean data (docs/methods.md §5.2/§5.3) with the schedule `lr_at(step)`.

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
        with ctx.uncharged():  # a plot is platform output, not the method's cost (Context.device_hours)
            plot_lr_schedule(lr_at, cfg.epochs * spe, spe, ctx.artifact_path("lr_schedule.png"),
                             title=f"learning rate schedule ({type(cfg).__module__.rsplit('.', 1)[-1]})")
    base = report_before(victim, ctx, **{LR: lr_at(0)})
    model = fit(victim.model, data.images, data.labels, ctx, epochs=cfg.epochs, batch_size=cfg.batch_size,
                seed=cfg.seed, lr_at=lr_at, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                evaluate=victim.evaluate, extra=base, transform=cfg.train_transform())
    save_classifier(ctx, model, cfg)
    return model
