"""The `paper` preset, in one place: the FTP paper's victim recipe and each defense's original budget.

Every sweep script's `presets={"paper": ...}` is built from these constants and helpers, so a
change to the recipe reaches all of them. What the preset still does differently from the paper,
and why, is listed in docs/paper_preset.md.

Sources (docs/methods.md cites the same): FTP = Sha et al., "Fine-Tuning Is All You Need to Mitigate
Backdoor Attacks", §4.4 "Training Details"; BackdoorBench = the toolkit the paper ran every attack
and baseline defense through (its config/attack/*/default.yaml and config/defense/*/config.yaml);
original papers where BackdoorBench gives no value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# FTP §4.4: PreAct-ResNet18 on CIFAR-10, backdoor training with SGD, lr 0.001, batch 256, 200 epochs
# (momentum and weight decay are not stated: VictimConfig's 0.9 / 5e-4, BackdoorBench's values).
# augment "auto": BackdoorBench's training augmentation (random crop after 4-pixel zero padding on
# every dataset, horizontal flip where the dataset allows, `flip_allowed`).
VICTIM_EPOCHS = 200
PAPER_VICTIM: dict[str, Any] = {
    "dataset": "cifar10",
    "model": "preact_resnet18",
    "train_size": 0,             # the whole training set
    "attack_epochs": VICTIM_EPOCHS,
    "attack_lr": 0.001,
    "attack_batch_size": 256,
    "augment": "auto",
}

# Defense fine-tuning: FTP does not state batch size or optimizer for FT/SFT; 256 is its backdoor
# training batch (and BackdoorBench's defense batch). 20 epochs: the comparison budget every
# fine-tuning defense gets here (FTP's curves run to 100 epochs; headline SFT results at 1-3).
PAPER_DEFENSE: dict[str, Any] = {"batch_size": 256, "epochs": 20}

# Each defense's own budget (fields of its Config), applied per grid point by `paper_grid`.
DEFENSE_BUDGETS: dict[str, dict[str, Any]] = {
    # FTP §4.4: phase 1 = 10 epochs ("ten epochs work well"), "500 iterations" read as the ramp
    # length in optimizer steps.
    "sft": {"phase1_epochs": 10, "ramp_steps": 500},
    "transfer": {"phase1_epochs": 10, "ramp_steps": 500},  # the transfer scenario's SFT (FTP §4.4, as "sft")
    # Tran et al. / Chen et al.: retrain from scratch on the kept data "with the same procedure as
    # the original training", i.e. the victim's 200 epochs (BackdoorBench retrains 100 epochs).
    "spectral": {"epochs": VICTIM_EPOCHS},
    "ac": {"epochs": VICTIM_EPOCHS},
    # BackdoorBench config/defense/abl: tuning_epochs 20 (isolation, ABL's T_te = 20),
    # finetuning_epochs 60 (training on the rest), unlearning_epochs 20.
    "abl": {"isolation_epochs": 20, "epochs": 60, "unlearning_epochs": 20},
    # BackdoorBench config/defense/nad: te_epochs 10 (NAD: the teacher is fine-tuned 10 epochs).
    "nad": {"teacher_epochs": 10},
    # BackdoorBench config/defense/nc: nc_epoch 10 over its cleaning_ratio 0.05 of the training set
    # at bs 64: on CIFAR-10/100 2,500 images, ceil(2500 / 64) = 40 steps an epoch, 400 steps per class.
    "nc": {"nc_steps": 400, "nc_images": 2500, "nc_batch_size": 64},
}

# Attacks' own budgets. BackdoorBench config/attack/inputaware/default.yaml: clean_train_epochs 25
# (the Input-Aware paper's mask-generator pre-training).
ATTACK_BUDGETS: dict[str, dict[str, Any]] = {
    "inputaware": {"mask_pretrain_epochs": 25},
}

# Horizontal flips: BackdoorBench flips CIFAR-10 only (its get_transform); STL-10 holds natural
# photos of mirror-symmetric classes as CIFAR-10 does. Not flipped: CIFAR-100 (as BackdoorBench,
# the paper's CIFAR-100 models), GTSRB (mirrored signs change meaning: "keep left" <-> "keep
# right"), SVHN, digits and Fashion-MNIST (BackdoorBench's MNIST rule: crop only).
FLIP_DATASETS = ("cifar10", "stl10")


def flip_allowed(dataset: str) -> bool:
    """Whether `augment="auto"` flips images of `dataset` horizontally."""
    return dataset in FLIP_DATASETS


def resolve_augment(augment: str, dataset: str) -> str:
    """`augment` with "auto" replaced by "crop_flip" or "crop" for `dataset`."""
    if augment != "auto":
        return augment
    return "crop_flip" if flip_allowed(dataset) else "crop"


def paper_fixed(**extra: Any) -> dict[str, Any]:
    """The preset's fixed values: the victim recipe, the defense fine-tuning budget, then `extra`."""
    return {**PAPER_VICTIM, **PAPER_DEFENSE, **extra}


def budget(trainable: str, attack: str | None = None) -> dict[str, Any]:
    """The budget values of one trial of `trainable`: an attack's own (ATTACK_BUDGETS); for any
    other trainable its DEFENSE_BUDGETS entry plus, when `attack` has a budget, that attack's in
    `attack_options` (a defense reaches attack fields only through them)."""
    from . import registry

    if trainable in ("none", "clean") or registry.get(trainable).kind != "attack":
        out = dict(DEFENSE_BUDGETS.get(trainable, {}))
        if attack in ATTACK_BUDGETS:
            out["attack_options"] = dict(ATTACK_BUDGETS[attack])
        return out
    return dict(ATTACK_BUDGETS.get(trainable, {}))


# DefenseConfig fields a sequela trial sets directly (not through defense_options)
_SHARED_DEFENSE_FIELDS = ("epochs", "batch_size", "momentum", "weight_decay", "clean_fraction")


def paper_grid(points: Sequence[Mapping[str, Any]], *, trainable: str | None = None,
               attack: str | None = None) -> list[dict[str, Any]]:
    """Grid points with each trial's original budget merged in (the point's own values win).

    `trainable` / `attack`: the sweep's defaults for points that do not name their own. A sequela
    point (with `defense`) gets its defense's budget: the shared fine-tuning fields (`epochs`) set
    directly, the defense's own fields in `defense_options`.
    """
    out = []
    for p in points:
        name = p.get("trainable", trainable)
        att = p.get("attack", attack)
        extra: dict[str, Any] = {}
        if "defense" in p:  # a sequela trial: the defended model's budget
            own = budget(str(p["defense"]), att)
            shared = {k: v for k, v in own.items() if k in _SHARED_DEFENSE_FIELDS}
            options = {k: v for k, v in own.items() if k not in _SHARED_DEFENSE_FIELDS and k != "attack_options"}
            extra.update(shared)
            if options:
                extra["defense_options"] = options
            if "attack_options" in own:
                extra["attack_options"] = own["attack_options"]
        elif name is not None:
            extra.update(budget(str(name), att))
        merged = {**extra, **p}
        for key in ("attack_options", "defense_options"):
            if key in extra and key in p:
                merged[key] = {**extra[key], **p[key]}
        out.append(merged)
    return out


# Self-supervised pre-training (sweeps/ssl_pretrain.py; docs/methods.md, "Self-supervised encoders"):
# lightly's CIFAR-10 benchmark, whose kNN accuracies at 200 epochs are the anchors (ResNet-18, batch
# 512, SGD lr 0.06 x batch / 128 = 0.24, momentum 0.9, weight decay 5e-4, cosine decay). The kNN
# bank: lightly uses all 50,000 training images; here a 10,000-image labelled sample (monitor_size).
PAPER_SSL: dict[str, Any] = {
    "dataset": "cifar10",
    "model": "preact_resnet18",
    "train_size": 0,             # the whole training set
    "epochs": 200,
    "batch_size": 512,
    "optimizer": "sgd",
    "lr": 0.24,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "cosine",
    "monitor_size": 10000,
}

# DE-FAKE (sweeps/defake_detect.py, defake_attribute.py, defake_robustness.py; docs/methods.md "DE-FAKE"), thesis ch. 5: the image-only detector is a
# ResNet-18 trained from scratch, the hybrid embeds with a pretrained CLIP ViT-B/32 (open_clip's
# OpenAI weights, online). The detection, attribution and robustness corpus is the thesis's kind:
# Stable Diffusion v1-4 and Latent Diffusion fakes (the defake_t2i_corpus defaults) of MSCOCO
# captions the user provides (`--set corpus.captions=/path/to/coco`), 20,000 real images and one
# fake of each per pipeline (T§5.3: 20,000 MSCOCO images and their SD fakes), 256 px. The prompt
# analysis keeps the largest offline corpus (PAPER_DEFAKE_PER_SOURCE per source).
PAPER_DEFAKE_IMAGE_MODEL = "preact_resnet18"
PAPER_DEFAKE_CLIP: dict[str, Any] = {"trainable": "clip", "pretrained": "ViT-B-32:openai"}
PAPER_UNIVFD_CLIP: dict[str, Any] = {"trainable": "clip", "pretrained": "ViT-L-14:openai"}  # UnivFD's CLIP:ViT-L/14
PAPER_DEFAKE_PER_SOURCE = 5000
PAPER_DEFAKE_T2I_PER_SOURCE = 20000


def paper_defake_fixed() -> dict[str, Any]:
    """The fixed values of the DE-FAKE sweeps' paper preset: the text-to-image corpus (its
    `captions` folder is the user's: --set corpus.captions=...)."""
    return {"corpus": {"trainable": "defake_t2i_corpus", "per_source": PAPER_DEFAKE_T2I_PER_SOURCE}}


def crossed(points: Sequence[Mapping[str, Any]], **dims: Sequence[Any]) -> list[dict[str, Any]]:
    """Every point (a trial's settings, e.g. one detector) with every combination of `dims`' values."""
    import itertools

    keys = list(dims)
    return [{**p, **dict(zip(keys, values))} for p in points for values in itertools.product(*(dims[k] for k in keys))]


def paper_defake_grid(**dims: Any) -> list[dict[str, Any]]:
    """The DE-FAKE sweeps' paper grid: the thesis's two detectors (a ResNet-18 from scratch and the
    hybrid on open_clip's ViT-B/32) and UnivFD's linear probe on ViT-L/14, crossed with the sweep's
    own dimensions `dims` (name -> values)."""
    return crossed([{"trainable": "defake_image", "model": PAPER_DEFAKE_IMAGE_MODEL},
                    {"trainable": "defake_hybrid", "clip": dict(PAPER_DEFAKE_CLIP)},
                    {"trainable": "defake_univfd", "clip": dict(PAPER_UNIVFD_CLIP)}], **dims)


# SecurityNet's audits (sweeps/audit_zoo.py; docs/methods.md "Audits of public models"): benchmark
# models trained on CIFAR-10 / SVHN with a plain SGD recipe; stealing with a ResNet-18 surrogate,
# 30 epochs, SGD 0.01; FGSM's black-box surrogate a ResNet-18; Neural Cleanse 50 epochs; STRIP and
# NEO on 2,000 test images; every sample of the model's splits (max_samples 0).
PAPER_AUDIT_RECIPE: dict[str, Any] = {"trainable": "clean", "lr": 0.01, "batch_size": 128, "augment": "auto"}
PAPER_AUDIT_FIXED: dict[str, Any] = {"max_samples": 0, "surrogate": "preact_resnet18", "epochs": 30, "lr": 0.01,
                                     "transfer_surrogate.model": "preact_resnet18", "nc_epochs": 50,
                                     "strip_images": 2000, "neo_images": 2000}
