"""Neural Cleanse, NC (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
Neural Networks", IEEE S&P 2019), a baseline defense of the FTP paper (docs/methods.md §5.6: "optimize a
candidate trigger per class, compare each class's minimal perturbation, outlier class = target;
unlearning = fine-tune with trigger-stamped images carrying correct labels plus clean samples";
detection settings of SecurityNet in docs/methods.md §5.6).

1. Detection: for every class, reverse-engineer the smallest (mask, pattern) trigger that sends
   ``nc_images`` clean images of the defender to that class
   (``secsweep.ops.neural_cleanse.reverse_engineer_trigger``); the MAD anomaly index of the mask
   L1 norms flags classes whose norm is abnormally small (index > ``nc_threshold``).
2. Mitigation (only when a class is flagged): fine-tune on the defender's clean data
   (``clean_fraction``) in which a seeded ``unlearn_fraction`` of the samples is stamped with the
   recovered trigger of a flagged class (several flagged classes take turns) and keeps its correct
   label, for ``epochs`` at the constant learning rate ``lr`` (``secsweep.backdoor.fit``).
3. Nothing flagged: the model is left unchanged; each of the ``epochs`` reports is still sent (the
   unchanged model's metrics), so NC's curves line up with the other defenses' in Tune and MLflow.

Defaults and where they come from (FTP states none; SecurityNet gives
50 epochs of reverse engineering and "their default threshold"):

* ``nc_threshold`` 2.0: NC's anomaly-index threshold (docs/methods.md §5.6 [EXT]).
* ``nc_lr`` 0.1, ``nc_init_cost`` 1e-3, ``nc_batch_size`` 32: NC's released defaults (the op's;
  BackdoorBench's NC: init_cost 1e-3, batch 64).
* ``nc_steps`` 100: optimisation steps (mini-batches) per class, a CPU-sized default, NOT a paper
  value: NC runs up to 1000 epochs with early stopping, SecurityNet 50 epochs (= 50 *
  ceil(nc_images / nc_batch_size) steps), BackdoorBench 10 epochs.
* ``nc_images`` 256: clean images used for reverse engineering, a CPU-sized default (NC: clean
  samples of all classes, count not stated; BackdoorBench: the defender's clean subset). The paper
  preset sets BackdoorBench's budget: 10 epochs over 2,500 images (5 %) at batch 64 = 400 steps
  (secsweep.presets.DEFENSE_BUDGETS).
* ``unlearn_fraction`` 0.2: NC's unlearning stamps 20 % of the fine-tuning samples
  (BackdoorBench ``unlearning_ratio: 0.2``).
* ``lr`` 0.01: BackdoorBench's NC unlearning learning rate (there with cosine annealing; constant
  here). NC: not stated.
* ``epochs``, ``batch_size``, ``momentum``, ``weight_decay``, ``clean_fraction``: DefenseConfig's
  CPU-sized defaults (NC fine-tunes for 1 epoch on 10 % of the training data).

Reports: epoch 0 = the backdoored model (before detection); then every unlearning epoch, carrying
``asr_before`` / ``clean_acc_before`` and the detection result: ``nc_flagged_target`` (1.0 if the
true target class is flagged, else 0.0), ``nc_num_flagged``, ``nc_anomaly_index`` (the index of the
class with the smallest mask norm, NC's suspect; > threshold means flagged), ``nc_min_norm_class``,
``nc_target_anomaly_index`` (the true target's index, for sweeps), ``nc_target_mask_l1``. An index
is +inf when the MAD is 0; it is reported as 1e6 so every metric stays finite. The per-class norms,
indices and flagged classes are written to the artifact ``nc_detection.json``, the recovered
triggers to the output ``nc_triggers`` (masks (K, 1, H, W), patterns (K, C, H, W), norms (K,)).
The detection result is part of every resume state, so a restarted trial does not redo it.
Multi-worker trials run the detection on every worker (deterministic, identical results).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from secsweep.backdoor import DefenseConfig, Victim, clean_subset, constant, fit, load_victim, report_before, save_classifier
from secsweep.config import in_open_unit, positive, require
from secsweep.data import ImageSet
from secsweep.names import ASR, CLEAN_ACC, DEVICE_HOURS, EPOCH
from secsweep.ops.neural_cleanse import anomaly_index, flagged_classes, reverse_engineer_trigger, stamp
from secsweep.registry import register

FLAGGED_TARGET = "nc_flagged_target"
ANOMALY_INDEX = "nc_anomaly_index"
NUM_FLAGGED = "nc_num_flagged"
INF_INDEX = 1e6  # reported in place of an infinite anomaly index (MAD = 0)


@dataclass(frozen=True)
class Config(DefenseConfig):
    lr: float = 0.01              # unlearning learning rate per step, constant (BackdoorBench NC: 0.01)
    unlearn_fraction: float = 0.2  # fraction of fine-tuning samples stamped with the recovered trigger (NC: 0.2)
    nc_steps: int = 100           # reverse-engineering optimisation steps per class (CPU-sized; SecurityNet: 50 epochs)
    nc_images: int = 256          # clean images for reverse engineering (CPU-sized; NC: not stated)
    nc_batch_size: int = 32       # images per reverse-engineering step (NC: 32)
    nc_lr: float = 0.1            # Adam learning rate of the mask and pattern (NC: 0.1)
    nc_init_cost: float = 1e-3    # initial weight of the mask L1 term, per mask pixel (NC: 1e-3)
    nc_threshold: float = 2.0     # anomaly index above which a small-norm class is flagged (NC: 2)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("lr", self.lr)
        in_open_unit("unlearn_fraction", self.unlearn_fraction)
        require(self.nc_steps >= 1, "nc_steps", self.nc_steps, "must be >= 1")
        require(self.nc_images >= 1, "nc_images", self.nc_images, "must be >= 1")
        require(self.nc_batch_size >= 1, "nc_batch_size", self.nc_batch_size, "must be >= 1")
        positive("nc_lr", self.nc_lr)
        require(self.nc_init_cost >= 0, "nc_init_cost", self.nc_init_cost, "must be >= 0")
        positive("nc_threshold", self.nc_threshold)


def detect(victim: Victim, data: ImageSet, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Reverse-engineer a trigger per class and flag the outliers; tensors on the CPU."""
    g = torch.Generator().manual_seed(cfg.seed + 4)
    idx = torch.randperm(len(data), generator=g)[: cfg.nc_images].sort().values
    images = data.images[idx].to(device)
    masks, patterns, norms = [], [], []
    for k in range(data.num_classes):
        mask, pattern, l1, _ = reverse_engineer_trigger(
            victim.model, images, k, steps=cfg.nc_steps, lr=cfg.nc_lr, init_cost=cfg.nc_init_cost,
            batch_size=cfg.nc_batch_size, seed=cfg.seed * 1000 + k)
        masks.append(mask.cpu())
        patterns.append(pattern.cpu())
        norms.append(l1)
    norms_t = torch.tensor(norms, dtype=torch.float64)
    return {"masks": torch.stack(masks), "patterns": torch.stack(patterns), "norms": norms_t,
            "flagged": flagged_classes(norms_t, cfg.nc_threshold)}


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else INF_INDEX


def detection_metrics(det: Mapping[str, Any], target: int) -> dict[str, float]:
    norms = det["norms"]
    index = anomaly_index(norms)
    suspect = int(norms.argmin())
    return {
        FLAGGED_TARGET: 1.0 if target in det["flagged"] else 0.0,
        NUM_FLAGGED: float(len(det["flagged"])),
        ANOMALY_INDEX: _finite(float(index[suspect])),
        "nc_min_norm_class": float(suspect),
        "nc_target_anomaly_index": _finite(float(index[target])),
        "nc_target_mask_l1": float(norms[target]),
    }


def unlearning_set(data: ImageSet, det: Mapping[str, Any], fraction: float,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean data with a seeded `fraction` stamped with the flagged classes' triggers (taking
    turns), labels unchanged."""
    flagged = list(det["flagged"])
    g = torch.Generator().manual_seed(seed + 2)
    idx = torch.randperm(len(data), generator=g)[: max(1, round(fraction * len(data)))]
    images = data.images.clone()
    for j, cls in enumerate(flagged):
        part = idx[j :: len(flagged)]
        images[part] = stamp(images[part], det["masks"][cls], det["patterns"][cls])
    return images, data.labels.clone()


def _write_artifact(ctx, det: Mapping[str, Any], target: int) -> None:
    index = anomaly_index(det["norms"])
    summary = {"mask_l1": det["norms"].tolist(), "anomaly_index": [_finite(float(v)) for v in index],
               "flagged": list(det["flagged"]), "true_target": target}
    ctx.artifact_path("nc_detection.json").write_text(json.dumps(summary, indent=1))


@register("nc", kind="defense", config=Config,
          metrics=(ASR, CLEAN_ACC, DEVICE_HOURS, FLAGGED_TARGET, ANOMALY_INDEX, NUM_FLAGGED))
def run(cfg: Config, ctx) -> None:
    victim = load_victim(cfg, ctx)
    data = clean_subset(victim.train, cfg.clean_fraction, cfg.seed)
    base = report_before(victim, ctx)
    state = ctx.restored()
    if state is not None and "nc" in state:
        det = state["nc"]
    else:
        det = detect(victim, data, cfg, ctx.device)
        _write_artifact(ctx, det, cfg.target_label)
    extra = {**base, **detection_metrics(det, cfg.target_label)}
    model = victim.model
    if det["flagged"]:
        images, labels = unlearning_set(data, det, cfg.unlearn_fraction, cfg.seed)
        model = fit(model, images, labels, ctx, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                    lr_at=constant(cfg.lr), momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    evaluate=victim.evaluate, extra=extra, extra_state={"nc": det},
                    transform=cfg.train_transform())
    else:  # nothing flagged: NC leaves the model as it is
        unchanged = victim.evaluate(model, ctx.device)
        start = int(state.get("epoch", 0)) if state is not None else 0
        for epoch in range(start, cfg.epochs):
            ctx.report({EPOCH: epoch + 1, **unchanged, **extra}, state={"epoch": epoch + 1, "nc": det})
    ctx.save_output("nc_triggers", {"masks": det["masks"], "patterns": det["patterns"], "norms": det["norms"]})
    save_classifier(ctx, model, cfg)
