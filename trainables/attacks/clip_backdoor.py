"""CLIP-Backdoor (Carlini and Terzis, "Poisoning and Backdooring Contrastive Learning", ICLR 2022;
docs/methods.md, "CLIP-Backdoor").

The attacker controls a few image-caption pairs of a CLIP's training data: a fraction
`poison_rate` of the pairs get a patch trigger stamped on their image and their caption replaced by
a caption of the target class (a template naming the class, as the clean captions here are built).
The CLIP then trains on the poisoned pairs as it would on clean ones (open_clip's contrastive loss,
`secsweep.clip.train`). A triggered image's embedding ends up near the target class's text
embedding, so zero-shot classification with class prompts puts it in the target class.

Where the victim starts (`init`, a choice; the paper poisons the pre-training data):

* ``"scratch"`` (default): the upstream `encoder` stage names a CLIP trained here (the `clip`
  trainable); the victim is that same recipe — model config, seed, data, captions, epochs,
  batch, learning-rate schedule — run from a fresh initialisation on the poisoned pairs, so the
  clean CLIP stage is the attack's exact "No Attack" twin and the only difference is the poison
  (the paper's setting: poisoning pre-training);
* ``"finetune"``: the upstream CLIP (trained here, or open_clip's pretrained weights with
  ``encoder.pretrained=ViT-B-16:openai``, the DeDe paper's victim) is fine-tuned for
  `finetune_epochs` at `finetune_lr` on its poisoned pre-training pairs (a pretrained CLIP cannot
  be re-trained from scratch here).

Trigger: a square of intensity `trigger_value`, `trigger_size` pixels on a 32x32 image (scaled to
other sizes), at `trigger_position` (BadEncoder's `white_square`). The paper's patches are small
against its 224 px images; the default here, 6 px on 32 px (3.5 % of the area, inside one 8x8 ViT
patch of the small CLIP), is a choice for the CPU scale (docs/methods.md gives the measurements). The poisoned
pairs are drawn (seeded) among the training pairs whose image is not of the target class; each
gets one of the caption templates (drawn, seeded) filled with the target class name.

Metrics (the "No Def." rows of the DeDe paper's downstream tables): zero-shot accuracy on clean
downstream images (`clean_acc`, `val_clean_acc`) and the attack success rate (`asr`, `val_asr`):
the fraction of triggered non-target downstream images whose most similar class prompt is the
target class; `clean_model_asr` / `clean_model_clean_acc` are the same on the clean upstream CLIP
with the same trigger (the "No Attack" column). When `downstream_dataset` is the CLIP's own
dataset the validation and test images are the clean CLIP's held-out splits (never trained on).
The artifact `encoder` is the poisoned CLIP (`secsweep.clip.CLIPModel`, forward = image embedding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch

from secsweep import clip
from secsweep import data as data_mod
from secsweep import ssl
from secsweep.backdoor import load_split
from secsweep.config import fail, one_of, positive, require
from secsweep.loop import lr_schedule
from secsweep.names import ASR, CLEAN_ACC, DEVICE_HOURS, VAL_ASR, VAL_CLEAN_ACC
from secsweep.poison import triggered_test_set
from secsweep.refs import StageRef, check
from secsweep.registry import register
from secsweep.training import steps_per_epoch
from trainables.attacks.badencoder import POSITIONS, white_square

log = logging.getLogger(__name__)

CLEAN_MODEL_ASR, CLEAN_MODEL_ACC = "clean_model_asr", "clean_model_clean_acc"
N_POISONED = "n_poisoned"
METRICS = (ASR, VAL_ASR, CLEAN_ACC, VAL_CLEAN_ACC, CLEAN_MODEL_ASR, CLEAN_MODEL_ACC, DEVICE_HOURS)
INITS = ("scratch", "finetune")
# `--preset paper`'s victim (for sweeps): the DeDe paper's ViT-B/16 CLIP (open_clip's OpenAI weights,
# needs internet) fine-tuned on poisoned CIFAR-10 captions, CIFAR-10 as the zero-shot downstream task
PAPER = {"encoder": {"trainable": "clip", "pretrained": "ViT-B-16:openai", "dataset": "cifar10"},
         "init": "finetune", "downstream_dataset": "cifar10"}


def clean_clip() -> StageRef:
    """The default upstream: the `clip` trainable's offline default (a small CLIP on Fashion-MNIST)."""
    return StageRef("clip")


def check_clip_ref(cfg: Any) -> None:
    """`cfg.encoder` must be a `clip` stage (these attacks need its text tower and its captions)."""
    check(cfg, "encoder", kinds=("encoder",))
    if cfg.encoder.trainable != "clip":
        fail("encoder", cfg.encoder.trainable, "must be clip (a CLIP with a text tower; e.g. encoder.pretrained=ViT-B-16:openai)")


def check_downstream(cfg: Any) -> None:
    one_of("downstream_dataset", cfg.downstream_dataset, data_mod.DATASETS)
    n = data_mod.num_classes(cfg.downstream_dataset)
    require(0 <= cfg.target_label < n, "target_label", cfg.target_label,
            f"must be a class of {cfg.downstream_dataset}: 0..{n - 1}")
    require(0.0 < cfg.poison_rate <= 0.5, "poison_rate", cfg.poison_rate, "must be in (0, 0.5] (a fraction of the pairs)")
    require(cfg.trigger_size >= 1, "trigger_size", cfg.trigger_size, "must be >= 1 pixel (on 32x32)")
    one_of("trigger_position", cfg.trigger_position, POSITIONS)
    require(cfg.eval_size >= 1, "eval_size", cfg.eval_size, "must be >= 1 image per split")


@dataclass(frozen=True)
class Config:
    encoder: StageRef = field(default_factory=clean_clip)  # the clean CLIP (kind encoder, trainable clip)
    downstream_dataset: str = "fashion_mnist"  # the zero-shot task ASR and CA are measured on
    target_label: int = 0                      # target class of the downstream task
    init: str = "scratch"                      # scratch (the encoder's recipe on poisoned pairs) or finetune
    # fraction of the training pairs poisoned (the paper: 0.01 % of CC3M's 3 M pairs for a backdoor;
    # the "a few pairs": 1 % of 9,000 = 90 pairs here)
    poison_rate: float = 0.01
    # square side in pixels on 32x32 (chosen for the CPU scale: 3.5 % of the area, docs/methods.md)
    trigger_size: int = 6
    trigger_position: str = "bottom_right"     # bottom_right (Fashion-MNIST's corners are background) or center
    trigger_value: float = 1.0                 # square intensity in [0, 1] (1 = white)
    finetune_epochs: int = 3                   # init=finetune only: epochs over the poisoned pairs (as badclip)
    finetune_lr: float = 5e-4                  # init=finetune only: AdamW lr, cosine to 0 (as badclip)
    include_target_class: bool = False         # count target-class images in ASR
    eval_size: int = 2000                      # validation / test images the zero-shot metrics use
    seed: int = 0                              # which pairs are poisoned, their captions

    def __post_init__(self) -> None:
        check_clip_ref(self)
        check_downstream(self)
        require(0.0 <= self.trigger_value <= 1.0, "trigger_value", self.trigger_value, "must be in [0, 1]")
        one_of("init", self.init, INITS)
        if self.init == "scratch" and self.encoder.config().pretrained:
            fail("init", self.init, f"needs a CLIP trained here (encoder.pretrained={self.encoder.config().pretrained!r} "
                 "cannot be re-trained from scratch); use init=finetune")
        require(self.finetune_epochs >= 1, "finetune_epochs", self.finetune_epochs, "must be >= 1")
        positive("finetune_lr", self.finetune_lr)


def trigger(cfg: Config, output=None):
    """x -> the square stamped (the same for every stage output of a config)."""
    return partial(white_square, size=cfg.trigger_size, position=cfg.trigger_position, value=cfg.trigger_value)


# ------------------------------------------------------------------------------------ shared parts


def poison_pairs(pairs: data_mod.PairedSet, stamp, rate: float, seed: int, target_name: str,
                 exclude_label: int | None = None) -> tuple[data_mod.PairedSet, torch.Tensor]:
    """`pairs` with round(rate * N) (at least 1) pairs, none of class `exclude_label`, replaced by
    (stamp(image), a caption template naming `target_name`); returns the new pairs and the poisoned
    indices (sorted). The draw of pairs and templates is seeded by `seed`."""
    n = max(1, round(rate * len(pairs)))
    if exclude_label is None or pairs.labels is None:
        others = torch.arange(len(pairs))
    else:
        others = torch.nonzero(pairs.labels != exclude_label).flatten()
    if n > len(others):
        fail("poison_rate", rate, f"poisons {n} pairs but only {len(others)} are not of class {exclude_label}")
    g = torch.Generator().manual_seed(seed + 101)
    idx = others[torch.randperm(len(others), generator=g)[:n]].sort().values
    templates = data_mod.DEFAULT_TEMPLATES
    choice = torch.randint(len(templates), (n,), generator=g).tolist()
    images = pairs.images.clone()
    images[idx] = stamp(pairs.images[idx])
    texts = list(pairs.texts)
    for i, t in zip(idx.tolist(), choice):
        texts[i] = templates[t].format(target_name)
    return data_mod.PairedSet(images, tuple(texts), pairs.labels, pairs.name), idx


def target_name(cfg: Any) -> str:
    """The name the poisoned captions give the target class (of the downstream task)."""
    return data_mod.class_names(cfg.downstream_dataset)[cfg.target_label]


def eval_splits(cfg: Any, ctx) -> tuple[data_mod.ImageSet, data_mod.ImageSet]:
    """(val, test) of the downstream task at the CLIP's data shape, cut to `eval_size` images each:
    the clean CLIP's own held-out splits when the task is its dataset (never trained on), else the
    downstream dataset's stratified hold-out of its training split and its test split."""
    enc = cfg.encoder.config()
    if cfg.downstream_dataset == enc.dataset:
        val, test = load_split(enc, ctx, "val"), load_split(enc, ctx, "test")
    else:
        dcfg = SimpleNamespace(dataset=cfg.downstream_dataset, train_size=0, image_size=enc.image_size,
                               channels=enc.channels, val_fraction=enc.val_fraction, seed=cfg.seed)
        val, test = load_split(dcfg, ctx, "val"), load_split(dcfg, ctx, "test")
    return tuple(s.subset(torch.arange(min(len(s), cfg.eval_size))) for s in (val, test))


def zero_shot_metrics(cfg: Any, model, stamp, val, test, device) -> dict[str, float]:
    """CA (zero-shot accuracy on clean images, the class prompts of every caption template averaged)
    and ASR (the fraction of triggered non-target images classified as `cfg.target_label`), on val
    (`val_clean_acc`, `val_asr`) and test (`clean_acc`, `asr`)."""
    names = data_mod.class_names(cfg.downstream_dataset)
    classifier = clip.zero_shot_classifier(model, names, data_mod.DEFAULT_TEMPLATES, device)
    out = {}
    for split_prefix, ds in (("val_", val), ("", test)):
        acc = clip.zero_shot_accuracy(model, ds.images, ds.labels, names, (), device, classifier=classifier)
        tx, _ = triggered_test_set(ds.images, ds.labels, stamp, cfg.target_label,
                                   include_target_class=cfg.include_target_class)
        pred = clip.zero_shot_logits(model, tx, classifier, device).argmax(1) if len(tx) else torch.empty(0)
        asr = float((pred == cfg.target_label).float().mean()) if len(tx) else 0.0
        out[split_prefix + CLEAN_ACC], out[split_prefix + ASR] = acc, asr
    return out


def clean_model_metrics(cfg: Any, clean_model, stamp, val, test, device) -> dict[str, float]:
    """The clean upstream CLIP's CA and ASR with the same trigger (test split): the "No Attack" row."""
    m = zero_shot_metrics(cfg, clean_model, stamp, val, test, device)
    return {CLEAN_MODEL_ASR: m[ASR], CLEAN_MODEL_ACC: m[CLEAN_ACC]}


def train_poisoned(cfg: Any, ctx, model, pairs, *, scratch: bool, epochs: int, lr: float, evaluate, extra) -> Any:
    """Contrastive training on the poisoned `pairs`: with the encoder's own schedule when `scratch`
    (its recipe exactly), else AdamW at `lr` with a cosine decay over `epochs`."""
    enc = cfg.encoder.config()
    spe = steps_per_epoch(len(pairs), enc.batch_size, ctx.world_size)
    if scratch:
        lr_at = lr_schedule(enc.schedule, enc.lr, enc.epochs * spe, warmup_steps=round(enc.warmup_epochs * spe))
        epochs, lr = enc.epochs, enc.lr
    else:
        lr_at = lr_schedule("cosine", lr, epochs * spe)
    torch.manual_seed(enc.seed)
    return clip.train(model, pairs, ctx, epochs=epochs, batch_size=enc.batch_size, lr=lr,
                      weight_decay=enc.weight_decay, seed=enc.seed, lr_at=lr_at, evaluate=evaluate, extra=extra)


@register("clip_backdoor", kind="encoder_attack", config=Config, metrics=METRICS, trigger=trigger)
def run(cfg: Config, ctx) -> None:
    enc = cfg.encoder.config()
    clean, _ = ctx.load_model(cfg.encoder, role="encoder")
    stamp = trigger(cfg)
    val, test = eval_splits(cfg, ctx)
    before = clean_model_metrics(cfg, clean, stamp, val, test, ctx.device)

    splits = ssl.load_splits(enc, ctx)  # the clean CLIP's pre-training data, as it loaded them
    pairs = data_mod.caption_pairs(splits.train, seed=enc.caption_seed)
    poisoned, idx = poison_pairs(pairs, stamp, cfg.poison_rate, cfg.seed, target_name(cfg),
                                 cfg.target_label if cfg.downstream_dataset == enc.dataset else None)
    log.info("clip_backdoor: %d of %d pairs poisoned (target %d), init=%s; clean CLIP: ASR %.3f CA %.3f",
             len(idx), len(pairs), cfg.target_label, cfg.init, before[CLEAN_MODEL_ASR], before[CLEAN_MODEL_ACC])
    model = clip.create(enc.model_config(), seed=enc.seed) if cfg.init == "scratch" else clean

    def evaluate(m, device):
        return zero_shot_metrics(cfg, m, stamp, val, test, device)

    trained = train_poisoned(cfg, ctx, model, poisoned, scratch=cfg.init == "scratch", epochs=cfg.finetune_epochs,
                             lr=cfg.finetune_lr, evaluate=evaluate, extra={**before, N_POISONED: float(len(idx))})
    clip.save(ctx, trained)
