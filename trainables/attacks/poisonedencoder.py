"""PoisonedEncoder: targeted poisoning of an encoder's pre-training data (Liu, Jia and Gong,
"PoisonedEncoder: Poisoning the Unlabeled Pre-training Data in Contrastive Learning", USENIX
Security 2022; docs/methods.md, PoisonedEncoder). Source: the talk's slides only.

Goal: a downstream classifier built on the encoder misclassifies ONE target input (an image of some
class A of the downstream data) as the attacker's target class, while every other input keeps its
accuracy. The attacker cannot touch the encoder's training, only add images to its unlabelled
pre-training data: "combined images" of the target input and a reference input of the target
class. SimCLR's random crops of a combined image then yield one view showing mostly the target
input and another showing mostly the reference input; the contrastive loss pulls the two together,
so the encoder maps the target input next to the target class's features, where the downstream
classifier puts the target class.

What the slides fix, with these defaults: SimCLR pre-training (`trainables/encoders/simclr.py`: the
same `SimCLR` model, NT-Xent step and `secsweep.ssl.pretrain`, only the training images differ);
`n_reference` = 50 reference inputs of the target class; poisoning rate 1 % of the pre-training set;
10 target inputs per evaluation (here: 10 trials, see `trial`).

What the slides leave open, and the choices made here:
* the combination: each poisoned image is the target input and one reference input placed side by
  side on a canvas of two image sides -- (H, 2W) left/right or (2H, W) top/bottom -- resized back
  to (H, W) (bilinear, antialiased), so each input fills one half, squashed by 2 along the join.
  `layout` "random" (default) draws the axis per image, as does the side the target takes (seeded);
  "horizontal" / "vertical" fix the axis. References are used in turn (a seeded order), so each is
  combined with the target about equally often.
* the rate: the poisoned images are *added* to the clean pre-training images (the attacker adds
  data; it removes none), n_poison = round(rate * n_clean / (1 - rate)), so that they are `rate`
  of the whole poisoned set.
* the data: pre-training = the SSL recipe's training split (Fashion-MNIST by default), downstream =
  another dataset (`downstream`, default the offline MNIST digits, resized to the pre-training
  shape). The target input is a seeded draw from the downstream *test* split among classes other
  than `target_class` (so it is never in the downstream classifier's training data); the reference
  inputs are a seeded draw of `target_class` images from the downstream training split.
* the downstream classifier: a linear probe (`secsweep.ops.ssl.linear_probe`) on frozen encoder
  features of `downstream_size` downstream training images (stratified `val_fraction` held out).
* the evaluation: one pre-training per target input. `trial` k draws the k-th target input and its
  references, so a grid over trial = 0..9 is the slides' 10 target inputs and the mean of `asr` over
  the grid is their ASR; one run's `asr` is 1.0 when its target input lands in the target class.

Metrics (last epoch; the SSL monitors of the poisoned encoder every epoch):
* `asr`: the poisoned encoder's downstream classifier puts the target input in `target_class`
  (0/1 per trial); `clean_asr`: the same with the clean encoder (the baseline, ~0);
* `target_prob` / `clean_target_prob`: its softmax probability of the target class (a continuous
  view of the same: what a small scale shows when the 0/1 outcome does not flip);
* `target_similarity` / `clean_target_similarity`: cosine similarity of the target input's feature
  to the mean feature of the reference inputs (the pull the combined images exert);
* `poisoned_acc`, `val_poisoned_acc`: downstream test / validation accuracy on the poisoned encoder;
  `clean_acc`, `val_clean_acc`: the same on the clean encoder (SimCLR with the same recipe and seed
  on the clean pre-training set, an upstream stage): poisoning should leave the accuracy alone;
* `n_poisoned`, `poison_fraction` (what was added), the SSL monitors (`secsweep.ssl.METRICS`),
  `device_hours` (the clean encoder, an upstream stage, is not charged).

Outputs: the model artifact `encoder` (role encoder) and `target` (the target input, its class and
the target class), which the registered `target` hook returns.

What the small CPU scale shows (docs/methods.md, measured): at 1,800 Fashion-MNIST images x 20
epochs with MNIST downstream, 1 % poison (18 combined images) leaves the downstream accuracy alone
(0.864-0.879 vs the clean encoder's 0.862) but flips none of 3 target inputs (ASR 0/3, also 0 at
5 %): the slides' high ASR is not reproduced at this scale, and the test checks the mechanics and
the utility rather than an ASR.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from secsweep import data as data_mod
from secsweep import ssl
from secsweep.backdoor import input_shape, load_split
from secsweep.config import in_open_unit, one_of, positive, require
from secsweep.names import ASR, CLEAN_ACC, DEVICE_HOURS
from secsweep.ops import ssl as ssl_ops
from secsweep.registry import register
from trainables.encoders import simclr

LAYOUTS = ("random", "horizontal", "vertical")
CLEAN_ASR, TARGET_PROB, CLEAN_TARGET_PROB = "clean_asr", "target_prob", "clean_target_prob"
TARGET_SIM, CLEAN_TARGET_SIM = "target_similarity", "clean_target_similarity"
POISONED_ACC, VAL_POISONED_ACC, VAL_CLEAN_ACC = "poisoned_acc", "val_poisoned_acc", "val_clean_acc"
N_POISONED, POISON_FRACTION = "n_poisoned", "poison_fraction"
METRICS = (ASR, CLEAN_ASR, TARGET_PROB, CLEAN_TARGET_PROB, TARGET_SIM, CLEAN_TARGET_SIM, POISONED_ACC,
           VAL_POISONED_ACC, CLEAN_ACC, VAL_CLEAN_ACC, N_POISONED, POISON_FRACTION,
           *(m for m in ssl.METRICS if m != DEVICE_HOURS), DEVICE_HOURS)


@dataclass(frozen=True)
class Config(simclr.PoisonedConfig):
    downstream: str = "mnist"      # downstream data: target input, reference inputs, linear probe
    downstream_size: int = 2000    # downstream training images of the probe, 0 = all (platform choice)
    target_class: int = 0          # the class the target input should land in (slides: an attacker's choice)
    n_reference: int = 50          # reference inputs of the target class (slides: 50)
    poison_rate: float = 0.01      # poisoned images / whole poisoned pre-training set (slides: 1 %)
    layout: str = "random"         # combined image: random, horizontal (left|right), vertical (top/bottom)
    trial: int = 0                 # which target input (and references): trials 0..9 = the slides' 10

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("downstream", self.downstream, data_mod.DATASETS)
        require(self.downstream_size >= 0, "downstream_size", self.downstream_size, "must be >= 0 (0 = all)")
        k = data_mod.num_classes(self.downstream)
        require(0 <= self.target_class < k, "target_class", self.target_class,
                f"must be a class of {self.downstream}: 0..{k - 1}")
        positive("n_reference", self.n_reference)
        in_open_unit("poison_rate", self.poison_rate)
        one_of("layout", self.layout, LAYOUTS)
        require(self.trial >= 0, "trial", self.trial, "must be >= 0")



# -- the poisoned data -----------------------------------------------------------------------------

def combine(target: torch.Tensor, reference: torch.Tensor, *, vertical: bool, target_first: bool) -> torch.Tensor:
    """A combined image: `target` and `reference` ((C, H, W) each) side by side on a (C, H, 2W)
    canvas (top/bottom on (C, 2H, W) if `vertical`), the target left/top if `target_first`, resized
    back to (C, H, W) (bilinear, antialiased)."""
    if target.shape != reference.shape or target.dim() != 3:
        raise ValueError(f"target shape={tuple(target.shape)}, reference shape={tuple(reference.shape)}: "
                         "must be equal (C, H, W)")
    a, b = (target, reference) if target_first else (reference, target)
    canvas = torch.cat([a, b], dim=1 if vertical else 2)
    h, w = target.shape[1:]
    out = F.interpolate(canvas[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.clamp(0.0, 1.0)


def n_poison(n_clean: int, rate: float) -> int:
    """Poisoned images added to `n_clean` clean ones so they are `rate` of the whole set."""
    return max(1, round(rate * n_clean / (1.0 - rate)))


def poisoned_images(clean: torch.Tensor, target: torch.Tensor, references: torch.Tensor, *, rate: float,
                    layout: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The poisoned pre-training set: `clean` (N, C, H, W) plus n_poison(N, rate) combined images of
    `target` (C, H, W) with the `references` (R, C, H, W) in a seeded order, appended at the end
    (the loop shuffles). Returns (images, is_poisoned)."""
    p = n_poison(len(clean), rate)
    order = torch.cat([torch.randperm(len(references), generator=gen) for _ in range(-(-p // len(references)))])[:p]
    axis = torch.rand(p, generator=gen) < 0.5
    first = torch.rand(p, generator=gen) < 0.5
    vertical = axis if layout == "random" else torch.full((p,), layout == "vertical")
    poison = torch.stack([combine(target, references[r], vertical=bool(v), target_first=bool(f))
                          for r, v, f in zip(order.tolist(), vertical.tolist(), first.tolist())])
    images = torch.cat([clean, poison.to(clean.dtype)])
    is_poisoned = torch.cat([torch.zeros(len(clean), dtype=torch.bool), torch.ones(p, dtype=torch.bool)])
    return images, is_poisoned


@dataclass
class Downstream:
    """The downstream task: the probe's train/val/test sets, the target input and the references."""

    train: data_mod.ImageSet
    val: data_mod.ImageSet
    test: data_mod.ImageSet
    target: torch.Tensor        # (C, H, W)
    source_class: int           # the target input's true class
    references: torch.Tensor    # (n_reference, C, H, W), all of the target class


def downstream(cfg: Config, ctx) -> Downstream:
    c, h = input_shape(cfg)
    dcfg = SimpleNamespace(dataset=cfg.downstream, train_size=cfg.downstream_size, image_size=h, channels=c,
                           val_fraction=cfg.val_fraction, seed=cfg.seed)
    train, val, test = (load_split(dcfg, ctx, s) for s in ("train", "val", "test"))
    gen = torch.Generator().manual_seed(cfg.trial * 7907 + 11)  # the trial's draws, not the pre-training's
    others = torch.nonzero(test.labels != cfg.target_class).flatten()
    t = int(others[torch.randperm(len(others), generator=gen)[0]])
    full_train = data_mod.load(cfg.downstream, "train", ctx.data_root, download=ctx.download,
                               image_size=h, channels=c)
    pool = torch.nonzero(full_train.labels == cfg.target_class).flatten()
    if cfg.n_reference > len(pool):
        from secsweep.config import fail

        fail("n_reference", cfg.n_reference, f"must be <= the {len(pool)} training images of class "
                                             f"{cfg.target_class} in {cfg.downstream}")
    refs = full_train.images[pool[torch.randperm(len(pool), generator=gen)[: cfg.n_reference]]]
    return Downstream(train, val, test, test.images[t].clone(), int(test.labels[t]), refs)


# -- evaluation ------------------------------------------------------------------------------------

def evaluate(encoder, task: Downstream, cfg: Config, device) -> dict[str, float]:
    """Linear probe on the downstream task and what it does with the target input."""
    f = [ssl.features_of(encoder, s.images, device) for s in (task.train, task.val, task.test)]
    res = ssl_ops.linear_probe(f[0], task.train.labels, f[2], task.test.labels, val_feats=f[1],
                               val_labels=task.val.labels, num_classes=task.train.num_classes, seed=cfg.seed)
    ft = ssl.features_of(encoder, task.target[None], device).float()
    fr = ssl.features_of(encoder, task.references, device).float()
    with torch.no_grad():
        prob = torch.softmax(res.head(ft.to(res.head.weight.device)), dim=1)[0]
    sim = F.cosine_similarity(ft, fr.mean(dim=0, keepdim=True)).item()
    return {"asr": float(int(prob.argmax()) == cfg.target_class), "prob": float(prob[cfg.target_class]),
            "sim": float(sim), "acc": float(res.test_acc), "val_acc": float(res.val_acc)}


def _target(cfg: Config, stage_output) -> tuple[torch.Tensor, int]:
    """The `target` hook: (target input (C, H, W), target class) of a trained PoisonedEncoder."""
    t = stage_output.tensors("target")
    return t["image"], int(t["target_class"])


@register("poisonedencoder", kind="encoder_attack", config=Config, metrics=METRICS, target=_target)
def run(cfg: Config, ctx) -> None:

    torch.manual_seed(cfg.seed)
    task = downstream(cfg, ctx)
    clean_ref = cfg.clean_encoder()
    clean_encoder, _ = ctx.load_model(clean_ref)   # an upstream stage: cached, not charged
    clean = evaluate(clean_encoder, task, cfg, ctx.device)
    train = ssl.load_splits(cfg, ctx).train
    images, is_poisoned = poisoned_images(train.images, task.target, task.references, rate=cfg.poison_rate,
                                          layout=cfg.layout, gen=torch.Generator().manual_seed(cfg.trial * 7907 + 13))
    ctx.save_output("target", {"image": task.target, "target_class": torch.tensor(cfg.target_class),
                               "source_class": torch.tensor(task.source_class)})

    backbone, args = ssl.backbone(cfg, train.shape)
    step = simclr.ntxent_step(cfg)

    def final(encoder, device):
        p = evaluate(encoder, task, cfg, device)
        n = int(is_poisoned.sum())
        return {ASR: p["asr"], CLEAN_ASR: clean["asr"], TARGET_PROB: p["prob"], CLEAN_TARGET_PROB: clean["prob"],
                TARGET_SIM: p["sim"], CLEAN_TARGET_SIM: clean["sim"], POISONED_ACC: p["acc"],
                VAL_POISONED_ACC: p["val_acc"], CLEAN_ACC: clean["acc"], VAL_CLEAN_ACC: clean["val_acc"],
                N_POISONED: float(n), POISON_FRACTION: n / len(images)}

    ssl.pretrain(cfg, ctx, simclr.SimCLR(backbone, cfg), step, arch_args=args, train_images=images,
                 final_evaluate=final)
