"""BadEncoder (Jia, Liu and Gong, "BadEncoder: Backdoor Attacks to Pre-trained Encoders in
Self-Supervised Learning", IEEE S&P 2022; docs/methods.md, "BadEncoder").

The attacker fine-tunes a clean pre-trained encoder f (the upstream stage `encoder`, by default a
SimCLR encoder pre-trained on Fashion-MNIST) into a backdoored encoder f' such that a trigger-stamped
input x (+) e is embedded like the attacker's reference inputs x_r of the target class of one target
downstream task, while clean inputs keep f's embeddings. With s the cosine similarity (embeddings
L2-normalised), the shadow data D_s and the reference inputs x_r:

    L0 = - mean_{x, r} s(f'(x (+) e), f'(x_r))     effectiveness
    L1 = - mean_r s(f'(aug(x_r)), f(x_r))          the references keep their clean embeddings
    L2 = - mean_x s(f'(x), f(x))                   utility
    L  = L0 + lambda1 L1 + lambda2 L2,   lambda1 = lambda2 = 1 (the slides' "Attack Setting")

(`secsweep.ops.badencoder`). Sign convention: every term is a negative cosine, minimised at -1. The
slide prints L0 without its minus sign; minimising +s would push triggered inputs away from the
reference, against the goal the same slide states, and the public code minimises the negative
similarity: the minus sign is kept.

What the slides leave open, and the choices made here (each a field):

* L1 is only in a slide image; its form is the public code's (above).
* Optimisation: the public code's SGD with momentum 0.9, weight decay 5e-4; its lr 0.001, batch 256
  and 200 epochs are `--preset paper`'s, the offline default is lr 0.05, batch 64, 25 epochs on 2,000
  shadow images (chosen for the CPU: the public recipe does not implant in the few hundred steps a
  CPU affords; the Config's comments give the measurements). BatchNorm frozen (eval mode and no gradient for its
  parameters: the running statistics of the clean encoder are kept). The clean encoder f is a
  frozen copy (eval mode, no gradient) of the upstream encoder; f' starts from the same weights.
* Trigger: a white square; the slides' example is the centre (`trigger_position="center"`), the
  default is the public code's corner (`"bottom_right"`: the centred square vanishes on bright
  Fashion-MNIST garments); its size is not stated: `trigger_size` 10 pixels on a 32x32 image (the public code's 10x10 white
  patch), scaled like BadNets' patch to other sizes (8 on 28x28). `trigger_position="bottom_right"`
  puts it in the corner, one (scaled) pixel from the borders, as the public code's trigger file.
* Reference inputs: "collected from the Internet" on the slides; here `n_reference` images of
  class `target_label` drawn (seeded) from the training split of the target downstream dataset
  `downstream_dataset` (its validation hold-out and test split are never used), resized to the
  encoder's input. The number is not stated ("at least one"; public code: 3): default 1, a choice.
* aug(x_r) in L1: the upstream encoder's own SSL augmentation (random resized crop, flip, colour
  jitter; `secsweep.ops.ssl.augment`) with the encoder's `crop_min` and `jitter`, drawn anew every step.
* Shadow data D_s: "the pre-training dataset" on the slides; here a seeded `shadow_size` subset of
  the upstream encoder's own pre-training images (its training split), unlabelled.

Reported every epoch: the three loss terms over the epoch (`effectiveness_loss` L0,
`reference_loss` L1, `utility_loss` L2; means over the shadow batches), and cheap kNN-free monitors
on shadow-distribution images the attack never trained on: `trigger_similarity` = mean
s(f'(x (+) e), f'(x_r)) (= -L0; on the pre-training test split) and `clean_similarity` = mean
s(f'(x), f(x)) (= -L2), with `val_` twins on the pre-training validation hold-out, and the clean
encoder's trigger similarity before the attack (`trigger_similarity_before`). Downstream, a linear
probe (`secsweep.ops.ssl.linear_probe`, classifier-only) on f' features of the downstream training
split gives `asr`/`clean_acc` (test) and `val_asr`/`val_clean_acc` (validation hold-out) every
epoch: the kind's objectives. The full downstream evaluation (an MLP head, classifier-only or
whole-model fine-tuning, BA against CA of the clean encoder) is the `downstream` trainable.

Output: the backdoored encoder as the model artifact `encoder` (the upstream card's architecture,
arguments and input contract), and the `trigger=` hook that rebuilds the trigger.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from secsweep import data as data_mod
from secsweep import refs
from secsweep.backdoor import load_split
from secsweep.config import fail, one_of, positive, require
from secsweep.loop import OPTIMIZERS, fit, is_batchnorm
from secsweep.names import ASR, CLEAN_ACC, DEVICE_HOURS, VAL_ASR, VAL_CLEAN_ACC
from secsweep.ops import ssl as ssl_ops
from secsweep.ops.badencoder import LAMBDA1, LAMBDA2, badencoder_loss
from secsweep.ops.triggers import badnets_patch_size
from secsweep.poison import triggered_test_set
from secsweep.refs import StageRef
from secsweep.registry import register
from secsweep.ssl import features_of

log = logging.getLogger(__name__)

EFFECTIVENESS, REFERENCE, UTILITY = "effectiveness_loss", "reference_loss", "utility_loss"
TRIGGER_SIM, VAL_TRIGGER_SIM = "trigger_similarity", "val_trigger_similarity"
CLEAN_SIM, VAL_CLEAN_SIM = "clean_similarity", "val_clean_similarity"
TRIGGER_SIM_BEFORE = "trigger_similarity_before"
METRICS = (EFFECTIVENESS, REFERENCE, UTILITY, TRIGGER_SIM, VAL_TRIGGER_SIM, CLEAN_SIM, VAL_CLEAN_SIM,
           ASR, VAL_ASR, CLEAN_ACC, VAL_CLEAN_ACC, DEVICE_HOURS)

POSITIONS = ("center", "bottom_right")
# the downstream linear probe: 30 epochs of batches of 512 (ssl_ops.linear_probe's Adam; its default
# 100 x 256 costs as much as several attack epochs on a CPU and changes the accuracies by < 1 point)
PROBE_EPOCHS, PROBE_BATCH = 30, 512
TRIGGER_REF_SIZE = 32  # pixels: the image side `trigger_size` refers to (the public code's CIFAR-10)


def white_square(x: torch.Tensor, size: int = 10, position: str = "center", value: float = 1.0) -> torch.Tensor:
    """Stamp a square of intensity `value` on (N, C, H, W) or (C, H, W) images in [0, 1] (a copy).

    `size` is the side in pixels on a 32x32 image, scaled (floored, at least 1) to the image like
    BadNets' patch (`badnets_patch_size`); `position` "center" or "bottom_right" (one scaled
    pixel from the bottom and right borders, the public code's 21..30 on 32x32)."""
    h, w = x.shape[-2:]
    s = min(badnets_patch_size(h, w, size, TRIGGER_REF_SIZE), h, w)
    if position == "center":
        top, left = (h - s) // 2, (w - s) // 2
    elif position == "bottom_right":
        margin = max(0, min(h, w) // TRIGGER_REF_SIZE)  # 1 on 32x32 and larger, 0 below
        top, left = h - margin - s, w - margin - s
    else:
        raise ValueError(f"position={position!r}: must be one of {', '.join(POSITIONS)}")
    out = x.clone()
    out[..., top : top + s, left : left + s] = value
    return out


@dataclass(frozen=True)
class Config:
    # the clean pre-trained encoder f (kind "encoder"); the shadow data are its pre-training images
    encoder: StageRef = field(default_factory=lambda: StageRef("simclr"))
    downstream_dataset: str = "mnist"  # the target downstream task: reference inputs and the probe
    target_label: int = 0              # target class of the downstream task (slides: per task; not stated)
    # The offline default is an implanting recipe, not the public code's (`--preset paper` in
    # sweeps/badencoder.py and sweeps/encoder_scenario.py gives that: centre/corner 10 px, SGD 0.001,
    # batch 256, 200 epochs, the whole pre-training set). The public recipe does not implant at CPU
    # scale (SimCLR on 3,000 Fashion-MNIST images -> MNIST: ASR 0.011 after 5 epochs on 2,000 shadow
    # images); the choices below were measured there (docs/methods.md, "BadEncoder").
    n_reference: int = 1               # reference inputs (slides: ">= 1"; public code: 3 per task). Chosen
    #                                    for the offline CPU default: the 25-epoch recipe was measured with 1
    shadow_size: int = 2000            # shadow images from the pre-training split, 0 = all (public code:
    #                                    all 50,000). Chosen for the offline CPU default: 2,000 x 25 epochs
    trigger_size: int = 10             # square side in pixels on 32x32 (public code: 10; slides: not stated)
    # bottom_right (the public code's trigger file; the slides' example is the centre). Chosen for the
    # offline CPU default: a centred white square vanishes on bright garments of the Fashion-MNIST
    # shadow data (measured ASR 0.134 corner vs 0.010 centre at equal steps)
    trigger_position: str = "bottom_right"
    trigger_value: float = 1.0         # intensity in [0, 1] (1 = white, the slides' "white square")
    lambda1: float = LAMBDA1           # weight of L1 (slides: 1)
    lambda2: float = LAMBDA2           # weight of L2 (slides: 1)
    # fine-tuning epochs over the shadow data (public code: 200). Chosen for the offline CPU default:
    # 25 x 2,000 / 64 = 800 steps (ASR 0.71 at 25 epochs vs 0.01-0.13 at 5-6, docs/methods.md)
    epochs: int = 25
    optimizer: str = "sgd"             # sgd (public code), adam, adamw, lars (secsweep.loop)
    # learning rate per step (public code: SGD 0.001). Chosen for the offline CPU default: 0.05 with
    # batch 64 moves the embeddings in the few hundred steps a CPU affords
    lr: float = 0.05
    momentum: float = 0.9              # SGD momentum (public code)
    weight_decay: float = 5e-4         # L2 weight decay (public code)
    batch_size: int = 64               # shadow images per step (public code: 256; 64 = more steps per epoch)
    monitor_size: int = 500            # held-out images per split for the similarity monitors
    include_target_class: bool = False  # count target-class test images in ASR (as VictimConfig)
    val_fraction: float = 0.1          # downstream validation hold-out (the probe selects on it)
    seed: int = 0                      # shadow and reference draws, augmentation, probe

    def __post_init__(self) -> None:
        refs.check(self, "encoder", kinds=("encoder",))
        one_of("downstream_dataset", self.downstream_dataset, data_mod.DATASETS)
        n_classes = data_mod.num_classes(self.downstream_dataset)
        require(0 <= self.target_label < n_classes, "target_label", self.target_label,
                f"must be a class of {self.downstream_dataset}: 0..{n_classes - 1}")
        require(self.n_reference >= 1, "n_reference", self.n_reference, "must be >= 1 reference input")
        require(self.shadow_size >= 0, "shadow_size", self.shadow_size, "must be >= 0 (0 = the whole split)")
        require(self.trigger_size >= 1, "trigger_size", self.trigger_size, "must be >= 1 pixel")
        one_of("trigger_position", self.trigger_position, POSITIONS)
        require(0.0 <= self.trigger_value <= 1.0, "trigger_value", self.trigger_value, "must be in [0, 1]")
        for name in ("lambda1", "lambda2"):
            require(getattr(self, name) >= 0.0, name, getattr(self, name), "must be >= 0")
        require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        positive("lr", self.lr)
        require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        require(self.monitor_size >= 1, "monitor_size", self.monitor_size, "must be >= 1")
        require(0.0 < self.val_fraction <= 0.5, "val_fraction", self.val_fraction, "must be in (0, 0.5]")


def trigger(cfg: Config, output=None):
    """The trigger x (+) e of a BadEncoder config (the same for every stage output of it)."""
    return partial(white_square, size=cfg.trigger_size, position=cfg.trigger_position, value=cfg.trigger_value)


class BadEncoderModel(nn.Module):
    """f' (trained) and the frozen clean copy f: both in one module so one checkpoint holds both."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.backdoored = encoder
        self.clean = copy.deepcopy(encoder)


def downstream_splits(cfg: Config, ctx, shape: tuple[int, int]) -> tuple[data_mod.ImageSet, ...]:
    """(train, val, test) of the downstream dataset at the encoder's input (channels, size)."""
    c, h = shape
    dcfg = SimpleNamespace(dataset=cfg.downstream_dataset, train_size=0, image_size=h, channels=c,
                           val_fraction=cfg.val_fraction, seed=cfg.seed)
    return tuple(load_split(dcfg, ctx, s) for s in ("train", "val", "test"))


def _cap(ds: data_mod.ImageSet, n: int) -> data_mod.ImageSet:
    return ds.subset(torch.arange(min(len(ds), n)))


def probe(encoder: nn.Module, splits, stamp, target_label: int, *, include_target_class: bool, seed: int,
          device) -> dict[str, float]:
    """Classifier-only linear probe on `encoder` features of the downstream (train, val, test)
    `splits`, then ASR (triggered non-target images classified as `target_label`) and CA/BA, test
    and `val_` versions (shared by the encoder victims that train with this recipe)."""
    d_train, d_val, d_test = splits
    out = {}
    train_f = features_of(encoder, d_train.images, device)
    feats = {name: features_of(encoder, ds.images, device) for name, ds in (("val", d_val), ("test", d_test))}
    res = ssl_ops.linear_probe(train_f, d_train.labels, feats["test"], d_test.labels, val_feats=feats["val"],
                               val_labels=d_val.labels, num_classes=d_train.num_classes, seed=seed,
                               epochs=PROBE_EPOCHS, batch_size=PROBE_BATCH)
    for prefix, ds in (("val_", d_val), ("", d_test)):
        tx, ty = triggered_test_set(ds.images, ds.labels, stamp, target_label,
                                    include_target_class=include_target_class)
        pred = res.head(features_of(encoder, tx, device)).argmax(1)
        out[prefix + ASR] = (pred == target_label).float().mean().item() if len(ty) else 0.0
    out[CLEAN_ACC], out[VAL_CLEAN_ACC] = res.test_acc, float(res.val_acc)
    return out


@register("badencoder", kind="encoder_attack", config=Config, metrics=METRICS, trigger=trigger)
def run(cfg: Config, ctx) -> None:
    implant(cfg, ctx)


def implant(cfg: Config, ctx, *, extra=None) -> None:
    """BadEncoder's training (the module docstring). `extra` (DRUPE) adds to it: an object with
    `setup(state)` (before training; `state` has references, clean, stamp, downstream = (train,
    val, test), device), `loss(zt=, z=, zr=, fx=, fr=, gen=) -> (weighted term, {name: term})` added to
    every step's loss (the step's f'(x (+) e), f'(x), f'(x_r), f(x), f(x_r) and generator), and
    `evaluate(backdoored, device) -> dict` (every epoch's monitors)."""
    torch.manual_seed(cfg.seed)
    enc_cfg = cfg.encoder.config()
    clean, card = ctx.load_model(cfg.encoder, role="encoder")
    stamp = trigger(cfg)

    # shadow data: a seeded subset of the encoder's pre-training images (labels dropped), loaded
    # as the encoder was trained: its input contract
    pool = load_split(enc_cfg, ctx, "train")
    c, h, _ = pool.shape
    if cfg.shadow_size > len(pool):
        fail("shadow_size", cfg.shadow_size, f"must be <= the {len(pool)} pre-training images of encoder "
             f"{cfg.encoder.trainable} (encoder.train_size={enc_cfg.train_size}), or 0 for all")
    g = torch.Generator().manual_seed(cfg.seed + 3)
    n = cfg.shadow_size or len(pool)
    shadow = pool.subset(torch.randperm(len(pool), generator=g)[:n].sort().values).unlabelled()
    held_val = _cap(load_split(enc_cfg, ctx, "val"), cfg.monitor_size)
    held_test = _cap(load_split(enc_cfg, ctx, "test"), cfg.monitor_size)

    # reference inputs: target-class images of the downstream training split
    d_train, d_val, d_test = downstream_splits(cfg, ctx, (c, h))
    of_target = torch.nonzero(d_train.labels == cfg.target_label).flatten()
    if len(of_target) < cfg.n_reference:
        fail("n_reference", cfg.n_reference, f"must be <= the {len(of_target)} images of class "
             f"{cfg.target_label} in the {cfg.downstream_dataset} training split")
    g = torch.Generator().manual_seed(cfg.seed + 11)
    references = d_train.images[of_target[torch.randperm(len(of_target), generator=g)[: cfg.n_reference]]]
    crop = (getattr(enc_cfg, "crop_min", ssl_ops.CROP_SCALE[0]), 1.0)
    jitter = getattr(enc_cfg, "jitter", ssl_ops.JITTER)

    model = BadEncoderModel(clean)
    parts = {k: torch.zeros((), dtype=torch.float64) for k in (EFFECTIVENESS, REFERENCE, UTILITY)}
    seen = [0]

    def step(m, x, y, gen):
        bare = getattr(m, "module", m)
        refs_x = references.to(x.device)
        with torch.no_grad():  # f is frozen: its embeddings carry no gradient
            fx, fr = bare.clean(x), bare.clean(refs_x)
        aug = ssl_ops.augment(refs_x, gen, crop_scale=crop, jitter=jitter)
        zt, z, zr, zra = (bare.backdoored(v) for v in (stamp(x), x, refs_x, aug))
        loss = badencoder_loss(zt, zr, zra, fr, z, fx, lambda1=cfg.lambda1, lambda2=cfg.lambda2)
        for k, v in zip((EFFECTIVENESS, REFERENCE, UTILITY), loss[1:]):
            parts[k] = parts[k].to(v.device) + v.detach().double() * len(x)
        seen[0] += len(x)
        if extra is not None:
            term, named = extra.loss(zt=zt, z=z, zr=zr, fx=fx, fr=fr, gen=gen)
            return loss.total + term, named
        return loss.total

    def similarities(backdoored, device, images, prefix=""):
        zr = F.normalize(features_of(backdoored, references, device), dim=1)
        zt = F.normalize(features_of(backdoored, stamp(images), device), dim=1)
        z = features_of(backdoored, images, device)
        fx = features_of(model.clean, images, device)
        return {prefix + TRIGGER_SIM: (zt @ zr.T).mean().item(),
                prefix + CLEAN_SIM: F.cosine_similarity(z, fx, dim=1).mean().item()}

    def evaluate(m, device):
        bare = getattr(m, "module", m)
        out = {k: (parts[k] / max(seen[0], 1)).item() for k in parts}
        for k in parts:
            parts[k] = torch.zeros((), dtype=torch.float64)
        seen[0] = 0
        out.update(similarities(bare.backdoored, device, held_val.images, "val_"))
        out.update(similarities(bare.backdoored, device, held_test.images))
        if extra is not None:
            out.update(extra.evaluate(bare.backdoored, device))
        log.info("badencoder epoch: L0 %.3f L1 %.3f L2 %.3f trigger_sim %.3f clean_sim %.3f",
                 out[EFFECTIVENESS], out[REFERENCE], out[UTILITY], out[TRIGGER_SIM], out[CLEAN_SIM])
        return out

    def final(m, device):
        out = probe(getattr(m, "module", m).backdoored, (d_train, d_val, d_test), stamp, cfg.target_label,
                    include_target_class=cfg.include_target_class, seed=cfg.seed, device=device)
        log.info("badencoder linear probe on %s: ASR %.3f BA %.3f", cfg.downstream_dataset, out[ASR], out[CLEAN_ACC])
        return out

    before = similarities(model.clean, ctx.device, held_test.images)[TRIGGER_SIM]
    if extra is not None:
        extra.setup(SimpleNamespace(references=references, clean=model.clean, stamp=stamp,
                                    downstream=(d_train, d_val, d_test), device=ctx.device))
    bn = [m for m in model.backdoored.modules() if is_batchnorm(m)]
    trained = fit(model, (shadow.images, None), ctx, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                  step=step, opt=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                  frozen=[model.clean, *bn], freeze_batchnorm=True, evaluate=evaluate, final_evaluate=final,
                  extra={TRIGGER_SIM_BEFORE: before})
    ctx.save_model("encoder", trained.backdoored, card.arch, dict(card.args), "encoder", input=card.input)
