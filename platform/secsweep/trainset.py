"""The record of the training set an attack actually trained on (stage output `training_set`).

Data-filtering defenses (Spectral, AC, ABL), their ground-truth masks (AUC/TPR/FPR) and the member
set of membership inference must see the samples the backdoored model saw. For BadNets, Blended and
LF that is one static poisoned set; WaNet re-draws its poisoned and noise-mode samples every epoch,
and Input-Aware makes its poisoned and cross samples with a generator that changes at every step.
So every attack stage saves, next to its model, what it trained on in its LAST epoch (0-based
`epoch`), and `recorded_train_set` rebuilds exactly that set, bit for bit:

* `poisoned` bool (N,): samples carrying the trigger with the target label; `cross` bool (N,):
  WaNet's noise-mode samples / Input-Aware's cross-trigger samples (true labels kept);
  `labels` int64 (N,) trained on; `true_labels` int64 (N,); `members` int64 (N,): positions in the
  clean training split (`load_split(cfg, ctx, "train")`) of the samples trained on (all of them:
  every attack here trains on its whole training split each epoch); `epoch` int64 (1,);
  `fingerprint` uint8 (32,): sha256 of the clean training split's images and labels, so a defense
  whose split differs from the attack's fails loudly instead of filtering the wrong samples;
  `mode` int64 (1,): how the images are rebuilt --
* STATIC (BadNets, Blended, LF): the clean images with the stage's trigger applied to `poisoned`;
* REGENERATE (WaNet): the attack's `training_set` hook recomputes the epoch's images from the
  config, the clean split and `epoch` (the warp field and every draw are seeded; CPU arithmetic);
* STORED (Input-Aware): `images` float32 (M, C, H, W) holds the M poisoned and cross images as
  trained, in index order of `poisoned | cross` (0.2 N images at the defaults: CIFAR-10 about
  120 MB, a few times the model; the generator's state at each step is not kept, so they cannot
  be regenerated).

Training-time augmentation (`VictimConfig.augment`) acts on each batch after this point, as in
BackdoorBench (poisoned samples are stored triggered, then augmented with the rest): the record
holds the images before augmentation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .data import ImageSet
from .errors import ArtifactError
from .poison import PoisonedSet, Trigger

RECORD = "training_set"
STATIC, REGENERATE, STORED = 0, 1, 2
_CHUNK = 4096  # images per trigger call (as secsweep.poison.poison)


def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sha256 of a set's images (float32) and labels (int64), as a uint8 tensor (32,)."""
    h = hashlib.sha256()
    h.update(images.detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
    h.update(labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).clone()


def make_record(clean: ImageSet, *, labels: torch.Tensor, true_labels: torch.Tensor, poisoned: torch.Tensor,
                epoch: int, mode: int, cross: torch.Tensor | None = None,
                images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a record (see the module docstring); `images` only for mode STORED."""
    n = len(clean)
    cross = torch.zeros(n, dtype=torch.bool) if cross is None else cross.bool().cpu()
    rec = {
        "poisoned": poisoned.bool().cpu(), "cross": cross, "labels": labels.cpu().to(torch.int64),
        "true_labels": true_labels.cpu().to(torch.int64), "members": torch.arange(n),
        "epoch": torch.tensor([epoch]), "mode": torch.tensor([mode]),
        "fingerprint": fingerprint(clean.images, clean.labels),
    }
    if mode == STORED:
        if images is None or len(images) != int((rec["poisoned"] | cross).sum()):
            raise ValueError("mode STORED needs the images of every poisoned and cross sample")
        rec["images"] = images.detach().cpu().to(torch.float32)
    for k in ("poisoned", "cross", "labels", "true_labels"):
        if len(rec[k]) != n:
            raise ValueError(f"record {k}: {len(rec[k])} entries for a training set of {n}")
    return rec


def save_record(ctx: Any, clean: ImageSet, **kw: Any) -> dict[str, torch.Tensor]:
    """Build the record (`make_record`) and save it as the stage output `training_set`."""
    rec = make_record(clean, **kw)
    ctx.save_output(RECORD, rec)
    return rec


def load_record(output: Any) -> dict[str, torch.Tensor]:
    """The record of an attack stage's output; ArtifactError if the stage saved none."""
    path = output.path / f"{RECORD}.safetensors"
    if not path.is_file():
        raise ArtifactError(f"stage {output.path}: no '{RECORD}' output (the record of the training set the "
                            "attack used); it was computed by older code: delete the stage to recompute it")
    return output.tensors(RECORD)


def check_split(record: Mapping[str, torch.Tensor], clean: ImageSet) -> None:
    """ArtifactError unless `clean` is the training split the record was made from."""
    if len(clean) != len(record["labels"]) or not torch.equal(fingerprint(clean.images, clean.labels),
                                                              record["fingerprint"]):
        raise ArtifactError(f"the training split here ({len(clean)} samples) is not the one the attack trained on "
                            f"({len(record['labels'])} samples): dataset, train_size, val_fraction or victim "
                            "seed differ between the attack and this trial")


def rebuild(record: Mapping[str, torch.Tensor], clean: ImageSet, trigger: Trigger,
            regenerate: Callable[[ImageSet, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
            | None = None) -> PoisonedSet:
    """The PoisonedSet the record describes, on the CPU. `regenerate(clean, epoch)` -> (images,
    labels, poisoned, cross) is the attack's hook for mode REGENERATE."""
    check_split(record, clean)
    mode, epoch = int(record["mode"][0]), int(record["epoch"][0])
    poisoned, cross = record["poisoned"].bool(), record["cross"].bool()
    if mode == REGENERATE:
        if regenerate is None:
            raise ArtifactError("record mode REGENERATE, but the attack registers no training_set hook")
        images, labels, again_poisoned, again_cross = regenerate(clean, epoch)
        if not (torch.equal(labels, record["labels"]) and torch.equal(again_poisoned.bool(), poisoned)
                and torch.equal(again_cross.bool(), cross)):
            raise ArtifactError(f"regenerating epoch {epoch} of the attack's training set gives other samples "
                                "than it recorded (its code changed since the stage was computed)")
    else:
        images = clean.images.clone()
        if mode == STORED:
            images[torch.nonzero(poisoned | cross).flatten()] = record["images"]
        elif mode == STATIC:
            idx = torch.nonzero(poisoned).flatten()
            for i in range(0, len(idx), _CHUNK):
                part = idx[i: i + _CHUNK]
                images[part] = trigger(clean.images[part])
        else:
            raise ArtifactError(f"record mode {mode}: unknown")
        labels = record["labels"].clone()
    return PoisonedSet(images, labels, poisoned, record["true_labels"].clone())


def members(record: Mapping[str, torch.Tensor], clean: ImageSet) -> ImageSet:
    """The clean training samples the attack trained on (true labels): membership inference's pool."""
    check_split(record, clean)
    return clean.subset(record["members"])
