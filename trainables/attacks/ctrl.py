"""CTRL (Li et al., "An Embarrassingly Simple Backdoor Attack on Self-supervised Learning", ICCV
2023; docs/methods.md, "CTRL").

A data-poisoning backdoor of self-supervised pre-training: the attacker stamps an invisible
frequency-domain trigger (`secsweep.ops.ctrl`: a fixed magnitude added to a few mid/high-frequency
DCT coefficients) on a small fraction of the *target-class* images of the unlabelled pre-training
set; the victim pre-trains its encoder on the poisoned set as usual. Both views of a poisoned image
carry the trigger (it survives the augmentations as a texture), so the contrastive loss learns it
as a feature shared with the target class; downstream, a trigger-stamped input of any class is then
embedded near the target class and a classifier trained on clean data puts it there. Unlike
BadEncoder and DRUPE this is a poisoned pre-training run, not a fine-tune of a clean encoder.

What is fixed here, and the choices (each a field):

* pre-training: SimCLR (`trainables/encoders/simclr.py`: its `SimCLR` model, NT-Xent step and
  `secsweep.ssl.pretrain`; every SimCLR field keeps its meaning and default), on the poisoned
  training split.
* poisoning: `poison_rate` = poisoned images / the whole pre-training set (default 1 %), all of
  them drawn (seeded) from the images of class `target_label`, stamped in place (the set keeps its
  size; with ten balanced classes 1 % of the set is 10 % of the target class). The labels are never
  used for training: they only say which images the attacker (who knows the target class) stamps.
* trigger: `positions` (u, v pairs on a 32-pixel window, flattened: default (15, 15) and (31, 31),
  one mid-band and the highest frequency), `magnitude` 100/255 per coefficient in intensity units
  of [0, 1] images on a 32-pixel window, scaled with the window (orthonormal DCT; [NS]: chosen so
  that the largest per-pixel change is 0.041 on grey images of any size, PSNR 36.5 dB on the
  poisoned digits), `window` 0 = the whole image (else the block side), colour images in the YUV
  `components` "uv" (grey images: their one channel).
* the downstream task (`downstream_dataset`, default the pre-training dataset as in CTRL's own
  CIFAR-10 -> CIFAR-10 evaluation; `target_label` is its target class): a linear probe on frozen
  features of `downstream_size` training images (BadEncoder's probe, `badencoder.probe`), ASR =
  triggered non-target test images classified as the target class, CA = clean test accuracy;
  `val_` versions on the stratified validation hold-out.
* the baseline ("No Attack" row): the clean SimCLR encoder of the same recipe and seed on the
  unpoisoned data (an upstream stage, cached and not charged), probed the same way with the same
  trigger: `clean_encoder_asr` (the rate at which triggered inputs land in the target class without
  the backdoor), `clean_encoder_acc`.

Reported (last epoch; the SSL monitors every epoch): `asr`, `val_asr`, `clean_acc`, `val_clean_acc`,
`clean_encoder_asr`, `val_clean_encoder_asr`, `clean_encoder_acc`, `n_poisoned`, `poison_fraction`,
`trigger_max_change` (largest per-pixel change over the poisoned images) and `trigger_psnr`
(their mean PSNR, dB), `secsweep.ssl.METRICS`, `device_hours`. Output: the model artifact
`encoder` and the `trigger=` hook (the trigger is fixed by the config).

CTRL is known to need long pre-training (hundreds of epochs) to implant; what the small CPU scale
shows is in docs/methods.md, "CTRL".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import torch

from secsweep import data as data_mod
from secsweep import ssl
from secsweep.backdoor import input_shape, load_split
from secsweep.config import fail, in_open_unit, one_of, positive, require
from secsweep.names import ASR, CLEAN_ACC, DEVICE_HOURS, VAL_ASR, VAL_CLEAN_ACC
from secsweep.ops import ctrl as ctrl_ops
from secsweep.registry import register
from trainables.attacks import badencoder as be
from trainables.encoders import simclr

log = logging.getLogger(__name__)

CLEAN_ENCODER_ASR, VAL_CLEAN_ENCODER_ASR = "clean_encoder_asr", "val_clean_encoder_asr"
CLEAN_ENCODER_ACC = "clean_encoder_acc"
N_POISONED, POISON_FRACTION = "n_poisoned", "poison_fraction"
TRIGGER_MAX_CHANGE, TRIGGER_PSNR = "trigger_max_change", "trigger_psnr"
METRICS = (ASR, VAL_ASR, CLEAN_ACC, VAL_CLEAN_ACC, CLEAN_ENCODER_ASR, VAL_CLEAN_ENCODER_ASR, CLEAN_ENCODER_ACC,
           N_POISONED, POISON_FRACTION, TRIGGER_MAX_CHANGE, TRIGGER_PSNR,
           *(m for m in ssl.METRICS if m != DEVICE_HOURS), DEVICE_HOURS)


@dataclass(frozen=True)
class Config(simclr.PoisonedConfig):
    downstream_dataset: str = "fashion_mnist"  # the downstream task (CTRL: the pre-training dataset)
    target_label: int = 0          # the poisoned class of the pre-training data and the downstream target
    poison_rate: float = 0.01      # poisoned images / whole pre-training set, all of class target_label
    magnitude: float = ctrl_ops.CTRL_MAGNITUDE  # added to each DCT coefficient (intensity units)
    positions: tuple[int, ...] = (15, 15, 31, 31)  # (u, v) pairs on a 32-pixel window, flattened
    window: int = 0                # DCT block side in pixels, 0 = the whole image
    components: str = "uv"         # YUV components perturbed on colour images (grey: the one channel)
    downstream_size: int = 5000    # downstream training images of the probe, 0 = all (a CPU choice)
    include_target_class: bool = False  # count target-class test images in ASR

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("downstream_dataset", self.downstream_dataset, data_mod.DATASETS)
        for name, ds in (("dataset", self.dataset), ("downstream_dataset", self.downstream_dataset)):
            k = data_mod.num_classes(ds)
            require(0 <= self.target_label < k, "target_label", self.target_label,
                    f"must be a class of {name}={ds}: 0..{k - 1}")
        in_open_unit("poison_rate", self.poison_rate)
        positive("magnitude", self.magnitude)
        require(len(self.positions) >= 2 and len(self.positions) % 2 == 0
                and all(0 <= p < ctrl_ops.REF_WINDOW for p in self.positions), "positions", self.positions,
                f"must be (u, v) pairs, flattened, each in 0..{ctrl_ops.REF_WINDOW - 1}")
        require(self.window >= 0, "window", self.window, "must be >= 0 (0 = the whole image)")
        if self.window:
            _, h = input_shape(self)
            require(h % self.window == 0, "window", self.window, f"must divide the image side {h} (or 0)")
        require(bool(self.components) and set(self.components) <= set("yuv")
                and len(set(self.components)) == len(self.components), "components", self.components,
                "must be distinct letters of 'yuv' (e.g. uv, y)")
        require(self.downstream_size >= 0, "downstream_size", self.downstream_size, "must be >= 0 (0 = all)")



def trigger(cfg: Config, output=None):
    """The CTRL trigger of a config (the same for every stage output of it)."""
    pairs = tuple(zip(cfg.positions[::2], cfg.positions[1::2]))
    return partial(ctrl_ops.apply_ctrl, magnitude=cfg.magnitude, positions=pairs, window=cfg.window,
                   components=cfg.components)


def poison(images: torch.Tensor, labels: torch.Tensor, stamp, *, rate: float, target: int,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The poisoned pre-training set: round(rate * N) (at least 1) seeded images of class `target`
    stamped in place. Returns (images, is_poisoned). Raises if the class has too few images."""
    n = max(1, round(rate * len(images)))
    pool = torch.nonzero(labels == target).flatten()
    if n > len(pool):
        fail("poison_rate", rate, f"must poison <= the {len(pool)} images of class {target} "
             f"(rate * {len(images)} = {n})")
    idx = pool[torch.randperm(len(pool), generator=gen)[:n]]
    out = images.clone()
    out[idx] = stamp(images[idx])
    mask = torch.zeros(len(images), dtype=torch.bool)
    mask[idx] = True
    return out, mask


def downstream_splits(cfg: Config, ctx, shape: tuple[int, int]) -> tuple[data_mod.ImageSet, ...]:
    """(train, val, test) of the downstream dataset at the encoder's input; `downstream_size` train."""
    c, h = shape
    dcfg = SimpleNamespace(dataset=cfg.downstream_dataset, train_size=cfg.downstream_size, image_size=h,
                           channels=c, val_fraction=cfg.val_fraction, seed=cfg.seed)
    return tuple(load_split(dcfg, ctx, s) for s in ("train", "val", "test"))


@register("ctrl", kind="encoder_attack", config=Config, metrics=METRICS, trigger=trigger)
def run(cfg: Config, ctx) -> None:

    torch.manual_seed(cfg.seed)
    stamp = trigger(cfg)
    train = ssl.load_splits(cfg, ctx).train
    c, h, _ = train.shape
    splits = downstream_splits(cfg, ctx, (c, h))

    def probe(encoder, device):
        return be.probe(encoder, splits, stamp, cfg.target_label, include_target_class=cfg.include_target_class,
                        seed=cfg.seed, device=device)

    clean_encoder, _ = ctx.load_model(cfg.clean_encoder(), role="encoder")  # upstream stage: cached, not charged
    base = probe(clean_encoder, ctx.device)
    images, is_poisoned = poison(train.images, train.labels, stamp, rate=cfg.poison_rate, target=cfg.target_label,
                                 gen=torch.Generator().manual_seed(cfg.seed + 17))
    changed = (images[is_poisoned] - train.images[is_poisoned])
    psnr = ctrl_ops.psnr(images[is_poisoned], train.images[is_poisoned])
    stats = {N_POISONED: float(is_poisoned.sum()), POISON_FRACTION: float(is_poisoned.float().mean()),
             TRIGGER_MAX_CHANGE: changed.abs().max().item(),
             TRIGGER_PSNR: psnr[torch.isfinite(psnr)].mean().item() if torch.isfinite(psnr).any() else float("inf")}
    log.info("ctrl: %d poisoned images of class %d, max change %.4f, PSNR %.1f dB; clean encoder ASR %.3f",
             int(stats[N_POISONED]), cfg.target_label, stats[TRIGGER_MAX_CHANGE], stats[TRIGGER_PSNR], base[ASR])

    backbone, args = ssl.backbone(cfg, train.shape)
    step = simclr.ntxent_step(cfg)

    def final(encoder, device):
        out = probe(encoder, device)
        log.info("ctrl linear probe on %s: ASR %.3f CA %.3f (clean encoder: ASR %.3f CA %.3f)",
                 cfg.downstream_dataset, out[ASR], out[CLEAN_ACC], base[ASR], base[CLEAN_ACC])
        return {**out, CLEAN_ENCODER_ASR: base[ASR], VAL_CLEAN_ENCODER_ASR: base[VAL_ASR],
                CLEAN_ENCODER_ACC: base[CLEAN_ACC], **stats}

    ssl.pretrain(cfg, ctx, simclr.SimCLR(backbone, cfg), step, arch_args=args, train_images=images,
                 final_evaluate=final)
