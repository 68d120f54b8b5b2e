"""Ownership watermark against Cont-Steal (thesis §4.4.8, T-Tab 4.5; docs/methods.md, "Model stealing").

The owner watermarks its encoder with BadEncoder (`target`: an encoder attack that registers a
`trigger=` hook — a trigger e and the reference inputs of one class t of a downstream task) before
deploying it. When a suspect encoder appears, the owner trains a downstream head on it and checks
whether trigger-stamped inputs land in class t: the watermark rate (wr) is the BadEncoder ASR of
the trigger/target pair (the thesis does not give its formula; the choice is documented in
docs/methods.md): the fraction of triggered test images of the other classes that a linear head
(`secsweep.ops.ssl.linear_probe`, trained on the encoder's clean features of the downstream task)
classifies as t. `acc` is that head's clean test accuracy.

Three encoders are checked, as T-Tab 4.5's columns:

* the watermarked target itself (`target_wr`, `target_acc`);
* a Cont-Steal surrogate stolen from it through the oracle (`surrogate_wr`, `surrogate_acc`): the
  `cont_steal` stage with `target` = this target and the steal fields below; by default the strong
  adversary of T-Tab 4.5, whose surrogate data are the downstream data (`steal_dataset` "" = the
  BadEncoder's downstream dataset);
* the clean baseline — the encoder BadEncoder started from (`baseline_wr`, `baseline_acc`), which
  never saw the trigger: the rate a trigger reaches by chance.

Ownership is claimed when the suspect's wr is far above the baseline's. The thesis's result: the
target keeps wr ~0.999, but Cont-Steal surrogates do not inherit it (0.03-0.30 against a clean
baseline's ~0.1): the watermark does not survive stealing. `val_surrogate_wr` is the surrogate's
rate on the downstream validation hold-out (selection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from secsweep import data as data_mod
from secsweep import refs
from secsweep.config import one_of, require
from secsweep.names import DEVICE_HOURS
from secsweep.ops import ssl as ssl_ops
from secsweep.poison import triggered_test_set
from secsweep.refs import StageRef
from secsweep.registry import register
from secsweep.ssl import features_of

from . import downstream_splits

WHO = ("target", "surrogate", "baseline")
METRICS = (*(f"{w}_{m}" for w in WHO for m in ("wr", "acc")), "val_surrogate_wr", DEVICE_HOURS)


@dataclass(frozen=True)
class Config:
    target: StageRef = field(default_factory=lambda: StageRef("badencoder"))   # the watermarked encoder
    # the Cont-Steal attack on it (fields of `cont_steal`; its `target` is always this target)
    steal_dataset: str = ""        # surrogate data; "" = the watermark's downstream dataset (strong adversary)
    steal_size: int = 2000         # surrogate images, 0 = the whole training split
    steal_epochs: int = 10         # surrogate epochs
    steal_temperature: float = 0.5
    steal_batch_size: int = 128
    probe_train_size: int = 2000   # downstream images the heads train on (train + validation), 0 = all
    probe_test_size: int = 1000    # downstream test images, 0 = all
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        ref = refs.check(self, "target", kinds=("encoder_attack",))
        require("trigger" in ref.spec().hooks and hasattr(ref.config(), "target_label"), "target", ref.trainable,
                "must be an encoder attack with a trigger and a target class (badencoder)")
        if self.steal_dataset:
            one_of("steal_dataset", self.steal_dataset, data_mod.DATASETS)
        require(self.steal_size >= 0, "steal_size", self.steal_size, "must be >= 0 (0 = the whole training split)")
        for name in ("steal_epochs", "steal_batch_size"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.steal_temperature > 0, "steal_temperature", self.steal_temperature, "must be > 0")
        require(self.probe_train_size >= 0, "probe_train_size", self.probe_train_size, "must be >= 0 (0 = all)")
        require(self.probe_test_size >= 0, "probe_test_size", self.probe_test_size, "must be >= 0 (0 = all)")
        require(0.0 < self.val_fraction <= 0.5, "val_fraction", self.val_fraction, "must be in (0, 0.5]")

    @property
    def downstream(self) -> str:
        return self.target.config().downstream_dataset

    def steal(self) -> StageRef:
        """The Cont-Steal stage against this target."""
        return StageRef("cont_steal", {
            "target": self.target.as_value(), "surrogate_dataset": self.steal_dataset or self.downstream,
            "surrogate_size": self.steal_size, "epochs": self.steal_epochs, "temperature": self.steal_temperature,
            "batch_size": self.steal_batch_size, "downstream_dataset": self.downstream,
            "probe_train_size": self.probe_train_size, "probe_test_size": self.probe_test_size, "seed": self.seed})

    def upstream_stages(self):
        ref = self.steal()
        return [(ref.trainable, ref.config())]


@register("watermark", kind="stealing", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    torch.manual_seed(cfg.seed)
    wcfg = cfg.target.config()
    out = ctx.stage(cfg.target)
    stamp = cfg.target.spec().hooks["trigger"](wcfg, out)
    encoders = {"target": ctx.load_model(out, "encoder", role="encoder")[0],
                "surrogate": ctx.load_model(cfg.steal(), "encoder", role="encoder")[0],
                "baseline": ctx.load_model(wcfg.encoder, "encoder", role="encoder")[0]}
    c, h = ctx.card_of(encoders["target"]).input.channels, ctx.card_of(encoders["target"]).input.size
    train, val, test = downstream_splits(cfg, ctx, c, h, cfg.downstream)
    t = int(wcfg.target_label)
    triggered = {name: triggered_test_set(ds.images, ds.labels, stamp, t)[0] for name, ds in (("val", val), ("test", test))}

    metrics: dict[str, float] = {}
    for who, enc in encoders.items():
        f_train, f_val, f_test = (features_of(enc, ds.images, ctx.device) for ds in (train, val, test))
        res = ssl_ops.linear_probe(f_train, train.labels, f_test, test.labels, val_feats=f_val, val_labels=val.labels,
                                   num_classes=train.num_classes, seed=cfg.seed)
        rates = {}
        for split, x in triggered.items():
            with torch.no_grad():
                pred = res.head(features_of(enc, x, ctx.device)).argmax(1)
            rates[split] = (pred == t).float().mean().item() if len(x) else 0.0
        metrics[f"{who}_wr"], metrics[f"{who}_acc"] = rates["test"], float(res.test_acc)
        if who == "surrogate":
            metrics["val_surrogate_wr"] = rates["val"]
    ctx.save_output("watermark", {k: torch.tensor(v) for k, v in metrics.items()})
    ctx.report(metrics)
