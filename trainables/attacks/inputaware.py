"""Input-Aware Dynamic Backdoor (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020),
as used through BackdoorBench by the FTP paper (docs/methods.md §4.5: "generator trained with a diversity
loss produces per-image (input-specific) triggers").

The attacker controls training. A trigger generator g and a mask generator m
(`secsweep.ops.inputaware`) are trained together with the classifier; the poisoned input is
x * (1 - m(x)) + g(x) * m(x), so every image carries its own trigger.
Masks are always used sharpened by the authors' soft threshold s(m) = tanh(20 m - 10) / 2 + 0.5.
1. Mask pre-training (`mask_pretrain_epochs`): m alone, Adam, loss
   lambda_norm * mask_norm_loss(s(m(x))) + lambda_div * diversity_loss(x, x', s(m(x)), s(m(x')))
   (x' = another training image, from a second shuffle).
2. Joint training (`attack_epochs`), m frozen. In every batch a `poison_ratio` of the samples get
   their own trigger and the target label, the next `p_cross` of them get a trigger generated from ANOTHER
   input (cross samples, true labels kept, so a trigger only works on the input it was made for),
   the rest stay clean; loss = cross-entropy + lambda_div * diversity_loss on the patterns. The
   classifier steps with SGD (attack_lr, attack_momentum, attack_weight_decay), g with Adam
   (generator_lr), both rates scaled by the same `lr_schedule`.
ASR is measured with each test image's own trigger (the trained g and m, eval mode). Every epoch
reports asr/clean_acc with the state of classifier, both generators and both optimisers, so a
restarted trial resumes where it stopped (mask pre-training is not repeated).

Outputs: `model` (classifier), `generator` and `mask` (generator weights); the `trigger` hook
rebuilds the trigger function from them. `training_set` (secsweep.trainset, mode STORED): which
samples the last epoch poisoned / crossed and their images as the classifier trained on them (the
generator moves at every step, so they are stored, not regenerated); data-based defenses filter it.
Training augmentation (`augment`, VictimConfig) acts on each assembled batch after the triggers;
BackdoorBench's Input-Aware uses its own post-trigger transform (random crop 5 px, rotation 10
degrees, flip on CIFAR-10) instead; rotation is not implemented here (docs/paper_preset.md).

Defaults and their sources (docs/methods.md §4.5; FTP leaves all Inputaware internals [NS], "BackdoorBench
defaults implied"; the values are the paper's / BackdoorBench's unless said otherwise):
* poison_ratio 0.1 (= the paper's p_attack): FTP [S] (docs/methods.md §4.1), inherited from VictimConfig.
* p_cross 0.1, lambda_div 1, lambda_norm 100, mask_density 0.032: paper / BackdoorBench.
* generator_lr 0.01 (BackdoorBench lr_G = lr_M = 0.01), Adam betas (0.5, 0.9): the authors' code.
* mask_pretrain_epochs 2: CPU-sized; the paper / BackdoorBench (clean_train_epochs) use 25, which
  the `paper` preset sets (secsweep.presets.ATTACK_BUDGETS).
* generator_width 0 = automatic: channels of the generators' first stage (widths w, 2w, 4w) as in
  the authors' code, 16 for one-channel data (their MNIST generator) and 32 for colour data
  (their CIFAR-10/GTSRB generator).
* lr_schedule "cosine": both rates annealed to 0 over attack_epochs, the scheduler of
  BackdoorBench's prototype recipe (CosineAnnealingLR) [EXT]; BackdoorBench's Inputaware config
  steps C and g down by 10x at epochs 100-400 / 200-500 (MultiStepLR), i.e. constant through short
  runs; FTP: [NS]. Cosine is the default because runs are short: with constant rates the
  classifier chases a generator that keeps moving and ASR swings by tens of points between epochs.
  "constant" is the recipe of BadNets/Blended here.
* diversity distances are per-sample L2 norms (`secsweep.ops.inputaware.diversity_loss`); the
  authors use sqrt(mean squared difference), which gives the same ratio for patterns and, for the
  one-channel masks, differs by the constant sqrt(channels) on RGB data.

Tiny images: mask_density is a fraction of the pixels, so on 8x8 `digits` the default mask is ~2
pixels and the attack learns slowly (ASR ~0.34 after 20 epochs); tests/test_attacks_issue3.py
uses lambda_norm 10 there (~9-pixel masks, ASR ~0.76).
Multi-worker trials: classifier and g are wrapped by `ctx.prepare_model`; m is pre-trained
identically (same seed, all data) on every worker and frozen afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from secsweep import data, trainset
from secsweep.backdoor import BackdoorEval, VictimConfig, build_victim_model, load_split, save_classifier, unwrap
from secsweep.config import in_open_unit, one_of, positive, require
from secsweep.names import EPOCH, LR
from secsweep.ops import inputaware as ia
from secsweep.ops.schedules import cosine
from secsweep.registry import register
from secsweep.errors import ArtifactError
from secsweep.training import augment_generator, epoch_order, set_lr, steps_per_epoch

VERSION = 2  # 2: the stage saves the `training_set` record (secsweep.trainset)
LR_SCHEDULES = ("cosine", "constant")
GENERATOR_BETAS = (0.5, 0.9)  # Adam betas of both generators (authors' code)
GREY_WIDTH = 16               # generator_width 0 on one-channel data (the authors' MNIST generator)
TRIGGER_CHUNK = 512           # images per generator call inside the trigger function


@dataclass(frozen=True)
class Config(VictimConfig):
    p_cross: float = ia.P_CROSS                        # fraction of each batch with another input's trigger
    lambda_div: float = ia.LAMBDA_DIV                  # weight of the diversity loss
    lambda_norm: float = ia.LAMBDA_NORM                # weight of the mask norm loss (mask pre-training)
    mask_density: float = ia.MASK_DENSITY              # mask values above this are penalised, in [0, 1]
    mask_pretrain_epochs: int = 2                      # epochs of mask pre-training (paper: 25)
    generator_lr: float = ia.GENERATOR_LR              # Adam learning rate per step, both generators
    generator_width: int = 0                           # generators' first-stage channels, 0 = 16 grey / 32 colour
    lr_schedule: str = "cosine"                        # both learning rates per step: cosine to 0, or constant

    def __post_init__(self) -> None:
        super().__post_init__()
        in_open_unit("p_cross", self.p_cross)
        require(self.poison_ratio + self.p_cross < 1, "p_cross", self.p_cross,
                f"poison_ratio + p_cross must be < 1 (poison_ratio={self.poison_ratio})")
        require(self.lambda_div >= 0, "lambda_div", self.lambda_div, "must be >= 0")
        require(self.lambda_norm >= 0, "lambda_norm", self.lambda_norm, "must be >= 0")
        require(0 <= self.mask_density <= 1, "mask_density", self.mask_density, "must be in [0, 1]")
        require(self.mask_pretrain_epochs >= 0, "mask_pretrain_epochs", self.mask_pretrain_epochs, "must be >= 0")
        positive("generator_lr", self.generator_lr)
        require(self.generator_width >= 0, "generator_width", self.generator_width,
                "must be >= 0 channels (0 = 16 for grey, 32 for colour inputs)")
        one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES)


def _channels(cfg: Config) -> int:
    return cfg.channels or data.native_shape(cfg.dataset)[0]


def build_generators(cfg: Config) -> tuple[ia.TriggerGenerator, ia.MaskGenerator]:
    w = cfg.generator_width or (GREY_WIDTH if _channels(cfg) == 1 else ia.DEFAULT_WIDTHS[0])
    widths = (w, 2 * w, 4 * w)
    return ia.TriggerGenerator(_channels(cfg), widths), ia.MaskGenerator(_channels(cfg), widths)


def sharpen(mask: torch.Tensor) -> torch.Tensor:
    """The authors' soft threshold of the mask at 0.5: tanh(20 m - 10) / 2 + 0.5."""
    return torch.tanh(20.0 * mask - 10.0) / 2.0 + 0.5


def make_trigger(gen: nn.Module, mask_gen: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x with its own trigger, using the generators in eval mode without gradients.

    The generators stay where they are (during training: on the trial's device); inputs are moved
    to them and results come back on the input's device. Their train/eval mode is restored.
    """

    @torch.no_grad()
    def apply(x: torch.Tensor) -> torch.Tensor:
        squeeze = x.dim() == 3
        xb = x.unsqueeze(0) if squeeze else x
        device = next(gen.parameters()).device
        modes = (gen.training, mask_gen.training)
        gen.eval(), mask_gen.eval()
        try:
            out = []
            for i in range(0, len(xb), TRIGGER_CHUNK):
                part = xb[i: i + TRIGGER_CHUNK].to(device)
                out.append(ia.apply_inputaware(part, gen(part), sharpen(mask_gen(part))).to(x.device))
            res = torch.cat(out) if out else xb.clone()
        finally:
            gen.train(modes[0]), mask_gen.train(modes[1])
        return res.squeeze(0) if squeeze else res

    return apply


def trigger(cfg: Config, output) -> Callable[[torch.Tensor], torch.Tensor]:
    """The trained attack's trigger, rebuilt from the stage outputs `generator` and `mask`.

    `output=None` (no trained attack at hand, e.g. the registry's shape checks) gives the trigger of
    the untrained generators at their seeded initialisation; every real use (`load_victim`,
    defenses) passes the stage output.
    """
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        gen, mask_gen = build_generators(cfg)
    if output is not None:
        gen.load_state_dict(output.tensors("generator"))
        mask_gen.load_state_dict(output.tensors("mask"))
    return make_trigger(gen.eval(), mask_gen.eval())


def lr_scale(schedule: str, total_steps: int) -> Callable[[int], float]:
    """Multiplier of both learning rates at optimizer step `step`: 1, or cosine from 1 to 0."""
    if schedule == "constant":
        return lambda step: 1.0
    return cosine(1.0, total_steps)  # torch's CosineAnnealingLR, held at 0 after the end


def _partner_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The x' images paired with each batch position (a second, independent shuffle)."""
    g = torch.Generator().manual_seed(seed * 100_003 + 60_013 + epoch)  # apart from epoch_order's seeds
    return torch.randperm(n, generator=g)


def _pretrain_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + 80_021 + epoch)
    return torch.randperm(n, generator=g)


def pretrain_mask(cfg: Config, mask_gen: nn.Module, images: torch.Tensor, device: torch.device) -> None:
    """Stage 1: train m alone for `mask_pretrain_epochs` (norm + diversity losses)."""
    opt = torch.optim.Adam(mask_gen.parameters(), lr=cfg.generator_lr, betas=GENERATOR_BETAS)
    mask_gen.train()
    n = len(images)
    for epoch in range(cfg.mask_pretrain_epochs):
        order, partner = _pretrain_order(n, cfg.seed, epoch), _partner_order(n, cfg.seed, -1 - epoch)
        for i in range(0, n, cfg.attack_batch_size):
            x = images[order[i: i + cfg.attack_batch_size]].to(device)
            x2 = images[partner[i: i + cfg.attack_batch_size]].to(device)
            m, m2 = sharpen(mask_gen(x)), sharpen(mask_gen(x2))
            loss = (cfg.lambda_norm * ia.mask_norm_loss(m, cfg.mask_density)
                    + cfg.lambda_div * ia.diversity_loss(x, x2, m, m2))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    mask_gen.eval()
    for p in mask_gen.parameters():
        p.requires_grad_(False)


def train_epoch(cfg: Config, ctx, model: nn.Module, gen: nn.Module, mask_gen: nn.Module,
                images: torch.Tensor, labels: torch.Tensor, opt_c, opt_g, epoch: int, step: int,
                scale: Callable[[int], float], capture: dict | None = None) -> tuple[int, float]:
    """Stage 2, one epoch: backdoor + cross + clean samples per batch, learning rates times
    `scale(step)`; returns (step after the epoch, mean loss). The batch the classifier sees is then
    augmented (`cfg.train_transform()`, after the triggers). `capture`, if given, collects the
    indices and the (pre-augmentation) images of this epoch's poisoned and cross samples."""
    model.train(), gen.train()
    transform = cfg.train_transform()
    aug_gen = augment_generator(cfg.seed, epoch, ctx.rank) if transform is not None else None
    n = len(labels)
    order = epoch_order(n, cfg.seed, epoch)
    order = order[ctx.shard(n)]
    partner = _partner_order(n, cfg.seed, epoch)[ctx.shard(n)]
    total, count = 0.0, 0
    bs = ctx.worker_batch(cfg.attack_batch_size, "attack_batch_size")  # global batch split over workers
    for i in range(0, len(order), bs):
        b = order[i: i + bs]
        x, y = images[b].to(ctx.device), labels[b].to(ctx.device)
        x2 = images[partner[i: i + bs]].to(ctx.device)
        n_bd, n_cross = int(len(b) * cfg.poison_ratio), int(len(b) * cfg.p_cross)
        n_gen = max(n_bd, n_cross)  # partner images whose patterns are needed (cross and diversity)
        # one generator call per step (own inputs, then partners), as DDP expects
        src = torch.cat([x[:n_bd], x2[:n_gen]])
        parts, targets = [], []
        loss_div = torch.zeros((), device=ctx.device)
        if len(src):
            pats = gen(src)
            with torch.no_grad():
                masks = sharpen(mask_gen(src))
            p1, p2 = pats[:n_bd], pats[n_bd:]
            parts.append(ia.apply_inputaware(x[:n_bd], p1, masks[:n_bd]))
            targets.append(torch.full((n_bd,), cfg.target_label, dtype=y.dtype, device=y.device))
            xc = x[n_bd: n_bd + n_cross]
            parts.append(ia.apply_inputaware(xc, p2[:n_cross], masks[n_bd: n_bd + n_cross]))
            targets.append(y[n_bd: n_bd + n_cross])
            if n_bd and cfg.lambda_div > 0:
                loss_div = ia.diversity_loss(x[:n_bd], x2[:n_bd], p1, p2[:n_bd])
            if capture is not None:
                for key, idx, part in (("poisoned", b[:n_bd], parts[0]), ("cross", b[n_bd: n_bd + n_cross], parts[1])):
                    capture.setdefault(key, []).append((idx.clone(), part.detach().cpu()))
        parts.append(x[n_bd + n_cross:])
        targets.append(y[n_bd + n_cross:])
        inputs = torch.cat(parts)
        if transform is not None:
            inputs = transform(inputs, aug_gen)
        loss = F.cross_entropy(model(inputs), torch.cat(targets)) + cfg.lambda_div * loss_div
        set_lr(opt_c, cfg.attack_lr * scale(step))
        set_lr(opt_g, cfg.generator_lr * scale(step))
        opt_c.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_c.step()
        opt_g.step()
        step += 1
        total += loss.item() * len(b)
        count += len(b)
    return step, total / max(count, 1)


def record_from_capture(cfg: Config, ctx, train, capture: dict) -> dict[str, torch.Tensor]:
    """The `training_set` record (secsweep.trainset, mode STORED) of one epoch's `capture`: which
    samples were poisoned / cross and their images as trained, gathered over all workers."""
    pieces = {key: capture.get(key, []) for key in ("poisoned", "cross")}
    if ctx.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list = [None] * ctx.world_size
        torch.distributed.all_gather_object(gathered, pieces)
        pieces = {key: [item for worker in gathered for item in worker[key]] for key in pieces}
    n = len(train)
    keys, idx_all, img_all = [], [], []
    for rank_of_kind, key in enumerate(("poisoned", "cross")):
        for idx, part in pieces[key]:
            idx_all.append(idx)
            img_all.append(part)
            keys.append(torch.full((len(idx),), rank_of_kind))
    idx = torch.cat(idx_all) if idx_all else torch.empty(0, dtype=torch.long)
    kind = torch.cat(keys) if keys else torch.empty(0, dtype=torch.long)
    imgs = torch.cat(img_all) if img_all else torch.empty((0, *train.shape))
    # index order; a sample that DDP's padded shards gave two workers counts once, poisoned first
    order = torch.argsort(idx * 2 + kind)
    idx, kind, imgs = idx[order], kind[order], imgs[order]
    first = torch.ones(len(idx), dtype=torch.bool)
    first[1:] = idx[1:] != idx[:-1]
    idx, kind, images = idx[first], kind[first], imgs[first]
    masks = {key: torch.zeros(n, dtype=torch.bool) for key in ("poisoned", "cross")}
    masks["poisoned"][idx[kind == 0]] = True
    masks["cross"][idx[kind == 1]] = True
    labels = train.labels.clone()
    labels[masks["poisoned"]] = cfg.target_label
    return trainset.make_record(train, labels=labels, true_labels=train.labels, poisoned=masks["poisoned"],
                                cross=masks["cross"], epoch=cfg.attack_epochs - 1, mode=trainset.STORED,
                                images=images)


@register("inputaware", kind="attack", config=Config, trigger=trigger)
def run(cfg: Config, ctx) -> None:
    torch.manual_seed(cfg.seed)
    train = load_split(cfg, ctx, "train")
    test, val = load_split(cfg, ctx, "test"), load_split(cfg, ctx, "val")
    model = ctx.prepare_model(build_victim_model(cfg, train))
    gen, mask_gen = build_generators(cfg)
    gen = ctx.prepare_model(gen)
    mask_gen = mask_gen.to(ctx.device)
    opt_c = torch.optim.SGD(model.parameters(), lr=cfg.attack_lr, momentum=cfg.attack_momentum,
                            weight_decay=cfg.attack_weight_decay)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.generator_lr, betas=GENERATOR_BETAS)
    total_steps = cfg.attack_epochs * steps_per_epoch(len(train), cfg.attack_batch_size, ctx.world_size)
    scale = lr_scale(cfg.lr_schedule, total_steps)
    start, step = 0, 0
    state = ctx.restored()
    if state and "model" in state:
        unwrap(model).load_state_dict(state["model"])
        unwrap(gen).load_state_dict(state["generator"])
        mask_gen.load_state_dict(state["mask"])
        mask_gen.eval().requires_grad_(False)
        opt_c.load_state_dict(state["optimizer"])
        opt_g.load_state_dict(state["generator_optimizer"])
        start, step = int(state["epoch"]), int(state["step"])
    else:
        pretrain_mask(cfg, mask_gen, train.images, ctx.device)
    record = state.get(trainset.RECORD) if state else None  # restarted after the last epoch
    for epoch in range(start, cfg.attack_epochs):
        last = epoch == cfg.attack_epochs - 1
        capture: dict | None = {} if last else None
        step, loss = train_epoch(cfg, ctx, model, gen, mask_gen, train.images, train.labels, opt_c, opt_g,
                                 epoch, step, scale, capture=capture)
        if last:  # what the classifier trained on in the last epoch: the record defenses filter
            record = record_from_capture(cfg, ctx, train, capture)
        evaluate = BackdoorEval.build(test, make_trigger(unwrap(gen), mask_gen), cfg.target_label,
                                      cfg.include_target_class, val=val)
        metrics = {EPOCH: epoch + 1, LR: cfg.attack_lr * scale(max(step - 1, 0)), "train_loss": loss,
                   **evaluate(model, ctx.device)}
        ctx.report(metrics, state={
            "model": unwrap(model).state_dict(), "generator": unwrap(gen).state_dict(),
            "mask": mask_gen.state_dict(), "optimizer": opt_c.state_dict(),
            "generator_optimizer": opt_g.state_dict(), "epoch": epoch + 1, "step": step,
            **({trainset.RECORD: record} if last else {}),
        })
    if record is None:
        raise ArtifactError("inputaware: restarted after its last epoch from a checkpoint without the "
                            "training-set record; delete the trial's checkpoint to retrain")
    save_classifier(ctx, model, cfg)
    ctx.save_output(trainset.RECORD, record)
    ctx.save_output("generator", unwrap(gen).state_dict())
    ctx.save_output("mask", mask_gen.state_dict())
