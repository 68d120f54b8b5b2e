"""Backdoor *sample* detection on (possibly backdoored) encoders: what every detector of the kind
"sample_detector" shares (DeDe, ASSET, DECREE; docs/methods.md, "Sample-detection protocol").

A detector file says only how it fits and how it scores; this module does the rest:

* the victim (`DetectorConfig.victim`): a frozen encoder (kind "encoder_attack", or a clean
  "encoder" with the trigger of another stage, `trigger_from`: "a clean encoder with the same
  trigger stamped"), its trigger, target class and downstream task (`load_victim`);
* the detection test sets: clean downstream images and triggered non-target images at each of
  `poison_rates` (0.5 balanced, 0.01 unbalanced), drawn (seeded) from the downstream validation
  hold-out (`val_*` metrics: what sweeps select on) and from the test split (reported)
  (`detection_set`);
* the metrics, through one function (`evaluate_detection`): TPR and FPR at the detector's threshold
  (rule `threshold`), the ROC traced by sweeping the threshold over every score, and its AUC (the
  trapezoid over those points);
* the downstream-defense protocol (`downstream_defense`): detect on the (poisoned) downstream
  training set and on the test set, drop the flagged samples, train the downstream classifier on
  the victim's features of what remains, report CA and ASR with detected test samples counted as
  failed attacks, beside the same classifier trained without the detector ("No Def.");
* `run_detector(cfg, ctx, fit)`: all of the above for one detector.

Score convention: higher = more likely backdoored; a sample is flagged when its score is above the
threshold. Scores are computed per set: a detector may look at the whole set it screens at once
(ASSET optimises on the suspect set), so every (split, poison rate) set is scored on its own.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from . import refs
from .backdoor import load_split
from .config import fail, positive, require
from .names import (ASR, ASR_BEFORE, AUC, CLEAN_ACC, CLEAN_ACC_BEFORE, DEVICE_HOURS, EPOCH, FPR, TPR, VAL_ASR,
                    VAL_ASR_BEFORE, VAL_CLEAN_ACC, VAL_CLEAN_ACC_BEFORE)
from .poison import poison
from .refs import StageRef

log = logging.getLogger(__name__)

VAL_TPR, VAL_FPR, VAL_AUC = "val_" + TPR, "val_" + FPR, "val_" + AUC
# the threshold's value (not named "threshold": that is the config field holding the rule)
THRESHOLD, VAL_THRESHOLD = "score_threshold", "val_score_threshold"
# the downstream-defense protocol: fractions of the downstream training set the detector removed
REMOVED_POISON, REMOVED_CLEAN = "removed_poison", "removed_clean"
# fraction of clean test images the detector flags at the protocol's threshold (rejected at inference)
REJECTED_CLEAN, VAL_REJECTED_CLEAN = "rejected_clean", "val_rejected_clean"
# what every sample detector reports on its last epoch (per-rate versions are added by `rate_metric`)
METRICS = (TPR, FPR, AUC, VAL_TPR, VAL_FPR, VAL_AUC, THRESHOLD, ASR, CLEAN_ACC, ASR_BEFORE, CLEAN_ACC_BEFORE,
           VAL_ASR, VAL_CLEAN_ACC, VAL_ASR_BEFORE, VAL_CLEAN_ACC_BEFORE, REMOVED_POISON, REMOVED_CLEAN,
           REJECTED_CLEAN, DEVICE_HOURS)
OBJECTIVES = {VAL_AUC: "max"}
VICTIM_KINDS = ("encoder_attack", "encoder")
THRESHOLD_RULES = ("train_mean", "train_median", "quantile:Q", "test_mean", "median", "test_quantile:Q")


def rate_tag(rate: float) -> str:
    """The metric-name tag of a test poison rate: 0.5 -> "50pct", 0.01 -> "1pct"."""
    return f"{100 * rate:g}pct".replace(".", "_")


def rate_metric(base: str, rate: float, prefix: str = "") -> str:
    """`tpr_50pct`, `val_auc_1pct`, ...: a detection metric at one test poison rate."""
    return f"{prefix}{base}_{rate_tag(rate)}"


# -- thresholds --------------------------------------------------------------------------------

def parse_threshold(rule: str) -> tuple[str, float | None]:
    """(source, q) of a threshold rule: source "train" (the detector's scores on its own training
    data) or "test" (the scores of the set being screened); q = the quantile, None = the mean.

    Rules: "train_mean" (the paper's: the average training loss), "train_median", "quantile:Q"
    (the Q-quantile of the training scores), "test_mean", "median" (the median of the screened
    set's scores: the public evaluation script's rule), "test_quantile:Q"."""
    if not isinstance(rule, str):
        fail("threshold", rule, "must be a string: " + ", ".join(THRESHOLD_RULES))
    fixed = {"train_mean": ("train", None), "train_median": ("train", 0.5), "test_mean": ("test", None),
             "median": ("test", 0.5), "test_median": ("test", 0.5)}
    if rule in fixed:
        return fixed[rule]
    for head, source in (("quantile:", "train"), ("test_quantile:", "test")):
        if rule.startswith(head):
            try:
                q = float(rule[len(head):])
            except ValueError:
                q = float("nan")
            require(0.0 < q < 1.0, "threshold", rule, f"{head}Q needs a quantile Q in (0, 1)")
            return source, q
    fail("threshold", rule, "must be one of " + ", ".join(THRESHOLD_RULES))


def resolve_threshold(rule: str, train_scores: torch.Tensor | None, set_scores: torch.Tensor) -> float:
    """The threshold of `rule` given the detector's training scores and the screened set's scores."""
    source, q = parse_threshold(rule)
    ref = set_scores if source == "test" else train_scores
    if ref is None or len(ref) == 0:
        fail("threshold", rule, "needs the detector's scores on its training data, which this detector "
             "does not have; use median, test_mean or test_quantile:Q")
    ref = ref.detach().double().flatten()
    return float(ref.mean()) if q is None else float(torch.quantile(ref, q))


# -- metrics -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DetectionResult:
    """TPR/FPR at `threshold` (flag = score > threshold), and the ROC: `roc_fpr[i]`, `roc_tpr[i]`
    are the rates of the flags `score >= roc_thresholds[i]` (the first threshold is +inf: nothing
    flagged); `auc` is the trapezoid over those points."""

    tpr: float
    fpr: float
    auc: float
    threshold: float
    roc_fpr: torch.Tensor
    roc_tpr: torch.Tensor
    roc_thresholds: torch.Tensor


def roc_curve(scores: torch.Tensor, is_poison: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fpr, tpr, thresholds): the rates of `score >= t` for t = +inf and every distinct score,
    descending, so the curve runs from (0, 0) to (1, 1). Both classes must be present."""
    s = scores.detach().double().flatten()
    y = is_poison.detach().flatten().bool()
    if s.shape != y.shape:
        raise ValueError(f"scores shape={tuple(s.shape)}: must match is_poison shape={tuple(y.shape)}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"is_poison: needs both classes (poisoned {n_pos}, clean {n_neg})")
    if not torch.isfinite(s).all():
        raise ValueError("scores: must be finite")
    order = torch.argsort(s, descending=True, stable=True)
    s, y = s[order], y[order]
    tp, fp = torch.cumsum(y.double(), 0), torch.cumsum((~y).double(), 0)
    # the last position of every run of equal scores: all samples >= that score are flagged there
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    zero = torch.zeros(1, dtype=torch.float64)
    fpr = torch.cat([zero, fp[last] / n_neg])
    tpr = torch.cat([zero, tp[last] / n_pos])
    thresholds = torch.cat([torch.tensor([math.inf], dtype=torch.float64), s[last]])
    return fpr, tpr, thresholds


def trapezoid_auc(fpr: torch.Tensor, tpr: torch.Tensor) -> float:
    """Area under the (fpr, tpr) points by the trapezoid rule (points sorted by fpr, as `roc_curve`)."""
    return float(torch.trapezoid(tpr.double(), fpr.double()))


def evaluate_detection(scores: torch.Tensor, is_poison: torch.Tensor, threshold: float) -> DetectionResult:
    """TPR, FPR at `threshold`, the ROC and its AUC of one test set (the one metrics function)."""
    fpr, tpr, thr = roc_curve(scores, is_poison)
    s, y = scores.detach().double().flatten(), is_poison.detach().flatten().bool()
    flags = s > threshold
    return DetectionResult(tpr=flags[y].double().mean().item(), fpr=flags[~y].double().mean().item(),
                           auc=trapezoid_auc(fpr, tpr), threshold=float(threshold), roc_fpr=fpr, roc_tpr=tpr,
                           roc_thresholds=thr)


# -- config ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DetectorConfig:
    """What every sample detector shares: the victim, the test sets, the threshold rule and the
    downstream-defense protocol. A detector's Config subclasses it (and calls
    `super().__post_init__()`)."""

    # the encoder under test (kind encoder_attack, or a clean encoder with `trigger_from`); default:
    # BadEncoder's offline implanting recipe (SimCLR on Fashion-MNIST -> MNIST downstream)
    victim: StageRef = field(default_factory=lambda: StageRef("badencoder"))
    # where the trigger, its target class and the downstream task come from when they are not the
    # victim's own: required for a clean victim (the same trigger stamped on a clean encoder)
    trigger_from: StageRef | None = None
    downstream_dataset: str = ""       # "" = the trigger source's `downstream_dataset` (resolved on construction)
    test_size: int = 1000              # images per detection test set (capped at the split's size)
    poison_rates: tuple[float, ...] = (0.5, 0.01)  # triggered fraction of the test sets (DD: 50 % and 1 %)
    threshold: str = "train_mean"      # rule (`parse_threshold`; DD §4.3: the average training loss)
    # the downstream-defense protocol (DD §5.1): the downstream training set poisoned at this rate
    # (triggered non-target images relabelled to the target; DD: rate not stated, a choice)
    downstream_poison_rate: float = 0.1
    downstream_size: int = 0           # downstream training images (after the validation hold-out), 0 = all
    # the downstream classifier on the frozen victim's features (public code: an MLP 512-256, Adam 0.01)
    downstream_hidden: tuple[int, ...] = (512, 256)
    downstream_epochs: int = 20        # epochs over the kept features (public code: not fixed here; a choice)
    downstream_lr: float = 0.01        # Adam learning rate (public code)
    downstream_batch_size: int = 256   # features per step
    val_fraction: float = 0.1          # downstream validation hold-out (the val_* test sets)
    seed: int = 0                      # test-set draws, downstream poisoning and classifier

    def __post_init__(self) -> None:
        ref = refs.check(self, "victim", kinds=VICTIM_KINDS)
        if self.trigger_from is not None:
            refs.check(self, "trigger_from", kinds=("encoder_attack",))
        elif ref.spec().kind == "encoder":
            fail("trigger_from", None, f"must name an encoder attack whose trigger is stamped: victim "
                 f"{ref.trainable!r} is a clean encoder")
        src = self.trigger_source
        if "trigger" not in src.spec().hooks:
            fail("trigger_from" if self.trigger_from is not None else "victim", src.trainable,
                 "must register a trigger= hook (a patch or optimised trigger to stamp)")
        if not self.downstream_dataset:  # resolved here, so sweeps check the dataset that will be loaded
            object.__setattr__(self, "downstream_dataset", getattr(src.config(), "downstream_dataset", "") or "")
        if not self.downstream_dataset:
            fail("downstream_dataset", "", f"must be given: {src.trainable} names no downstream_dataset")
        require(self.downstream_dataset in data_mod.DATASETS, "downstream_dataset", self.downstream_dataset,
                "must be one of " + ", ".join(data_mod.DATASETS))
        require(self.test_size >= 4, "test_size", self.test_size, "must be >= 4 images")
        require(len(self.poison_rates) >= 1 and all(0.0 < r < 1.0 for r in self.poison_rates), "poison_rates",
                self.poison_rates, "must be one or more fractions in (0, 1)")
        require(len(set(map(rate_tag, self.poison_rates))) == len(self.poison_rates), "poison_rates",
                self.poison_rates, "must be distinct")
        parse_threshold(self.threshold)
        require(0.0 < self.downstream_poison_rate < 1.0, "downstream_poison_rate", self.downstream_poison_rate,
                "must be in (0, 1)")
        require(self.downstream_size >= 0, "downstream_size", self.downstream_size, "must be >= 0 (0 = all)")
        require(all(isinstance(h, int) and h >= 1 for h in self.downstream_hidden), "downstream_hidden",
                self.downstream_hidden, "must be widths >= 1 (empty = a linear head)")
        require(self.downstream_epochs >= 1, "downstream_epochs", self.downstream_epochs, "must be >= 1")
        positive("downstream_lr", self.downstream_lr)
        require(self.downstream_batch_size >= 2, "downstream_batch_size", self.downstream_batch_size, "must be >= 2")
        require(0.0 < self.val_fraction <= 0.5, "val_fraction", self.val_fraction, "must be in (0, 0.5]")

    @property
    def trigger_source(self) -> StageRef:
        """The stage whose trigger, target class and downstream task the evaluation uses."""
        return self.trigger_from if self.trigger_from is not None else self.victim


# -- the victim --------------------------------------------------------------------------------

@dataclass
class Victim:
    """The frozen encoder under test and what the evaluation stamps on it."""

    encoder: nn.Module                       # eval mode, no gradient, on the trial's device
    card: Any                                # its ModelCard
    shape: tuple[int, int]                   # (channels, size) of its inputs
    trigger: Callable[[torch.Tensor], torch.Tensor]
    target_label: int
    downstream_dataset: str
    backdoored: bool                         # kind encoder_attack (else a clean encoder + another's trigger)
    ref: StageRef
    device: torch.device

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """E(x): (N, D) embeddings on the CPU (batched, eval mode)."""
        from .ssl import features_of

        return features_of(self.encoder, images, self.device)

    def stamp(self, images: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        if len(images) == 0:
            return images.clone()
        return torch.cat([self.trigger(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def load_victim(cfg: DetectorConfig, ctx) -> Victim:
    encoder, card = ctx.load_model(cfg.victim, role="encoder")
    encoder.eval().requires_grad_(False)
    src = cfg.trigger_source
    src_cfg = src.config()
    stamp = src.spec().hooks["trigger"](src_cfg, ctx.stage(src))
    if card.input is None:
        raise ValueError(f"victim {cfg.victim.trainable}: its model card has no input contract")
    target = getattr(src_cfg, "target_label", None)
    dataset = cfg.downstream_dataset or getattr(src_cfg, "downstream_dataset", "")
    if target is None or not dataset:
        fail("trigger_from", src.trainable, "must have target_label and downstream_dataset fields")
    return Victim(encoder, card, (card.input.channels, card.input.size), stamp, int(target), dataset,
                  cfg.victim.spec().kind == "encoder_attack", cfg.victim, ctx.device)


def pretraining_config(ref: StageRef) -> Any:
    """The config that names the data the encoder of `ref` was pre-trained on: its own when it has
    the data fields (an SSL or poisoned pre-training run), else that of the stage it starts from
    (BadEncoder -> its clean encoder), recursively."""
    cfg = ref.config()
    needed = ("dataset", "train_size", "image_size", "channels", "val_fraction", "seed")
    if all(hasattr(cfg, k) for k in needed):
        return cfg
    ups = refs.ref_fields(cfg)
    named = [r for n, r in ups if n == "encoder"] or [r for _, r in ups]
    if not named:
        raise ValueError(f"stage {ref.trainable}: no pre-training data fields and no upstream encoder")
    return pretraining_config(named[0])


def pretraining_split(ref: StageRef, ctx, split: str) -> data_mod.ImageSet:
    """A split of the images the encoder of `ref` was pre-trained on (the defender's in-distribution
    data; `pretraining_config`), at that pre-training's input shape."""
    return load_split(pretraining_config(ref), ctx, split)


def downstream_splits(cfg: DetectorConfig, ctx, victim: Victim) -> tuple[data_mod.ImageSet, ...]:
    """(train, val, test) of the downstream task at the victim's input shape."""
    c, h = victim.shape
    dcfg = SimpleNamespace(dataset=victim.downstream_dataset, train_size=0, image_size=h, channels=c,
                           val_fraction=cfg.val_fraction, seed=cfg.seed)
    train, val, test = (load_split(dcfg, ctx, s) for s in ("train", "val", "test"))
    if cfg.downstream_size and cfg.downstream_size < len(train):
        g = torch.Generator().manual_seed(cfg.seed + 5)
        train = train.subset(torch.randperm(len(train), generator=g)[: cfg.downstream_size].sort().values)
    return train, val, test


# -- test sets ---------------------------------------------------------------------------------

def detection_set(images: torch.Tensor, labels: torch.Tensor, stamp: Callable, target: int, *, size: int,
                  rate: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, is_poison, labels) of one detection test set: round(rate * n) triggered copies of
    non-target images and n minus that many clean images (any class, none of them also triggered),
    shuffled; n = `size`, reduced where the split is too small for the rate. Seeded by `seed`."""
    g = torch.Generator().manual_seed(seed)
    n = min(size, len(images))
    non_target = torch.nonzero(labels != target).flatten()
    n_trig = max(1, round(rate * n))
    if n_trig > len(non_target):
        n = int(len(non_target) / rate)
        n_trig = len(non_target)
    n_trig = min(n_trig, n - 1)
    trig = non_target[torch.randperm(len(non_target), generator=g)[:n_trig]]
    rest = torch.ones(len(images), dtype=torch.bool)
    rest[trig] = False
    pool = torch.nonzero(rest).flatten()
    clean = pool[torch.randperm(len(pool), generator=g)[: n - n_trig]]
    x = torch.cat([stamp(images[trig]), images[clean]])
    y = torch.cat([torch.ones(len(trig), dtype=torch.bool), torch.zeros(len(clean), dtype=torch.bool)])
    lab = torch.cat([labels[trig], labels[clean]])
    order = torch.randperm(len(x), generator=g)
    return x[order], y[order], lab[order]


# -- the scorer a detector returns ---------------------------------------------------------------

@dataclass
class Scorer:
    """What a fitted detector gives the evaluation.

    score:        (N, C, H, W) images in [0, 1] -> (N,) scores on the CPU, higher = more suspicious;
                  called once per screened set (it may use the whole set, like ASSET);
    train_scores: its scores on its own training data (the "train_*" threshold rules), or None;
    metrics:      extra metrics to report with the evaluation (e.g. DECREE's encoder-level decision).
    """

    score: Callable[[torch.Tensor], torch.Tensor]
    train_scores: torch.Tensor | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = self.score(images)
        out = out.detach().float().cpu().flatten()
        if out.shape[0] != images.shape[0]:
            raise ValueError(f"score returned {out.shape[0]} scores for {images.shape[0]} images")
        return out


# -- the downstream classifier and the protocol ------------------------------------------------

class FeatureHead(nn.Module):
    """Standardise frozen features (training mean / std as buffers), then an MLP (or a linear layer)."""

    def __init__(self, dim: int, num_classes: int, hidden: tuple[int, ...], mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        layers: list[nn.Module] = []
        width = dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net((feats - self.mean) / self.std)


def train_head(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, *, hidden: tuple[int, ...],
               epochs: int, lr: float, batch_size: int, seed: int) -> FeatureHead:
    """The downstream classifier on frozen features: Adam, cross-entropy, seeded (global RNG untouched)."""
    x = feats.detach().float()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = FeatureHead(x.shape[1], num_classes, tuple(hidden), mean, std)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    head.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = order[i : i + batch_size]
                if len(idx) < 2:
                    continue
                loss = F.cross_entropy(head(x[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return head.eval().requires_grad_(False)


def downstream_defense(victim: Victim, scorer: Callable[[torch.Tensor], torch.Tensor],
                       threshold_of: Callable[[torch.Tensor], float], train: data_mod.ImageSet,
                       evals: Mapping[str, data_mod.ImageSet], *, poison_rate: float, hidden: tuple[int, ...] = (512, 256),
                       epochs: int = 20, lr: float = 0.01, batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """The downstream-defense protocol (DD §5.1, after ASSET) for any detector.

    The downstream training set is poisoned (a seeded `poison_rate` of non-target images triggered
    and relabelled to the target); the detector screens it (`scorer`, flagged = score above
    `threshold_of(scores of the screened set)`), the flagged samples are dropped and the classifier
    (`train_head`, on the victim's frozen features) trains on the rest. For every evaluation set
    `evals` {prefix: split} ("" test, "val_" validation): CA = the classifier's accuracy on the clean
    images; ASR = the fraction of triggered non-target images that the detector lets through
    (score at or below the threshold of the screened set: clean and triggered images together) and
    the classifier puts in the target class, i.e. detected samples count as failed attacks.
    `*_before`: the same classifier trained on the whole poisoned set, no screening ("No Def.").
    Also `removed_poison` / `removed_clean` (fractions of the training set's poisoned / clean
    samples dropped) and `rejected_clean` (clean test images flagged)."""
    target = victim.target_label
    poisoned = poison(train.images, train.labels, victim.stamp, ratio=poison_rate, target=target, seed=seed + 13,
                      exclude_target=True)
    train_scores = scorer(poisoned.images)
    flags = train_scores > threshold_of(train_scores)
    keep = ~flags
    if int(keep.sum()) < 2:
        raise ValueError(f"the detector flagged {int(flags.sum())} of {len(flags)} downstream training images: "
                         "nothing left to train on (threshold too low)")
    feats = victim.embed(poisoned.images)
    kw = dict(hidden=hidden, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    before = train_head(feats, poisoned.labels, train.num_classes, **kw)
    after = train_head(feats[keep], poisoned.labels[keep], train.num_classes, **kw)
    mask = poisoned.poisoned
    out = {REMOVED_POISON: flags[mask].float().mean().item() if mask.any() else 0.0,
           REMOVED_CLEAN: flags[~mask].float().mean().item()}
    for prefix, ds in evals.items():
        trig_idx = torch.nonzero(ds.labels != target).flatten()
        tx = victim.stamp(ds.images[trig_idx])
        screened = torch.cat([ds.images, tx])
        s = scorer(screened)
        flagged = s > threshold_of(s)
        f_clean, f_trig = flagged[: len(ds)], flagged[len(ds):]
        fc, ft = victim.embed(ds.images), victim.embed(tx)
        with torch.no_grad():
            for head, suffix in ((before, "_before"), (after, "")):
                out[f"{prefix}{CLEAN_ACC}{suffix}"] = (head(fc).argmax(1) == ds.labels).float().mean().item()
                hit = head(ft).argmax(1) == target
                if suffix == "":
                    hit = hit & ~f_trig  # a detected triggered input is a failed attack
                out[f"{prefix}{ASR}{suffix}"] = hit.float().mean().item() if len(tx) else float("nan")
        out[f"{prefix}{REJECTED_CLEAN}"] = f_clean.float().mean().item()
    return out


# -- one detector, end to end --------------------------------------------------------------------

def _write_roc(path, res: DetectionResult) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["threshold", "fpr", "tpr"])
        for t, x, y in zip(res.roc_thresholds.tolist(), res.roc_fpr.tolist(), res.roc_tpr.tolist()):
            w.writerow([t, x, y])


@dataclass
class Evaluation:
    """The detection test sets of a victim and what evaluating a scorer on them gives."""

    cfg: DetectorConfig
    victim: Victim
    train: data_mod.ImageSet                 # downstream training split (the protocol's)
    val: data_mod.ImageSet
    test: data_mod.ImageSet
    sets: dict[tuple[str, float], tuple[torch.Tensor, torch.Tensor]]  # (prefix, rate) -> (images, is_poison)
    results: dict[tuple[str, float], DetectionResult] = field(default_factory=dict)
    scores: dict[tuple[str, float], torch.Tensor] = field(default_factory=dict)  # of the last `detection`

    @classmethod
    def build(cls, cfg: DetectorConfig, ctx, victim: Victim) -> "Evaluation":
        train, val, test = downstream_splits(cfg, ctx, victim)
        sets = {}
        for i, rate in enumerate(cfg.poison_rates):
            for j, (prefix, ds) in enumerate((("val_", val), ("", test))):
                x, y, _ = detection_set(ds.images, ds.labels, victim.stamp, victim.target_label, size=cfg.test_size,
                                        rate=rate, seed=cfg.seed * 1000 + 17 * i + j + 1)
                sets[(prefix, rate)] = (x, y)
        return cls(cfg, victim, train, val, test, sets)

    def detection(self, scorer: Scorer, rates: tuple[float, ...] | None = None,
                  prefixes: tuple[str, ...] = ("val_", "")) -> dict[str, float]:
        """TPR / FPR / AUC (and the threshold) on each (split, rate) set; the first rate's are also
        reported without the rate tag (`tpr`, `val_auc`, ...)."""
        out: dict[str, float] = {}
        first = self.cfg.poison_rates[0]
        for (prefix, rate), (x, y) in self.sets.items():
            if prefix not in prefixes or (rates is not None and rate not in rates):
                continue
            s = scorer(x)
            res = evaluate_detection(s, y, resolve_threshold(self.cfg.threshold, scorer.train_scores, s))
            self.results[(prefix, rate)] = res
            self.scores[(prefix, rate)] = s
            for base, v in ((TPR, res.tpr), (FPR, res.fpr), (AUC, res.auc), (THRESHOLD, res.threshold)):
                out[rate_metric(base, rate, prefix)] = v
                if rate == first:
                    out[prefix + base] = v
        return out

    def auc(self, scorer: Scorer | Callable[[torch.Tensor], torch.Tensor], prefix: str = "val_",
            rate: float | None = None) -> float:
        """The AUC of one set (default: validation, first rate) alone: no threshold, so it needs no
        training scores (a cheap per-epoch monitor)."""
        x, y = self.sets[(prefix, self.cfg.poison_rates[0] if rate is None else rate)]
        s = scorer(x).detach().float().cpu().flatten()
        fpr, tpr, _ = roc_curve(s, y)
        return trapezoid_auc(fpr, tpr)

    def protocol(self, scorer: Scorer) -> dict[str, float]:
        c = self.cfg
        train = self.train
        return downstream_defense(self.victim, scorer, lambda s: resolve_threshold(c.threshold, scorer.train_scores, s),
                                  train, {"val_": self.val, "": self.test}, poison_rate=c.downstream_poison_rate,
                                  hidden=c.downstream_hidden, epochs=c.downstream_epochs, lr=c.downstream_lr,
                                  batch_size=c.downstream_batch_size, seed=c.seed)

    def evaluate(self, scorer: Scorer, ctx=None) -> dict[str, float]:
        """Everything the kind reports: detection metrics, the protocol, the scorer's own metrics;
        with `ctx`, the ROC points (CSV artifacts) and the scores (output `scores`) are saved too."""
        out = self.detection(scorer)
        out.update(self.protocol(scorer))
        out.update({k: float(v) for k, v in scorer.metrics.items()})
        log.info("detection: AUC %.3f TPR %.3f FPR %.3f (val AUC %.3f); downstream CA %.3f ASR %.3f "
                 "(no defense %.3f / %.3f)", out[AUC], out[TPR], out[FPR], out[VAL_AUC], out[CLEAN_ACC], out[ASR],
                 out[CLEAN_ACC_BEFORE], out[ASR_BEFORE])
        if ctx is not None:
            tensors = {}
            with ctx.uncharged():
                for (prefix, rate), res in self.results.items():
                    name = f"{prefix or 'test_'}{rate_tag(rate)}"
                    _write_roc(ctx.artifact_path(f"roc_{name}.csv"), res)
                    tensors[f"{name}_roc"] = torch.stack([res.roc_fpr, res.roc_tpr]).float()
                for (prefix, rate), (_, y) in self.sets.items():
                    tensors[f"{prefix or 'test_'}{rate_tag(rate)}_is_poison"] = y.float()
                    if (prefix, rate) in self.scores:
                        tensors[f"{prefix or 'test_'}{rate_tag(rate)}_scores"] = self.scores[(prefix, rate)].float()
                if scorer.train_scores is not None:
                    tensors["train_scores"] = scorer.train_scores.detach().float().cpu().flatten()
                ctx.save_output("scores", tensors)
        return out


def run_detector(cfg: DetectorConfig, ctx, fit: Callable[..., Scorer | None]) -> None:
    """Load the victim, build the test sets, fit the detector and report its evaluation.

    `fit(victim, evaluation)` trains the detector. A detector with a training loop
    (`secsweep.loop.fit`) passes `final_evaluate=lambda m, d: evaluation.evaluate(scorer_of(m), ctx)`
    so its last epoch's report carries the metrics, and returns None; one without (a scoring rule)
    returns its `Scorer`, and the evaluation is reported here as one epoch."""
    victim = load_victim(cfg, ctx)
    evaluation = Evaluation.build(cfg, ctx, victim)
    scorer = fit(victim, evaluation)
    if scorer is not None:
        ctx.report({EPOCH: 1, **evaluation.evaluate(scorer, ctx)})


__all__ = ["DetectorConfig", "DetectionResult", "Evaluation", "METRICS", "OBJECTIVES", "Scorer", "Victim",
           "detection_set", "downstream_defense", "evaluate_detection", "load_victim", "parse_threshold",
           "pretraining_config", "pretraining_split", "rate_metric", "rate_tag", "resolve_threshold", "roc_curve", "run_detector",
           "train_head", "trapezoid_auc"]
