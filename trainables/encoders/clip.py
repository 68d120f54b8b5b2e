"""CLIP pre-training (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021; docs/methods.md, "CLIP models").

An image tower and a text tower are trained so that each image's embedding is closest, by cosine
similarity at a learned temperature, to its own caption's embedding among the batch (open_clip's
`ClipLoss`, both directions; `secsweep.clip`). Offline default: a small CLIP from a custom open_clip
config (a 2-block ViT on 32x32 images with 8x8 patches, a 2-block text transformer over 20 BPE
tokens, embeddings of 64) trained on Fashion-MNIST images with captions from class-name templates
(`secsweep.data.caption_pairs`: "a photo of a {class}." and five other wordings, one drawn per
image) — a stand-in for real captions, which need downloading (MSCOCO, Flickr30k). With
`pretrained="ViT-B-32:openai"` (any open_clip MODEL:TAG, or MODEL:/path/to/checkpoint) it loads
open_clip's pretrained weights instead (online) and does not train.

Metrics: zero-shot accuracy (each image's most similar class prompt, the prompts of the caption
templates averaged per class) on the validation and test splits (`val_zero_shot_acc`,
`zero_shot_acc`), and the kNN monitor of the SSL encoders on the image embeddings (`val_knn_acc`,
`knn_acc`). The `encoder` artifact is the whole two-tower CLIP (`secsweep.clip.CLIPModel`): its
forward is the image embedding; `clip.encode_images` / `clip.encode_texts` give both towers'.

Defaults: batch 64, AdamW lr 5e-4 with a cosine schedule, weight decay 0.1, logit scale initialised
at ln(1/0.07) and clamped to ln(100) (CLIP paper / open_clip). Not the paper's scale: its ViT-B/32
trained 32 epochs on 400 M pairs at batch 32,768 with lr 5e-4 and weight decay 0.2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from secsweep import clip
from secsweep import data as data_mod
from secsweep import ssl
from secsweep.config import one_of, positive, require
from secsweep.loop import SCHEDULES, lr_schedule
from secsweep.names import DEVICE_HOURS, EPOCH
from secsweep.registry import register
from secsweep.training import steps_per_epoch

ZERO_SHOT_ACC, VAL_ZERO_SHOT_ACC = "zero_shot_acc", "val_zero_shot_acc"
METRICS = (ZERO_SHOT_ACC, VAL_ZERO_SHOT_ACC, ssl.KNN_ACC, ssl.VAL_KNN_ACC, DEVICE_HOURS)


@dataclass(frozen=True)
class Config:
    dataset: str = "fashion_mnist"   # images; captions name their classes (data.caption_pairs)
    train_size: int = 10000          # image-caption pairs (train + val), 0 = the whole training split
    image_size: int = 32             # pixels per side the images are resized to (and the ViT's input size)
    channels: int = 0                # 0 = native (grey images are repeated to 3 channels by the model)
    epochs: int = 5
    batch_size: int = 64             # pairs per step: each image's caption against 63 others
    lr: float = 5e-4                 # AdamW peak learning rate (CLIP paper ViT-B/32: 5e-4)
    weight_decay: float = 0.1        # AdamW decoupled weight decay (CLIP paper: 0.2; 0.1 measured here)
    schedule: str = "cosine"         # constant, cosine, warmup_cosine (per step)
    warmup_epochs: float = 0.0       # linear warm-up (warmup_cosine)
    embed_dim: int = 64              # shared image-text embedding width
    vision_width: int = 64           # ViT token width
    vision_layers: int = 2           # ViT blocks
    vision_patch: int = 8            # ViT patch side in pixels (8 at 32 px: 16 patches; 4 trained slower and worse here)
    text_width: int = 64             # text transformer width
    text_layers: int = 2             # text transformer blocks
    head_width: int = 32             # channels per attention head (both towers)
    context_length: int = 20         # BPE tokens per caption (the templates need <= 17)
    caption_seed: int = 0            # seed of the template drawn for each image
    pretrained: str = ""             # "" = train here; "MODEL:TAG" = open_clip's pretrained weights (online)
    knn_k: int = 200                 # neighbours of the kNN monitor (lightly benchmarks: 200)
    knn_temperature: float = 0.1     # kNN vote temperature (lightly benchmarks: 0.1)
    monitor_size: int = 2000         # kNN bank size; validation and test splits are cut to it too
    val_fraction: float = 0.1        # fraction of the training split held out as validation
    seed: int = 0

    def __post_init__(self) -> None:
        one_of("dataset", self.dataset, data_mod.DATASETS)
        require(self.train_size >= 0, "train_size", self.train_size, "must be >= 0 (0 = all)")
        require(self.image_size >= 8, "image_size", self.image_size, "must be >= 8 pixels")
        require(self.channels in (0, 1, 3), "channels", self.channels, "must be 0 (native), 1 or 3")
        require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        require(self.batch_size >= 2, "batch_size", self.batch_size, "must be >= 2 (a contrastive loss needs negatives)")
        positive("lr", self.lr)
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        one_of("schedule", self.schedule, SCHEDULES)
        require(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "must be >= 0")
        for name in ("embed_dim", "vision_width", "vision_layers", "vision_patch", "text_width", "text_layers",
                     "head_width", "knn_k", "monitor_size"):
            positive(name, getattr(self, name))
        require(self.image_size % self.vision_patch == 0, "vision_patch", self.vision_patch,
                f"must divide image_size={self.image_size}")
        require(self.vision_width % self.head_width == 0, "vision_width", self.vision_width,
                f"must be a multiple of head_width={self.head_width}")
        require(self.text_width % self.head_width == 0, "text_width", self.text_width,
                f"must be a multiple of head_width={self.head_width}")
        require(self.context_length >= 2, "context_length", self.context_length, "must be >= 2 (start and end tokens)")
        positive("knn_temperature", self.knn_temperature)
        require(0.0 < self.val_fraction <= 0.5, "val_fraction", self.val_fraction, "must be in (0, 0.5]")
        if self.pretrained:
            clip.parse_pretrained(self.pretrained)

    def model_config(self) -> dict:
        """The open_clip model config of the small CLIP trained here."""
        return clip.small_config(embed_dim=self.embed_dim, image_size=self.image_size, patch_size=self.vision_patch,
                                 vision_width=self.vision_width, vision_layers=self.vision_layers,
                                 text_width=self.text_width, text_layers=self.text_layers,
                                 context_length=self.context_length, head_width=self.head_width)


def evaluators(cfg: Config, splits: ssl.Splits):
    """The every-epoch evaluation: zero-shot accuracy on validation and test, and the kNN monitor."""
    names = data_mod.class_names(cfg.dataset)
    templates = data_mod.DEFAULT_TEMPLATES
    knn, _ = ssl.monitors(cfg, splits, lambda m: getattr(m, "module", m))

    def evaluate(model, device):
        classifier = clip.zero_shot_classifier(model, names, templates, device)
        out = {name: clip.zero_shot_accuracy(model, s.images, s.labels, names, templates, device, classifier=classifier)
               for name, s in ((VAL_ZERO_SHOT_ACC, splits.val), (ZERO_SHOT_ACC, splits.test))}
        return {**out, **knn(model, device)}

    return evaluate


@register("clip", kind="encoder", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    splits = ssl.load_splits(cfg, ctx)
    evaluate = evaluators(cfg, splits)
    if cfg.pretrained:
        name, tag = clip.parse_pretrained(cfg.pretrained)
        model = clip.from_pretrained(name, tag).to(ctx.device)
        ctx.report({EPOCH: 0, **evaluate(model, ctx.device)})
        clip.save(ctx, model)
        return
    model = clip.create(cfg.model_config(), seed=cfg.seed)
    pairs = data_mod.caption_pairs(splits.train, seed=cfg.caption_seed)
    spe = steps_per_epoch(len(pairs), cfg.batch_size, ctx.world_size)
    lr_at = lr_schedule(cfg.schedule, cfg.lr, cfg.epochs * spe, warmup_steps=round(cfg.warmup_epochs * spe))
    torch.manual_seed(cfg.seed)
    trained = clip.train(model, pairs, ctx, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                         weight_decay=cfg.weight_decay, seed=cfg.seed, lr_at=lr_at, evaluate=evaluate)
    clip.save(ctx, trained)
