"""Model stealing through a black-box oracle (thesis ch. 4; docs/methods.md, "Model stealing"):
what every stealing trainable of this package shares.

The attacker never holds the target. `target_oracles(cfg, ctx)` is the only code that touches the
target model: it loads it from its upstream stage (`ctx.load_model(cfg.target)`) and returns two
`secsweep.oracle.Oracle`s around it plus public metadata (`TargetInfo`: input shape, output size,
the target's pre-training device-hours):

* the attacker's oracle: the owner's output defenses (`noise_sigma`, `top_k`, `round_digits`,
  `reverse_sigmoid`) and the attacker's query budget (`query_budget`, 0 = unlimited);
* the evaluation oracle: the same defenses (with another noise seed), no budget — what a legitimate
  downstream user of the deployed service gets, used to measure the target's utility and the
  agreement; its queries are not the attacker's and are not counted as such.

`steal(oracle, surrogate, images, ctx, cfg, step_of=...)` is the one stealing loop (secsweep.loop.fit):
it receives the oracle, never the target. Each epoch queries the oracle on every surrogate image
the budget still allows (the images of an epoch are cut so the total never exceeds the budget;
once it is spent the remaining epochs train on nothing and report as before), so the queries of a
run are epochs x surrogate images (or the budget).

Surrogate data (`surrogate_dataset`, default "mnist": a different distribution from the
Fashion-MNIST the default targets were trained on, as the thesis steals CIFAR-10 encoders with
STL-10 queries): a seeded pool of `surrogate_size` images of its training split (0 = the whole
split), of which the attacker has the first `surrogate_fraction` (T-Fig 4.21's data axis), resized
and converted to the target's input contract. Labels of the surrogate data are never used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from secsweep import data as data_mod
from secsweep import oracle as oracle_mod
from secsweep.backdoor import load_split
from secsweep.config import one_of, positive, require
from secsweep.context import Context
from secsweep.loop import OPTIMIZERS, fit
from secsweep.names import AGREEMENT, DEVICE_HOURS

VAL_AGREEMENT = "val_agreement"
STEAL_ACC, VAL_STEAL_ACC = "steal_acc", "val_steal_acc"     # the surrogate's downstream accuracy
TARGET_ACC, VAL_TARGET_ACC = "target_acc", "val_target_acc"  # the target's, through its (defended) answers
QUERIES = "queries"          # images the attacker sent to the oracle so far
ATTACK_USD, TARGET_USD, COST_RATIO = "attack_usd", "target_usd", "cost_ratio"  # T-Tab 4.1 cost model
METRICS = (AGREEMENT, VAL_AGREEMENT, STEAL_ACC, VAL_STEAL_ACC, TARGET_ACC, VAL_TARGET_ACC, QUERIES,
           ATTACK_USD, TARGET_USD, COST_RATIO, DEVICE_HOURS)

ROUND_OFF = -1   # round_digits value that turns rounding off (0 digits is a valid rounding)
EVAL_SEED_OFFSET = 1_000_003  # the evaluation oracle's noise seed = seed + this (independent draws)


@dataclass(frozen=True)
class StealConfig:
    """Fields every stealing trainable has (the target field is the subclass's: its kinds differ)."""

    # the attacker: surrogate architecture, data and training (Adam 3e-4: Cont-Steal's released code)
    surrogate_model: str = "smallcnn"     # secsweep.models (encoders: encoder_names())
    surrogate_dataset: str = "mnist"      # the attacker's query images (a distribution the target never saw)
    surrogate_size: int = 2000            # pool of surrogate images, 0 = the dataset's whole training split
    surrogate_fraction: float = 1.0       # fraction of the pool the attacker has (T-Fig 4.21: 10 % .. 100 %)
    epochs: int = 10                      # surrogate training epochs (T: 100)
    batch_size: int = 128                 # images per step (Cont-Steal: N, the negatives per anchor)
    optimizer: str = "adam"               # sgd, adam, adamw, lars (released code: Adam)
    lr: float = 3e-4                      # learning rate (released code: 3e-4)
    weight_decay: float = 0.0             # L2 weight decay (released code: none)
    query_budget: int = 0                 # most images the oracle answers the attacker, 0 = unlimited
    # the owner's output defenses (T section 4.4.8, secsweep.oracle.OutputDefense)
    noise_sigma: float = 0.0              # Gaussian noise level sigma added to every answer (0 = off)
    top_k: int = 0                        # keep the k largest entries of every answer (0 = off)
    round_digits: int = ROUND_OFF         # round answers to d decimal digits (-1 = off)
    reverse_sigmoid: bool = False         # ART's ReverseSigmoid on posteriors (classifier oracles)
    # evaluation: the downstream task both the target and the surrogate are judged on
    downstream_dataset: str = "fashion_mnist"   # its training split trains the heads, its test split reports
    probe_train_size: int = 2000          # downstream training images (train + validation), 0 = all
    probe_test_size: int = 1000           # downstream test images (the first of the test split), 0 = all
    val_fraction: float = 0.1             # stratified validation hold-out of the downstream training images
    # T-Tab 4.1's cost model (secsweep.oracle.costs)
    usd_per_gpu_hour: float = oracle_mod.GPU_USD_PER_HOUR
    usd_per_1000_queries: float = oracle_mod.USD_PER_1000_QUERIES
    seed: int = 0

    def check_steal(self, models: tuple[str, ...]) -> None:
        one_of("surrogate_model", self.surrogate_model, models)
        one_of("surrogate_dataset", self.surrogate_dataset, data_mod.DATASETS)
        require(self.surrogate_size >= 0, "surrogate_size", self.surrogate_size, "must be >= 0 (0 = the whole split)")
        require(0.0 < self.surrogate_fraction <= 1.0, "surrogate_fraction", self.surrogate_fraction,
                "must be in (0, 1] (fraction of the surrogate pool)")
        require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        require(self.batch_size >= 2, "batch_size", self.batch_size, "must be >= 2")
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        positive("lr", self.lr)
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(self.query_budget >= 0, "query_budget", self.query_budget, "must be >= 0 (0 = unlimited)")
        require(self.noise_sigma >= 0, "noise_sigma", self.noise_sigma, "must be >= 0 (0 = off)")
        require(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0 = off)")
        require(self.round_digits >= ROUND_OFF, "round_digits", self.round_digits, "must be >= 0, or -1 (off)")
        one_of("downstream_dataset", self.downstream_dataset, data_mod.DATASETS)
        require(self.probe_train_size >= 0, "probe_train_size", self.probe_train_size, "must be >= 0 (0 = all)")
        require(self.probe_test_size >= 0, "probe_test_size", self.probe_test_size, "must be >= 0 (0 = all)")
        require(0.0 < self.val_fraction <= 0.5, "val_fraction", self.val_fraction, "must be in (0, 0.5]")
        require(self.usd_per_gpu_hour >= 0, "usd_per_gpu_hour", self.usd_per_gpu_hour, "must be >= 0")
        require(self.usd_per_1000_queries >= 0, "usd_per_1000_queries", self.usd_per_1000_queries, "must be >= 0")

    def defense(self, seed: int) -> oracle_mod.OutputDefense:
        return oracle_mod.OutputDefense(noise_std=float(self.noise_sigma), top_k=self.top_k or None,
                                        round_digits=None if self.round_digits == ROUND_OFF else self.round_digits,
                                        reverse_sigmoid=self.reverse_sigmoid, seed=seed)


@dataclass(frozen=True)
class TargetInfo:
    """What the attacker may know of the deployed target: its input contract and output size (an API
    documents both), and, for the cost model only, the device-hours its owner spent training it."""

    channels: int
    size: int
    out_dim: int                 # embedding dimension (encoders) or number of classes (classifiers)
    device_hours: float          # the target stage's reported device_hours (T-Tab 4.1's pre-training cost)
    dataset: str                 # the target's training data (for messages)


def target_oracles(cfg: Any, ctx: Context, output: str) -> tuple[oracle_mod.Oracle, oracle_mod.Oracle, TargetInfo]:
    """(attacker's oracle, evaluation oracle, TargetInfo) around the model of the stage `cfg.target`.

    The only function that holds the target module; it leaves this scope inside the oracles'
    closures only (`secsweep.oracle`)."""
    out = ctx.stage(cfg.target)
    model, card = ctx.load_model(out)
    if card.input is None:
        raise ValueError(f"target={cfg.target.trainable}: its model card has no input contract; "
                         "a stealing attack needs the image shape the service accepts")
    out_dim = card.feature_dim if output == "embedding" else card.num_classes
    if not out_dim:
        raise ValueError(f"target={cfg.target.trainable}: its card gives no "
                         f"{'feature_dim' if output == 'embedding' else 'num_classes'}")
    budget = cfg.query_budget or None
    attack = oracle_mod.Oracle(model, output=output, budget=budget, defense=cfg.defense(cfg.seed))
    evaluation = oracle_mod.Oracle(model, output=output, defense=cfg.defense(cfg.seed + EVAL_SEED_OFFSET))
    info = TargetInfo(int(card.input.channels), int(card.input.size), int(out_dim),
                      float(out.metrics.get(DEVICE_HOURS, 0.0)), str(getattr(cfg.target.config(), "dataset", "")))
    del model
    return attack, evaluation, info


def surrogate_images(cfg: StealConfig, ctx: Context, info: TargetInfo) -> torch.Tensor:
    """The attacker's unlabelled query images (module docstring), in the target's input shape."""
    ds = data_mod.load(cfg.surrogate_dataset, "train", ctx.data_root, download=ctx.download,
                       image_size=info.size, channels=info.channels)
    g = torch.Generator().manual_seed(cfg.seed * 9973 + 11)
    order = torch.randperm(len(ds), generator=g)
    pool = order[: cfg.surrogate_size] if cfg.surrogate_size else order
    n = max(1, math.floor(cfg.surrogate_fraction * len(pool) + 1e-9))
    return ds.images[pool[:n].sort().values]


def downstream_splits(cfg: Any, ctx: Context, channels: int, size: int,
                      dataset: str | None = None) -> tuple[data_mod.ImageSet, ...]:
    """(train, val, test) of the downstream task `dataset` (default `cfg.downstream_dataset`) at the
    encoders' input shape: the training split's seeded `cfg.probe_train_size` images less a
    stratified `cfg.val_fraction`, and the test split's first `cfg.probe_test_size` images. The
    heads of every stealing trainable train and are scored on these."""
    dcfg = SimpleNamespace(dataset=dataset or cfg.downstream_dataset, train_size=cfg.probe_train_size,
                           image_size=size, channels=channels, val_fraction=cfg.val_fraction, seed=cfg.seed)
    train, val, test = (load_split(dcfg, ctx, s) for s in ("train", "val", "test"))
    if cfg.probe_test_size and cfg.probe_test_size < len(test):
        test = test.subset(torch.arange(cfg.probe_test_size))
    return train, val, test


def epoch_images(images: torch.Tensor, budget: int, epoch: int) -> torch.Tensor:
    """The images of epoch `epoch` (0-based) when every epoch queries each image once and at most
    `budget` queries are allowed in all (0 = unlimited): the first ones that still fit."""
    if not budget:
        return images
    n = len(images)
    left = budget - epoch * n
    return images[: max(0, min(n, left))]


Step = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], Any]


def steal(oracle: oracle_mod.Oracle, surrogate: nn.Module, images: torch.Tensor, ctx: Context, cfg: StealConfig, *,
          step_of: Callable[[oracle_mod.Oracle], Step],
          evaluate: Callable[[nn.Module, torch.device], Mapping[str, float]],
          target_device_hours: float, extra: Mapping[str, float] | None = None) -> nn.Module:
    """Train `surrogate` on `images` with `step_of(oracle)` (the method's loss of one batch; it
    queries the oracle) through secsweep.loop.fit; every epoch's report adds `evaluate(surrogate)`,
    the queries used and the cost model against `target_device_hours` (the target's pre-training,
T-Tab 4.1). Returns the trained surrogate. Gets only the oracle: the
    target model is not an argument (tests/test_stealing.py checks)."""
    state = {"queries_before": 0, QUERIES: 0}   # the count survives a resume through the checkpoint

    def on_resume(saved: Mapping[str, Any]) -> None:
        state["queries_before"] = int(saved.get(QUERIES, 0))

    def evaluate_all(model: nn.Module, device: torch.device) -> dict[str, float]:
        queries = state["queries_before"] + oracle.queries_used
        state[QUERIES] = queries
        cost = oracle_mod.costs(queries, ctx.device_hours(), target_device_hours,
                                usd_per_gpu_hour=cfg.usd_per_gpu_hour, usd_per_1000_queries=cfg.usd_per_1000_queries)
        return {**evaluate(model, device), **cost.metrics()}

    return fit(surrogate, lambda epoch: (epoch_images(images, cfg.query_budget, epoch), None), ctx,
               epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, step=step_of(oracle), opt=cfg.optimizer,
               lr=cfg.lr, weight_decay=cfg.weight_decay, evaluate=evaluate_all, extra=extra,
               extra_state=state, on_resume=on_resume)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of positions where two label vectors agree."""
    return (a.cpu() == b.cpu()).float().mean().item()
