"""WaNet (Nguyen & Tran, "WaNet -- Imperceptible Warping-based Backdoor Attack", ICLR 2021), as used
through BackdoorBench by the FTP paper (docs/methods.md §4.4: "small, smooth warping (deformation) of
the image as trigger").

The trigger is not a patch: a poisoned image is resampled through one fixed, smooth warping field
(`secsweep.ops.warp.make_warp_field`: a random k x k grid of control displacements upsampled
bicubically to the image size), so the change is small, spread over the whole image and continuous
in space. A `poison_ratio` of the training samples is warped and relabelled to `target_label`;
"noise mode" cross samples (`cross_ratio` x as many, drawn from the other samples) are warped
through the field plus per-sample random jitter (`secsweep.ops.warp.noise_grid`) and keep their true
labels, so the network learns this exact warp rather than "any warp".

Defaults and their sources:
* poison_ratio 0.1: FTP [S] (docs/methods.md §4.1) (inherited from VictimConfig, as the training recipe).
* k = 4, s = 0.5, grid_rescale = 1, cross_ratio = 2: FTP leaves the WaNet internals
  [NS] ("BackdoorBench defaults implied"); these are the WaNet paper's / BackdoorBench's defaults.
* noise_scale = 1: cross-sample jitter in WaNet's own unit (uniform in [-1, 1] / image size).
* warp_seed = 0: seed of the random control grid [NS]; the trigger is a function of the config
  alone, so the trigger hook rebuilds it without reading any artifact.
* resample = True: WaNet draws the poisoned and cross samples afresh in every batch (the first
  p x batch samples of each shuffled batch) and the jitter with them. Here they are re-drawn once
  per epoch over the in-memory set: epoch 1 poisons exactly the samples `secsweep.poison.poison`
  picks for this seed, later epochs draw new ones from (seed, epoch). The stage records the last
  epoch's draw (output `training_set`, secsweep.trainset: masks and labels, images regenerated
  from (cfg, epoch)), and that is the set data-based defenses filter and are scored on. False keeps epoch 1's set throughout (a static poisoned
  dataset, as BadNets/Blended). Re-drawing matters at small scale: on 8x8 digits (30 epochs, lr
  0.03) a static set is memorised (train loss 0.01) and test ASR ends at 0.72; re-drawn, 0.92.
* lr_schedule = "cosine": attack_lr annealed to 0 over attack_epochs, the scheduler of
  BackdoorBench's prototype recipe (CosineAnnealingLR; its BadNets/Blended/LF defaults) [EXT].
  BackdoorBench's WaNet config instead steps the rate down by 10x at epochs 100/200/300/400
  (MultiStepLR), i.e. keeps it constant through its 100-epoch default run; FTP: LR
  schedule [NS]. Cosine is the default here because runs are short: with a constant rate the
  decision between "warped" and "natural" is so fine that ASR swings by tens of points from epoch
  to epoch (digits, 30 epochs at lr 0.03: 1.00, 0.60, 0.49 over the last three), and the model a
  defense receives would be a lottery. "constant" is available (and is the other attacks' recipe).
Training augmentation: `augment` (VictimConfig; the paper preset: random crop after 4-pixel padding,
flips where the dataset allows) acts on each batch after the warp. BackdoorBench's WaNet applies
its own post-trigger transform instead (random crop 5 px, rotation 10 degrees, flip on CIFAR-10);
rotation is not implemented here (docs/paper_preset.md).

Note on tiny images: the mean displacement is about s/2 pixels whatever the image size, so on 8x8
`digits` the warp is a sub-pixel change of a few grey levels, learnable but slower than a patch
(tests/test_attacks_issue3.py: ASR 0.92 after 30 epochs at lr 0.03, where BadNets needs 4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from secsweep import data, trainset
from secsweep.backdoor import BackdoorEval, VictimConfig, build_victim_model, fit, load_split, save_classifier
from secsweep.config import one_of, positive, require
from secsweep.ops import warp as warp_ops
from secsweep.ops.schedules import cosine
from secsweep.poison import poison
from secsweep.registry import register
from secsweep.training import steps_per_epoch

VERSION = 2  # 2: the stage saves the `training_set` record (secsweep.trainset)
LR_SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class Config(VictimConfig):
    k: int = warp_ops.WANET_K                          # control points per side of the warping field
    s: float = warp_ops.WANET_S                        # warping strength (mean displacement ~ s/2 pixels)
    grid_rescale: float = warp_ops.WANET_GRID_RESCALE  # multiplier on the warped sampling grid
    cross_ratio: float = warp_ops.CROSS_RATIO          # noise-mode cross samples per poisoned sample
    noise_scale: float = 1.0                           # cross-sample jitter, in WaNet's units (1/size)
    warp_seed: int = 0                                 # seed of the random control grid
    resample: bool = True                              # re-draw poisoned and cross samples every epoch
    lr_schedule: str = "cosine"                        # attack_lr per step: cosine to 0, or constant

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.k >= 2, "k", self.k, "must be >= 2 control points per side")
        positive("s", self.s)
        positive("grid_rescale", self.grid_rescale)
        require(self.cross_ratio >= 0, "cross_ratio", self.cross_ratio, "must be >= 0")
        require(self.poison_ratio * (1 + self.cross_ratio) <= 1, "cross_ratio", self.cross_ratio,
                f"poisoned + cross samples must fit in the training set (poison_ratio={self.poison_ratio})")
        require(self.noise_scale >= 0, "noise_scale", self.noise_scale, "must be >= 0")
        one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES)


def warp_field(cfg: Config) -> torch.Tensor:
    """The backdoor sampling grid (1, H, W, 2) of `cfg`, deterministic in `warp_seed`."""
    _, h, w = data.native_shape(cfg.dataset)
    h, w = (cfg.image_size, cfg.image_size) if cfg.image_size else (h, w)
    return warp_ops.make_warp_field(h, w, k=cfg.k, s=cfg.s, grid_rescale=cfg.grid_rescale, seed=cfg.warp_seed)


def trigger(cfg: Config, output=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x warped through the WaNet field (needs no stage output: the field is fixed by cfg)."""
    grid = warp_field(cfg)
    return lambda x: warp_ops.warp(x, grid)


def epoch_set(
    cfg: Config, images: torch.Tensor, labels: torch.Tensor, epoch: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, cross mask) trained on in 0-based `epoch`: a `poison_ratio` warped and
    relabelled (epoch 0: exactly `poison()`'s samples for cfg.seed), `cross_ratio` x as many of the
    others warped with jitter (noise mode), labels kept."""
    out, new_labels, _, mask = epoch_record(cfg, images, labels, epoch)
    return out, new_labels, mask


def epoch_record(
    cfg: Config, images: torch.Tensor, labels: torch.Tensor, epoch: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, poisoned mask, cross mask) of `epoch_set`: deterministic in (cfg, epoch) on
    the CPU, so the stage's `training_set` record regenerates any epoch bit for bit."""
    draw = epoch if cfg.resample else 0
    grid = warp_field(cfg)
    # seeds apart from secsweep.training.epoch_order's (seed * 100_003 + epoch): a poison draw equal
    # to the batch order would put every poisoned sample in the epoch's first batches
    poison_seed = cfg.seed if draw == 0 else cfg.seed * 100_003 + 40_009 + draw
    pset = poison(images, labels, lambda x: warp_ops.warp(x, grid), ratio=cfg.poison_ratio,
                  target=cfg.target_label, seed=poison_seed)
    out = pset.images  # a fresh copy: poison() never modifies its input
    rest = torch.nonzero(~pset.poisoned).flatten()
    n_cross = min(len(rest), round(cfg.cross_ratio * int(pset.poisoned.sum())))
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + 70_001 + draw)  # independent of the poison draw
    cross = rest[torch.randperm(len(rest), generator=g)[:n_cross]].sort().values
    if n_cross:
        noisy = warp_ops.noise_grid(grid, n_cross, generator=g, scale=cfg.noise_scale)
        out[cross] = warp_ops.warp(images[cross], noisy)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[cross] = True
    return out, pset.labels, pset.poisoned, mask


def training_set(cfg: Config, clean, epoch: int):
    """The `training_set` hook: (images, labels, poisoned, cross) of 0-based `epoch` over the clean
    training split `clean` (secsweep.trainset mode REGENERATE)."""
    return epoch_record(cfg, clean.images, clean.labels, epoch)


def lr_schedule(cfg: Config, total_steps: int) -> Callable[[int], float]:
    """attack_lr at optimizer step `step`: constant, or cosine-annealed to 0 at `total_steps`."""
    if cfg.lr_schedule == "constant":
        return lambda step: cfg.attack_lr
    return cosine(cfg.attack_lr, total_steps)  # torch's CosineAnnealingLR, held at 0 after the end


@register("wanet", kind="attack", config=Config, trigger=trigger, training_set=training_set)
def run(cfg: Config, ctx) -> None:
    torch.manual_seed(cfg.seed)
    train = load_split(cfg, ctx, "train")
    evaluate = BackdoorEval.for_victim(cfg, ctx, trigger(cfg))
    lr_at = lr_schedule(cfg, cfg.attack_epochs * steps_per_epoch(len(train), cfg.attack_batch_size, ctx.world_size))
    model = fit(build_victim_model(cfg, train), lambda epoch: epoch_set(cfg, train.images, train.labels, epoch)[:2],
                None, ctx, epochs=cfg.attack_epochs, batch_size=cfg.attack_batch_size, seed=cfg.seed, lr_at=lr_at,
                momentum=cfg.attack_momentum, weight_decay=cfg.attack_weight_decay, evaluate=evaluate,
                transform=cfg.train_transform())
    save_classifier(ctx, model, cfg)
    # the last epoch's draw: masks and labels recorded, images regenerated from (cfg, epoch) on demand
    last = cfg.attack_epochs - 1
    _, labels, poisoned, cross = epoch_record(cfg, train.images, train.labels, last)
    trainset.save_record(ctx, train, labels=labels, true_labels=train.labels, poisoned=poisoned, cross=cross,
                         epoch=last, mode=trainset.REGENERATE)
