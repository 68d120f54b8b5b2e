"""Training and evaluation loops over in-memory tensors, shared by every trainable.

Datasets here fit in memory (and on a GPU), so batches are index slices of one tensor rather than
DataLoader workers: on a 2-core machine that is several times faster, and it is deterministic.
On the fast path (`secsweep.accel`, chosen by the Context: the default on CUDA) the sets are resident
on the device and batches are gathered there, under autocast and in channels_last.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import accel
from .context import Context


Step = Callable[[nn.Module, torch.Tensor, torch.Tensor, "torch.Generator | None"], torch.Tensor]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The same permutation of range(n) on every worker for a given (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def augment_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of an epoch's data augmentation on worker `rank`, apart from
    `epoch_order`'s seeds (seed * 100_003 + epoch) so the crops do not follow the batch order."""
    return torch.Generator().manual_seed(seed * 100_003 + 90_001 + epoch * 1_009 + rank)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def train_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    opt: torch.optim.Optimizer,
    ctx: Context,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    step: int = 0,
    lr_at: Callable[[int], float] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    step_fn: "Step | None" = None,
    after_step: Callable[[int], None] | None = None,
    scheduler: "torch.optim.lr_scheduler.LRScheduler | None" = None,
    train_mode: Callable[[nn.Module], None] | None = None,
    parts_out: dict[str, float] | None = None,
) -> tuple[int, float]:
    """One pass over this worker's shard; `lr_at(step)` sets the learning rate before every step.

    The loss of a batch is `step_fn(model, x, y, generator)` when given (the pluggable step of
    `secsweep.loop`: a contrastive loss over two views drawn with `generator`, a distillation
    loss, ...), else `loss_fn(model(x), y)`. `after_step(step)` runs after every optimizer step
    (momentum / EMA targets), `scheduler` (a torch LR scheduler) is stepped after it, and
    `train_mode(model)` replaces `model.train()` (frozen BatchNorm, frozen submodules). A step may
    return `(loss, {name: term})` instead of the loss: the terms (e.g. a distillation loss next to
    the cross-entropy) are averaged over the epoch like the loss and written into `parts_out`.

    `transform(x, generator)`, if given, is applied to every batch once it is on the device (data
    augmentation, `secsweep.ops.augment`); its generator is seeded by (seed, epoch, rank)
    (`augment_generator`), so an epoch's augmentations are the same after a restart and differ
    from epoch to epoch.

    `batch_size` is GLOBAL: the samples of one optimizer step summed over all workers. Each of the
    world_size workers takes batch_size // world_size of them (`ctx.worker_batch`; a batch that does
    not split evenly is refused), and DDP averages their gradients, so a step of an N-worker trial
    is the one-worker trial's step on the same samples (`ctx.shard`), and the steps per epoch, the
    learning-rate schedule and the trial's result do not depend on the number of workers. Hence the
    stage key (the config) needs no worker count. (Not bit-identical: BatchNorm statistics
    are per worker's part of the batch, and float sums run in another order.)
    On the fast path (`ctx.fast`, `secsweep.accel`) the set is resident on the device, batches are
    gathered there, formatted channels_last and run under autocast; same samples, same order, same
    augmentation draws: results equal the reference path's up to float rounding (exactly, without
    autocast and channels_last).
    Returns (global step after the epoch, mean training loss of this worker's samples).
    """
    fast = getattr(ctx, "fast", accel.REFERENCE)
    (train_mode or nn.Module.train)(model)
    per_worker = ctx.worker_batch(batch_size)
    order = epoch_order(len(labels), seed, epoch)
    order = order[ctx.shard(len(order))]
    if fast.device_data:  # one copy per set (cached), then index gathers on the device
        src, ys = accel.resident(images, ctx.device), accel.resident_tensor(labels, ctx.device)
        order = order.to(ctx.device)
    # the loss sum stays on the device (float64, in the order of the former per-step `loss.item()`
    # sum, so the mean is bit for bit the same) and is read once per epoch: no host sync per step
    # (MPS has no float64: float32 there)
    total = torch.zeros((), dtype=torch.float32 if ctx.device.type == "mps" else torch.float64, device=ctx.device)
    count = 0
    parts: dict[str, torch.Tensor] = {}
    aug_gen = augment_generator(seed, epoch, ctx.rank) if transform is not None or step_fn is not None else None
    for i in range(0, len(order), per_worker):
        b = order[i : i + per_worker]
        if fast.device_data:
            x, y = src.take(b), ys[b]
        else:
            x = images[b].to(ctx.device, non_blocking=True)
            y = labels[b].to(ctx.device, non_blocking=True)
        if transform is not None:
            x = transform(x, aug_gen)
        x = accel.format_batch(x, fast)
        if lr_at is not None:
            set_lr(opt, lr_at(step))
        with accel.autocast(fast, ctx.device):
            loss = step_fn(model, x, y, aug_gen) if step_fn is not None else loss_fn(model(x), y)
        if isinstance(loss, tuple):  # (loss, named terms)
            loss, terms = loss
            for k, v in terms.items():
                parts[k] = parts.get(k, 0) + v.detach().to(total.dtype) * len(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        step += 1
        if after_step is not None:
            after_step(step)
        total += loss.detach().to(total.dtype) * len(b)
        count += len(b)
    if parts_out is not None:
        parts_out.update({k: float(v) / max(count, 1) for k, v in parts.items()})
    return step, total.item() / max(count, 1)


@torch.no_grad()
def batched_eval(fn: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, images: torch.Tensor,
                 device: torch.device, batch_size: int = 1024, empty_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`fn(batch)` over `images` in eval mode, batch by batch on `device`, concatenated on the CPU;
    the model's train/eval mode is restored afterwards.

    On the fast path (`accel.current()`) the images are resident on the device (copied once per set,
    `accel.resident`) and the outputs stay there until one copy to the CPU at the end; the batches
    are the same float32 values either way, and evaluation never autocasts: the results are the
    reference path's up to the rounding of channels_last kernels."""
    fast = accel.current()
    was_training = model.training
    model.eval()
    try:
        if fast.device_data and len(images):
            src = accel.resident(images, device)
            out = [fn(accel.format_batch(src.slice(i, i + batch_size), fast)) for i in range(0, len(images), batch_size)]
            out = [torch.cat(out).cpu()]
        else:
            out = [fn(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=empty_dtype)


def predict(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """Predicted labels (CPU tensor) in eval mode."""
    return batched_eval(lambda x: model(x).argmax(1), model, images, device, batch_size, torch.long)


def features(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """Penultimate representations `model.features(x)` (CPU tensor, eval mode)."""
    return batched_eval(model.features, model, images, device, batch_size)


def probabilities(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """Softmax posteriors (CPU tensor, eval mode)."""
    return batched_eval(lambda x: model(x).softmax(1), model, images, device, batch_size)


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps of one epoch over `n` samples at the global batch `batch_size`:
    ceil(n / batch_size) for every `world_size` that divides the batch (the shards are padded to a
    multiple of world_size, which never crosses a multiple of the batch)."""
    per_worker = -(-n // world_size)
    return max(1, -(-per_worker // max(1, batch_size // world_size)))
