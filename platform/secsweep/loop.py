"""The one training loop every trainable uses: a pluggable step, any optimizer, schedules, targets.

`fit(model, data, ctx, ...)` trains for `epochs` over in-memory tensors (`secsweep.training`),
reports after every epoch with a checkpoint when one is due, and resumes from the last one after a
restart. What differs between methods is passed in, not re-implemented:

* the **step** — the loss of one batch, `step(model, x, y, generator)`: cross-entropy by default;
  a step may return `(loss, {name: term})` and every named term is reported per epoch too;
  a contrastive loss over two augmented views (SimCLR), a distance to a momentum target (BYOL), the
  BadEncoder terms, ...;
* the **optimizer** — `optimizer(name, params, lr=..., ...)`: SGD, Adam, AdamW or LARS (lightly's);
* the **learning rate** — `lr_at(step)` (a function of the optimizer step; the SFT schedule), or a
  torch LR scheduler from `scheduler(opt, steps_per_epoch)`, stepped every optimizer step;
* **targets** — `after_step(step)` after every optimizer step: the momentum update of a MoCo key
  encoder or a BYOL target (lightly's `update_momentum`);
* **frozen parts** — `frozen=` modules stay in eval mode and get no gradient (frozen BatchNorm:
  `freeze_batchnorm=True`, as BadEncoder trains);
* **evaluators** — `evaluate(model, device) -> {metric: value}` after every epoch, the declared
  metrics of the trainable.

Everything that must survive a restart — the model (including momentum targets and queues, as
submodules and buffers), the optimizer, the scheduler, the epoch and the step — is in the
checkpoint, read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .config import fail
from .context import Context
from .names import EPOCH, LR
from .training import Step, train_epoch

OPTIMIZERS = ("sgd", "adam", "adamw", "lars")


def optimizer(name: str, params: Iterable[torch.nn.Parameter], *, lr: float, momentum: float = 0.9,
              weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """A torch optimizer by name. `momentum` is SGD's and LARS's; `betas` Adam's. LARS (You et al.
    2017) is lightly's implementation, the optimizer of large-batch SimCLR/BYOL recipes."""
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "lars":
        from lightly.utils.lars import LARS

        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    fail("optimizer", name, "must be one of " + ", ".join(OPTIMIZERS))


SCHEDULES = ("constant", "cosine", "warmup_cosine")


def lr_schedule(name: str, lr: float, total_steps: int, *, warmup_steps: int = 0,
                final_fraction: float = 0.0) -> Callable[[int], float]:
    """The learning rate per optimizer step: constant, cosine decay to `final_fraction`·lr over
    `total_steps`, or the same after a linear warm-up of `warmup_steps` (SSL recipes)."""
    import math

    if name not in SCHEDULES:
        fail("schedule", name, "must be one of " + ", ".join(SCHEDULES))
    if name == "constant":
        return lambda step: lr
    warm = warmup_steps if name == "warmup_cosine" else 0

    def at(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total_steps - warm))
        return lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t)))

    return at


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def freeze(modules: Sequence[nn.Module]) -> None:
    """No gradients for `modules` (their mode is set by `train_mode_with`)."""
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


def train_mode_with(frozen: Sequence[nn.Module], freeze_batchnorm: bool) -> Callable[[nn.Module], None]:
    """`model.train()`, then eval mode for the frozen modules (and every BatchNorm if asked):
    their running statistics stay as they were and dropout is off."""
    def set_mode(model: nn.Module) -> None:
        model.train()
        for m in frozen:
            m.eval()
        if freeze_batchnorm:
            for m in model.modules():
                if is_batchnorm(m):
                    m.eval()
    return set_mode


def fit(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor | None] | Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    ctx: Context,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    step: Step | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    opt: str | Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] = "sgd",
    lr: float | None = None,
    lr_at: Callable[[int], float] | None = None,
    scheduler: Callable[[torch.optim.Optimizer, int], Any] | None = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    after_step: Callable[[int], None] | None = None,
    frozen: Sequence[nn.Module] = (),
    freeze_batchnorm: bool = False,
    evaluate: Callable[[nn.Module, torch.device], Mapping[str, float]] | None = None,
    extra: Mapping[str, float] | None = None,
    extra_state: Mapping[str, Any] | None = None,
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    on_resume: Callable[[Mapping[str, Any]], None] | None = None,
    final_evaluate: Callable[[nn.Module, torch.device], Mapping[str, float]] | None = None,
) -> nn.Module:
    """Train `model` on `data` for `epochs`; after every epoch report `evaluate(model)` plus `extra`,
    with a checkpoint on the epochs `ctx.checkpoint_due` names, and resume from the last one.

    `data` is (images, labels) — labels may be None for unlabelled data, then `step` must not use
    them — or a function of the 0-based epoch returning them (training sets that change per epoch).
    The learning rate is `lr_at(step)` if given, else `lr` (constant) under the torch `scheduler`
    built by `scheduler(opt, steps_per_epoch)` if given. `opt` is an optimizer name (`optimizer`)
    or a factory of the trainable parameters. `frozen` modules get no gradient and stay in eval
    mode; `freeze_batchnorm` keeps every BatchNorm in eval mode. `on_resume(state)` lets a method
    restore what it keeps outside the model. `final_evaluate` adds metrics to the last epoch's
    report only (an expensive evaluation such as a linear probe). Returns the bare (unwrapped) model.
    """
    from .training import steps_per_epoch

    if lr_at is None and lr is None:
        raise TypeError("fit: give lr or lr_at")
    freeze(frozen)
    model = ctx.prepare_model(model)
    bare = getattr(model, "module", model)
    first_lr = lr_at(0) if lr_at is not None else lr
    if callable(opt):
        optim = opt(p for p in model.parameters() if p.requires_grad)
    else:
        optim = optimizer(opt, model.parameters(), lr=first_lr, momentum=momentum, weight_decay=weight_decay)
    sched = None
    if scheduler is not None:
        n = len(data(0)[0]) if callable(data) else len(data[0])
        sched = scheduler(optim, steps_per_epoch(n, batch_size, ctx.world_size))
    start, global_step = 0, 0
    state = ctx.restored()
    if state and "model" in state:
        bare.load_state_dict(state["model"])
        optim.load_state_dict(state["optimizer"])
        if sched is not None and "scheduler" in state:
            sched.load_state_dict(state["scheduler"])
        start, global_step = int(state["epoch"]), int(state["step"])
        if on_resume is not None:
            on_resume(state)
    kw: dict[str, Any] = {"loss_fn": loss_fn} if loss_fn is not None else {}
    mode = train_mode_with(tuple(frozen), freeze_batchnorm) if frozen or freeze_batchnorm else None
    for epoch in range(start, epochs):
        parts: dict[str, float] = {}
        x, y = data(epoch) if callable(data) else data
        if y is None:  # unlabelled: the step gets a placeholder it must not use
            y = torch.full((len(x),), -1, dtype=torch.long)
        global_step, loss = train_epoch(model, x, y, optim, ctx, batch_size=batch_size, seed=seed, epoch=epoch,
                                        step=global_step, lr_at=lr_at, transform=transform, step_fn=step,
                                        after_step=after_step, scheduler=sched, train_mode=mode,
                                        parts_out=parts, **kw)
        current_lr = lr_at(max(global_step - 1, 0)) if lr_at is not None else optim.param_groups[0]["lr"]
        metrics = {EPOCH: epoch + 1, LR: current_lr, "train_loss": loss, **parts, **(extra or {})}
        if evaluate is not None:
            metrics.update(evaluate(model, ctx.device))
        if final_evaluate is not None and epoch + 1 == epochs:
            metrics.update(final_evaluate(model, ctx.device))
        due = ctx.checkpoint_due(epoch + 1, last=epoch + 1 == epochs)  # every k epochs (secsweep.accel)
        ckpt = None
        if due:
            ckpt = {**(extra_state or {}), "model": bare.state_dict(), "optimizer": optim.state_dict(),
                    "epoch": epoch + 1, "step": global_step}
            if sched is not None:
                ckpt["scheduler"] = sched.state_dict()
        ctx.report(metrics, state=ckpt)
    return bare
