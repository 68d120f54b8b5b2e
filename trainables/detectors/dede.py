"""DeDe: decoder-based backdoor-sample detection for self-supervised and CLIP encoders
(docs/methods.md, "DeDe"; the model and loss in `secsweep.ops.dede`).

For a frozen (possibly backdoored) victim encoder E, an MAE-style patch encoder and decoder learn
to reconstruct an image x from E(x) (linearly projected into the place of the class token) and the
few patches a random mask at `mask_ratio_train` leaves visible, minimising the MSE on the hidden
patches. A sample's score is that error at the higher `mask_ratio_test` (averaged over
`test_masks` random masks): the reconstruction then rests on E(x), and a trigger that hijacks E(x)
towards the attacker's target region is reconstructed as something else, so its error is large.
Flagged: score above the threshold (`threshold`, by default "train_mean": the mean of the same
error over the detector's training images, the paper's "average training loss").

Training data (`train_data`): "id" = the victim's pre-training images (for BadEncoder the clean
encoder's pre-training split, which holds its shadow data), a seeded `train_size` subset, of which
`train_poison_rate` are stamped with the trigger (the threat model's "slightly poisoned" subset);
or the name of another dataset (out-of-distribution training data, e.g. "mnist" for a
Fashion-MNIST victim), resized to the victim's input.

The CTRL case (`ood_quantile` > 0): training embeddings whose norm is above that quantile of the
training norms are treated as out-of-distribution and trained towards a constant image
(`ood_target` "ones"; "noise": uniform noise drawn every step): the reconstruction target changes,
the visible patches stay the image's, so the decoder learns the constant image from the embedding.

Reported: per epoch the training loss (mean masked MSE at `mask_ratio_train`) and the validation
AUC at the first test poison rate; on the last epoch everything `secsweep.sample_detection` reports
(TPR / FPR / AUC per test poison rate and split, the downstream-defense protocol).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch

from secsweep import data as data_mod
from secsweep import sample_detection as sd
from secsweep.config import fail, one_of, positive, require
from secsweep.loop import SCHEDULES, lr_schedule
from secsweep.loop import fit as fit_loop
from secsweep.training import steps_per_epoch
from secsweep.ops.dede import DeDeModel, keep_count
from secsweep.registry import register

log = logging.getLogger(__name__)

OOD_TARGETS = ("ones", "noise")
N_OOD, TRAIN_SCORE_SIZE = "ood_fraction", 2000  # images of the training set scored for the threshold
METRICS = (*sd.METRICS, "train_loss", N_OOD)


@dataclass(frozen=True)
class Config(sd.DetectorConfig):
    mask_ratio_train: float = 0.9      # fraction of patches hidden in training (public code: 0.9; CTRL 0.75)
    mask_ratio_test: float = 0.99      # fraction hidden when scoring, > mask_ratio_train (public code: 0.99)
    patch_size: int = 4                # pixels per patch side (DD: 4 to 32; public code: 4, BadCLIP 32)
    # Model size: the offline default is CPU-sized (`--preset paper`: width 192, 3 heads, 6 / 4 blocks,
    # DD §5.1 and the public code). Measured on one shared CPU core, one Adam step on 256 28x28 images
    # at patch 4: 21 s at width 192 with 6 / 4 blocks, 3.6 s at width 64 with 6 / 4, 1.9 s at 64 with 2 / 2
    width: int = 64                    # token width of encoder and decoder (public code: 192)
    heads: int = 2                     # attention heads (public code: 3)
    encoder_depth: int = 2             # ViT blocks of the patch encoder (DD §5.1: 6)
    decoder_depth: int = 2             # ViT blocks of the decoder (DD §5.1: 4)
    epochs: int = 16                   # DD: 200 (`--preset paper`); offline: the digits recipe of tests/test_dede.py
    batch_size: int = 32               # public code: 256; 32 gives a CPU budget more steps (measured on digits)
    lr: float = 1e-3                   # Adam (public code: 1e-3)
    # per-step learning-rate schedule: constant, cosine, warmup_cosine (public code: not used here;
    # cosine is a choice: it steadies the last epochs' validation AUC, docs/methods.md "DeDe")
    schedule: str = "cosine"
    weight_decay: float = 1e-6         # Adam's L2 weight decay (public code: 1e-6)
    train_data: str = "id"             # "id" (the victim's pre-training images) or a dataset name (OoD)
    train_size: int = 2000             # training images (0 = the whole split; DD: 50,000)
    train_poison_rate: float = 0.01    # fraction of the ID training images stamped with the trigger (public code: 0.01)
    ood_quantile: float = 0.0          # > 0: the CTRL case, embeddings above this norm quantile -> ood_target (DD: 0.99)
    ood_target: str = "ones"           # what out-of-distribution embeddings reconstruct (public code: a constant image)
    test_masks: int = 1                # random masks averaged per score (docs/methods.md: measured 1 vs 4)
    score_batch_size: int = 512        # images per scoring batch

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0.0 <= self.mask_ratio_train < 1.0, "mask_ratio_train", self.mask_ratio_train, "must be in [0, 1)")
        require(0.0 < self.mask_ratio_test <= 1.0, "mask_ratio_test", self.mask_ratio_test, "must be in (0, 1]")
        require(self.mask_ratio_test > self.mask_ratio_train, "mask_ratio_test", self.mask_ratio_test,
                f"must be > mask_ratio_train={self.mask_ratio_train} (the test mask hides more)")
        require(self.patch_size >= 1, "patch_size", self.patch_size, "must be >= 1 pixel")
        size = self._input_size()
        if size:
            require(size % self.patch_size == 0, "patch_size", self.patch_size,
                    f"must divide the victim's input size {size}")
        require(self.heads >= 1 and self.width % self.heads == 0, "width", self.width,
                f"must be divisible by heads={self.heads}")
        require(self.encoder_depth >= 1, "encoder_depth", self.encoder_depth, "must be >= 1")
        require(self.decoder_depth >= 1, "decoder_depth", self.decoder_depth, "must be >= 1")
        require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        require(self.batch_size >= 2, "batch_size", self.batch_size, "must be >= 2")
        positive("lr", self.lr)
        one_of("schedule", self.schedule, SCHEDULES)
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        if self.train_data != "id":
            one_of("train_data", self.train_data, ("id", *data_mod.DATASETS))
        require(self.train_size >= 0, "train_size", self.train_size, "must be >= 0 (0 = all)")
        require(0.0 <= self.train_poison_rate < 1.0, "train_poison_rate", self.train_poison_rate, "must be in [0, 1)")
        if self.train_poison_rate and self.train_data != "id":
            fail("train_poison_rate", self.train_poison_rate, "applies to the in-distribution training data "
                 "(train_data=id): public out-of-distribution data carry no trigger")
        require(0.0 <= self.ood_quantile < 1.0, "ood_quantile", self.ood_quantile, "must be in [0, 1) (0 = off)")
        one_of("ood_target", self.ood_target, OOD_TARGETS)
        require(self.test_masks >= 1, "test_masks", self.test_masks, "must be >= 1")
        require(self.score_batch_size >= 1, "score_batch_size", self.score_batch_size, "must be >= 1")

    def _input_size(self) -> int:
        """The victim's input side from its pre-training config (0 when it cannot be told)."""
        try:
            from secsweep.backdoor import input_shape

            return int(input_shape(sd.pretraining_config(self.victim))[1])
        except (ValueError, AttributeError, KeyError):
            return 0


def training_images(cfg: Config, ctx, victim: sd.Victim) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, stamped mask) DeDe trains on, at the victim's input shape."""
    c, h = victim.shape
    if cfg.train_data == "id":
        pool = sd.pretraining_split(victim.ref, ctx, "train").images
    else:
        pool = data_mod.load(cfg.train_data, "train", ctx.data_root, download=ctx.download, image_size=h,
                             channels=c).images
    if tuple(pool.shape[1:]) != (c, h, h):
        pool = torch.nn.functional.interpolate(pool, size=(h, h), mode="bilinear", align_corners=False)
        pool = pool.mean(1, keepdim=True).expand(-1, c, -1, -1).contiguous() if pool.shape[1] != c else pool
    g = torch.Generator().manual_seed(cfg.seed + 29)
    n = min(cfg.train_size or len(pool), len(pool))
    images = pool[torch.randperm(len(pool), generator=g)[:n].sort().values].clone()
    stamped = torch.zeros(n, dtype=torch.bool)
    if cfg.train_poison_rate:
        k = max(1, round(cfg.train_poison_rate * n))
        idx = torch.randperm(n, generator=g)[:k]
        images[idx] = victim.stamp(images[idx])
        stamped[idx] = True
    return images, stamped


def make_scorer(cfg: Config, model: DeDeModel, victim: sd.Victim, device: torch.device):
    """score(images) -> (N,) masked MSE at the test mask ratio, averaged over `test_masks` masks
    (seeded: the same image set always gets the same scores)."""

    def score(images: torch.Tensor) -> torch.Tensor:
        z = victim.embed(images)
        was = model.training
        model.eval()
        total = torch.zeros(len(images))
        try:
            with torch.no_grad():
                for t in range(cfg.test_masks):
                    g = torch.Generator().manual_seed(cfg.seed * 7919 + 101 + t)
                    for i in range(0, len(images), cfg.score_batch_size):
                        x = images[i : i + cfg.score_batch_size].to(device)
                        zb = z[i : i + cfg.score_batch_size].to(device)
                        total[i : i + len(x)] += model.loss(x, zb, cfg.mask_ratio_test, g).cpu()
        finally:
            model.train(was)
        return total / cfg.test_masks

    return score


def fit(cfg: Config, ctx, victim: sd.Victim, evaluation: sd.Evaluation) -> None:
    torch.manual_seed(cfg.seed)
    images, stamped = training_images(cfg, ctx, victim)
    c, h = victim.shape
    z = victim.embed(images)
    ood = torch.zeros(len(images), dtype=torch.bool)
    if cfg.ood_quantile:
        norms = z.norm(dim=1)
        ood = norms > torch.quantile(norms.double(), cfg.ood_quantile).float()
    model = DeDeModel(channels=c, image_size=h, patch_size=cfg.patch_size, embed_dim=z.shape[1], width=cfg.width,
                      heads=cfg.heads, encoder_depth=cfg.encoder_depth, decoder_depth=cfg.decoder_depth)
    n_patch = model.num_patches
    log.info("dede: %d training images (%d stamped, %d out-of-distribution), %d patches, %d / %d visible "
             "(train / test)", len(images), int(stamped.sum()), int(ood.sum()), n_patch,
             keep_count(n_patch, cfg.mask_ratio_train), keep_count(n_patch, cfg.mask_ratio_test))
    dev = {}

    def on(device):
        if device not in dev:
            dev[device] = (z.to(device), ood.to(device))
        return dev[device]

    def step(m, x, idx, gen):
        zd, od = on(x.device)
        zb = zd[idx]
        target = None
        if cfg.ood_quantile:  # only the target changes: the visible patches stay the image's, so the
            #                   decoder must learn the constant image from the embedding itself
            sel = od[idx].view(-1, 1, 1, 1)
            other = torch.ones_like(x) if cfg.ood_target == "ones" else torch.rand(x.shape, generator=gen).to(x.device)
            target = torch.where(sel, other, x)
        return m.loss(x, zb, cfg.mask_ratio_train, gen, target=target).mean()

    def scorer_of(m, device):
        bare = getattr(m, "module", m)
        score = make_scorer(cfg, bare, victim, device)
        sub = images[: min(len(images), TRAIN_SCORE_SIZE)]
        return sd.Scorer(score, train_scores=score(sub))

    def evaluate(m, device):  # cheap per-epoch monitor: validation AUC at the first rate (ASHA can stop on it)
        score = make_scorer(cfg, getattr(m, "module", m), victim, device)
        return {sd.VAL_AUC: evaluation.auc(score), N_OOD: ood.float().mean().item()}

    def final(m, device):
        out = evaluation.evaluate(scorer_of(m, device), ctx)
        with ctx.uncharged():
            ctx.save_output("dede", {k: v.detach().cpu().contiguous() for k, v in
                                     getattr(m, "module", m).state_dict().items()})
        return out

    spe = steps_per_epoch(len(images), cfg.batch_size, ctx.world_size)
    fit_loop(model, (images, torch.arange(len(images))), ctx, epochs=cfg.epochs, batch_size=cfg.batch_size,
             seed=cfg.seed, step=step, opt="adam", lr_at=lr_schedule(cfg.schedule, cfg.lr, cfg.epochs * spe),
             weight_decay=cfg.weight_decay, evaluate=evaluate, final_evaluate=final)
    return None


@register("dede", kind="sample_detector", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    sd.run_detector(cfg, ctx, partial(fit, cfg, ctx))
