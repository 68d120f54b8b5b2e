"""Backdoor detection on a model assumed clean: Neural Cleanse, STRIP and NEO (SecurityNet §3.3, Tab. 1;
docs/methods.md, "Audits of public models").

SecurityNet runs three detectors on public models that carry no backdoor, so every flag is a false
positive, and a sweep's false-positive rate (FPR) of a detector is the mean of its flag over the
audited models. This audit runs all three on one model and reports, per detector, the model-level
flag (0/1) and its wall-clock runtime in seconds:

* Neural Cleanse (`secsweep.ops.neural_cleanse`, as the `nc` defense detects): for every class,
  reverse-engineer the smallest mask-and-pattern trigger on `nc_images` clean images for
  `nc_epochs` epochs (SecurityNet: 50; an epoch is ceil(nc_images / nc_batch_size) Adam steps); the
  model is flagged if any class's mask L1 norm is a small-side outlier with anomaly index >
  `nc_threshold` (NC's 2). Reported with the suspect's (smallest norm's) anomaly index.
* STRIP (`secsweep.ops.input_filtering.strip_scan`): `strip_images` test images (SecurityNet 2,000),
  each blended with `strip_overlays` (10) clean overlays from one half of the clean data; the
  entropy threshold is the `strip_frr` (1 %) quantile of the other half's entropies; the model is
  flagged when more than `strip_model_rate` (10 %) of the test images fall below it.
* NEO (`secsweep.ops.input_filtering.neo_scan`): `neo_images` test images, `neo_regions` (200)
  covers of a 4x4 region scaled to the image, dominant colour by k-means with `neo_k` (3) clusters,
  candidates confirmed on `neo_confirm` clean images at rate > `neo_threshold` (0.8); the model
  is flagged if any trigger is confirmed.

Data (nothing the model trained on is used): the target's test split (`secsweep.audit.Target.nonmembers`)
is divided into two seeded halves; the first is scanned (at most `strip_images` / `neo_images` of
it), the second joins the validation hold-out (`Target.val`) as the detectors' clean data: NC's
images, STRIP's overlays and reference (two disjoint halves of it) and NEO's confirmation images.
Runtimes time each detector alone (data already loaded; on a GPU every detector ends with a CPU
copy, so the clock includes the device's work). Defaults are SecurityNet's except the CPU-sized
`nc_epochs` 10 and `neo_images` 200 (measured in docs/methods.md; the sweep's `paper` preset sets
50 and 2,000).

Metrics: `nc_flag`, `strip_flag`, `neo_flag`, `nc_seconds`, `strip_seconds`, `neo_seconds`,
`nc_anomaly_index` (the suspect's; 1e6 for an infinite index), `nc_num_flagged`, `strip_rate` (the
fraction of test images below the threshold), `strip_threshold` (bits), `strip_mean_entropy` (bits),
`neo_max_rate` (the best candidate's confirmation rate), `neo_candidates` (covers that changed a
prediction), plus the target's `secsweep.audit.model_facts`. One report. Output: `detection` (NC's
per-class norms, masks and patterns; STRIP's entropies).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from secsweep import audit
from secsweep import data as data_mod
from secsweep.config import in_open_unit, one_of, positive, require
from secsweep.names import DEVICE_HOURS
from secsweep.ops.input_filtering import STRIP_MODES, neo_scan, strip_scan
from secsweep.ops.neural_cleanse import anomaly_index, flagged_classes, reverse_engineer_trigger
from secsweep.registry import register

DETECTORS = ("nc", "strip", "neo")
FLAGS = {d: f"{d}_flag" for d in DETECTORS}          # 1.0 = the detector flags the model as backdoored
SECONDS = {d: f"{d}_seconds" for d in DETECTORS}     # wall-clock seconds the detector took
NC_ANOMALY_INDEX, NC_NUM_FLAGGED = "nc_anomaly_index", "nc_num_flagged"
STRIP_RATE, STRIP_THRESHOLD, STRIP_MEAN_ENTROPY = "strip_rate", "strip_threshold", "strip_mean_entropy"
NEO_MAX_RATE, NEO_CANDIDATES = "neo_max_rate", "neo_candidates"
INF_INDEX = 1e6  # reported in place of an infinite anomaly index (MAD = 0), as the nc defense does
METRICS = (*FLAGS.values(), *SECONDS.values(), NC_ANOMALY_INDEX, NC_NUM_FLAGGED, STRIP_RATE, STRIP_THRESHOLD,
           STRIP_MEAN_ENTROPY, NEO_MAX_RATE, NEO_CANDIDATES, *audit.FACT_METRICS, DEVICE_HOURS)


@dataclass(frozen=True)
class Config(audit.AuditConfig):
    nc_epochs: int = 10            # reverse-engineering epochs per class (SecurityNet: 50; CPU-sized)
    nc_images: int = 256           # clean images for reverse engineering (NC: not stated)
    nc_batch_size: int = 32        # images per step (NC: 32)
    nc_lr: float = 0.1             # Adam learning rate of mask and pattern (NC: 0.1)
    nc_init_cost: float = 1e-3     # initial weight of the mask L1 term (NC: 1e-3)
    nc_threshold: float = 2.0      # anomaly index above which a small-norm class is flagged (NC: 2)
    strip_images: int = 2000       # test images scanned (SecurityNet: 2,000)
    strip_overlays: int = 10       # overlays per image (SecurityNet / STRIP: 10)
    strip_frr: float = 0.01        # false-rejection rate of the per-input threshold (STRIP: 1 %)
    strip_model_rate: float = 0.1  # fraction of low-entropy inputs above which the model is flagged
    strip_mode: str = "average"    # superimposition rule (STRIP: not stated)
    neo_images: int = 200          # test images scanned (SecurityNet: 2,000; CPU-sized)
    neo_regions: int = 200         # covers sampled per image (SecurityNet: 200)
    neo_region: int = 0            # region side in pixels, 0 = 4 on 32x32 scaled (SecurityNet: 4x4)
    neo_k: int = 3                 # k-means clusters of the dominant colour (SecurityNet: 3)
    neo_threshold: float = 0.8     # confirmation rate (SecurityNet: 0.8)
    neo_confirm: int = 200         # clean images a candidate is stamped on (not stated)
    neo_max_candidates: int = 3    # candidates checked per image (not stated)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("nc_epochs", "nc_images", "nc_batch_size", "strip_images", "strip_overlays", "neo_images",
                     "neo_regions", "neo_k", "neo_confirm", "neo_max_candidates"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.neo_region >= 0, "neo_region", self.neo_region, "must be >= 0 pixels (0 = scaled 4x4)")
        positive("nc_lr", self.nc_lr)
        require(self.nc_init_cost >= 0, "nc_init_cost", self.nc_init_cost, "must be >= 0")
        positive("nc_threshold", self.nc_threshold)
        in_open_unit("strip_frr", self.strip_frr)
        require(self.strip_frr <= self.strip_model_rate < 1, "strip_model_rate", self.strip_model_rate,
                f"must be in [strip_frr={self.strip_frr}, 1)")
        one_of("strip_mode", self.strip_mode, STRIP_MODES)
        in_open_unit("neo_threshold", self.neo_threshold)


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else INF_INDEX


def neural_cleanse(target: audit.Target, images: torch.Tensor, cfg: Config) -> dict:
    """NC's detection on `images` (clean, in [0, 1]): per-class norms, masks, patterns and the flag."""
    x = images.to(target.device)
    steps = cfg.nc_epochs * math.ceil(x.shape[0] / cfg.nc_batch_size)
    masks, patterns, norms = [], [], []
    for k in range(target.num_classes):
        mask, pattern, l1, _ = reverse_engineer_trigger(
            target.module, x, k, steps=steps, lr=cfg.nc_lr, init_cost=cfg.nc_init_cost,
            batch_size=cfg.nc_batch_size, seed=cfg.seed * 1000 + k)
        masks.append(mask.cpu())
        patterns.append(pattern.cpu())
        norms.append(l1)
    norms_t = torch.tensor(norms, dtype=torch.float64)
    flagged = flagged_classes(norms_t, cfg.nc_threshold)
    return {"norms": norms_t, "masks": torch.stack(masks), "patterns": torch.stack(patterns), "flagged": flagged,
            "suspect_index": _finite(float(anomaly_index(norms_t)[int(norms_t.argmin())]))}


def _halves(ds, seed: int):
    """Two disjoint seeded halves of `ds` (the STRIP overlays and the threshold's reference)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ds), generator=g)
    half = len(ds) // 2
    return ds.subset(perm[:half].sort().values), ds.subset(perm[half:].sort().values)


@register("audit_backdoor_fpr", kind="audit", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    target = audit.load_target(cfg, ctx)
    scanned, spare = _halves(target.nonmembers, cfg.seed + 40)
    clean = data_mod.ImageSet(images=torch.cat([target.val.images, spare.images]),
                              labels=torch.cat([target.val.labels, spare.labels]),
                              num_classes=target.val.num_classes, name=target.val.name, source=target.val.source)
    require(len(clean) >= 2 * cfg.strip_overlays, "strip_overlays", cfg.strip_overlays,
            f"needs 2 x {cfg.strip_overlays} clean images; the validation split and half the test split hold {len(clean)}")
    out: dict[str, float] = {}

    t0 = time.perf_counter()
    nc = neural_cleanse(target, audit.cap(clean, cfg.nc_images, cfg.seed, salt=41).images, cfg)
    out[SECONDS["nc"]] = time.perf_counter() - t0
    out[FLAGS["nc"]] = 1.0 if nc["flagged"] else 0.0
    out[NC_ANOMALY_INDEX], out[NC_NUM_FLAGGED] = nc["suspect_index"], float(len(nc["flagged"]))

    t0 = time.perf_counter()
    overlays, reference = _halves(clean, cfg.seed + 42)
    strip = strip_scan(target.probabilities, audit.cap(scanned, cfg.strip_images, cfg.seed, salt=43).images,
                       overlays.images, reference.images, n_overlays=cfg.strip_overlays, frr=cfg.strip_frr,
                       model_rate=cfg.strip_model_rate, mode=cfg.strip_mode, seed=cfg.seed)
    out[SECONDS["strip"]] = time.perf_counter() - t0
    out[FLAGS["strip"]] = 1.0 if strip.flagged else 0.0
    out[STRIP_RATE], out[STRIP_THRESHOLD], out[STRIP_MEAN_ENTROPY] = strip.rate, strip.threshold, strip.mean_entropy

    t0 = time.perf_counter()
    neo = neo_scan(target.probabilities, audit.cap(scanned, cfg.neo_images, cfg.seed, salt=44).images,
                   audit.cap(clean, cfg.neo_confirm, cfg.seed, salt=45).images, regions=cfg.neo_regions,
                   region_size=cfg.neo_region, k=cfg.neo_k, threshold=cfg.neo_threshold,
                   max_candidates=cfg.neo_max_candidates, seed=cfg.seed)
    out[SECONDS["neo"]] = time.perf_counter() - t0
    out[FLAGS["neo"]] = 1.0 if neo.flagged else 0.0
    out[NEO_MAX_RATE], out[NEO_CANDIDATES] = neo.max_rate, float(neo.n_candidates)

    ctx.save_output("detection", {"nc_norms": nc["norms"], "nc_masks": nc["masks"], "nc_patterns": nc["patterns"],
                                  "strip_entropy": strip.entropy, "strip_reference_entropy": strip.reference_entropy})
    audit.report(ctx, target, out)
