"""Input-filtering backdoor detectors STRIP and NEO, with a model-level decision (docs/methods.md,
"Audits of public models": backdoor detection on clean models).

* STRIP (Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC 2019):
  superimpose clean overlay images on an input and look at the entropy of the predictions; a
  trigger dominates every blend, so a trojaned input keeps one prediction and has a low entropy.
* NEO (Udeshi et al., "Model Agnostic Defence against Backdoor Attacks in Machine Learning", IEEE
  Trans. Reliability 2022): cover a small region of the input with the image's dominant colour; a
  region whose cover changes the prediction is a trigger candidate, and a candidate whose original
  pixels, stamped onto other images, send most of them to the input's class is a confirmed trigger.

SecurityNet runs both on published models assumed clean, so every flag is a false positive; it
gives STRIP 2,000 test images and 10 overlays, NEO 200 sampled 4x4 regions (for 32x32 images),
k-means with 3 clusters and the confirmation threshold 0.8. The model-level rules (which neither
paper states for a model) are this module's, documented at `strip_scan` and `neo_scan`.

Pure tensor code: a `predict` callable maps a batch (n, C, H, W) in [0, 1] to softmax posteriors
(n, K) (e.g. ``lambda x: secsweep.training.probabilities(model, x, device)``); the detectors only
query it (black-box), never touch a model, a device or a file. Randomness comes from seeded
generators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "Predict",
    "StripResult",
    "NeoResult",
    "superimpose",
    "strip_entropy",
    "strip_threshold",
    "strip_scan",
    "dominant_colour",
    "neo_region_size",
    "neo_scan",
    "STRIP_MODES",
    "NEO_REF_SIZE",
]

Predict = Callable[[torch.Tensor], torch.Tensor]
STRIP_MODES = ("add", "average")
NEO_REF_SIZE = 32  # pixels: the image side NEO's 4x4 region refers to (SecurityNet: 32x32 images)


def _check_images(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] == 0 or not x.dtype.is_floating_point:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} shape={shape}: must be a non-empty float (N, C, H, W) tensor in [0, 1]")


def _posteriors(predict: Predict, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`predict` over `x` in chunks of `batch_size`, checked to be (n, K) posteriors; CPU float64."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        p = predict(x[start : start + batch_size]).detach().to("cpu", torch.float64)
        if p.dim() != 2 or p.shape[0] != min(batch_size, x.shape[0] - start):
            raise ValueError(f"predict output shape={tuple(p.shape)}: must be (n, K) for n inputs")
        out.append(p)
    probs = torch.cat(out)
    if (probs < -1e-6).any() or not torch.allclose(probs.sum(1), torch.ones(probs.shape[0], dtype=probs.dtype),
                                                   atol=1e-3):
        raise ValueError("predict output: must be softmax posteriors (rows >= 0 summing to 1), not logits")
    return probs


def _labels(predict: Predict, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Predicted classes (argmax of the posteriors), CPU long."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        out.append(predict(x[start : start + batch_size]).detach().argmax(1).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------- STRIP


def superimpose(x: torch.Tensor, overlay: torch.Tensor, mode: str = "average") -> torch.Tensor:
    """Superimpose `overlay` on `x` (same shape, or broadcastable), in [0, 1].

    "average": (x + overlay) / 2, the default (STRIP leaves the blending rule open; an equal-weight
    blend never saturates); "add": x + overlay clipped to [0, 1] (both images at weight 1, which
    saturates any image whose background is not black: on the tests' grey images it washed every
    blend out to the same prediction and STRIP missed one of two backdoored models that "average"
    caught).
    """
    if mode == "add":
        return (x + overlay).clamp(0.0, 1.0)
    if mode == "average":
        return (x + overlay) / 2.0
    raise ValueError(f"mode={mode!r}: must be one of {', '.join(STRIP_MODES)}")


def strip_entropy(
    predict: Predict,
    inputs: torch.Tensor,
    overlays: torch.Tensor,
    *,
    n_overlays: int = 10,
    mode: str = "average",
    seed: int = 0,
    batch_size: int = 1024,
) -> torch.Tensor:
    """STRIP's normalised entropy per input: the mean over `n_overlays` blends of the Shannon
    entropy (bits) of the blended input's posteriors.

    Each input gets its own `n_overlays` overlays drawn without replacement from `overlays` (the
    defender's clean images; keep them disjoint from `inputs`, or an input may be blended with
    itself). Low entropy = the prediction survives whatever is superimposed = trojaned.

    Args:
        predict: (n, C, H, W) in [0, 1] -> (n, K) softmax posteriors.
        inputs: (N, C, H, W) images to score.
        overlays: (M, C, H, W) clean images, M >= n_overlays.
        n_overlays: blends per input (STRIP and SecurityNet: 10).
        mode: superimposition rule, see `superimpose` (default "average").
        seed: seed of the overlay draw.
        batch_size: images per `predict` call.

    Returns:
        (N,) float64 entropies in bits, in [0, log2 K].
    """
    _check_images("inputs", inputs)
    _check_images("overlays", overlays)
    if inputs.shape[1:] != overlays.shape[1:]:
        raise ValueError(f"overlays shape={tuple(overlays.shape)}: must match inputs' per-image shape "
                         f"{tuple(inputs.shape[1:])}")
    if not isinstance(n_overlays, int) or not 1 <= n_overlays <= overlays.shape[0]:
        raise ValueError(f"n_overlays={n_overlays!r}: must be an int in [1, {overlays.shape[0]}] (the overlays given)")
    if mode not in STRIP_MODES:
        raise ValueError(f"mode={mode!r}: must be one of {', '.join(STRIP_MODES)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1")
    gen = torch.Generator().manual_seed(seed)
    n, m = inputs.shape[0], overlays.shape[0]
    # (N, n_overlays) overlay indices, each row without replacement
    picks = torch.rand(n, m, generator=gen).argsort(dim=1)[:, :n_overlays]
    entropies = torch.empty(n, dtype=torch.float64)
    per_chunk = max(1, batch_size // n_overlays)  # inputs per predict call
    for start in range(0, n, per_chunk):
        stop = min(n, start + per_chunk)
        x = inputs[start:stop].unsqueeze(1)  # (b, 1, C, H, W)
        ov = overlays[picks[start:stop].to(overlays.device)]  # (b, n_overlays, C, H, W)
        blended = superimpose(x.to(ov.device), ov, mode).flatten(0, 1)
        probs = _posteriors(predict, blended, blended.shape[0])
        h = -(probs * torch.log2(probs.clamp_min(1e-300))).sum(1)
        entropies[start:stop] = h.view(stop - start, n_overlays).mean(1)
    return entropies


def strip_threshold(reference_entropy: torch.Tensor, frr: float = 0.01) -> float:
    """The entropy threshold at false-rejection rate `frr`: the `frr` quantile (linear interpolation)
    of the clean reference inputs' entropies (STRIP sets the threshold from clean inputs at a chosen
    FRR, 1 % in its evaluation; the quantile is taken empirically rather than from a fitted normal,
    whose tail misplaces the threshold when a confident model piles entropies up near 0)."""
    ref = torch.as_tensor(reference_entropy, dtype=torch.float64).flatten()
    if ref.numel() < 2 or not torch.isfinite(ref).all():
        raise ValueError(f"reference_entropy: must hold at least 2 finite entropies, got {ref.numel()}")
    if not 0.0 < frr < 1.0:
        raise ValueError(f"frr={frr}: must be in (0, 1)")
    return float(torch.quantile(ref, frr))


@dataclass(frozen=True)
class StripResult:
    """STRIP's model-level decision and what it rests on."""

    flagged: bool              # the model is flagged as backdoored
    rate: float                # fraction of the test inputs below the threshold (the model-level score)
    threshold: float           # entropy threshold in bits (the reference's `frr` quantile)
    model_rate: float          # the rate above which the model is flagged
    entropy: torch.Tensor = field(repr=False)            # (N,) test-input entropies, bits
    reference_entropy: torch.Tensor = field(repr=False)  # (R,) reference entropies, bits

    @property
    def mean_entropy(self) -> float:
        return float(self.entropy.mean())


def strip_scan(
    predict: Predict,
    inputs: torch.Tensor,
    overlays: torch.Tensor,
    reference: torch.Tensor,
    *,
    n_overlays: int = 10,
    frr: float = 0.01,
    model_rate: float = 0.1,
    mode: str = "average",
    seed: int = 0,
    batch_size: int = 1024,
) -> StripResult:
    """STRIP on a model: score the test `inputs`, set the threshold from clean `reference` inputs,
    and flag the model when more than `model_rate` of the test inputs fall below it.

    The model-level rule is the platform's (STRIP decides per input; SecurityNet says only that a
    low entropy means a trojaned input and so a backdoored model): the threshold admits a fraction
    `frr` of clean inputs by construction, so on clean test data a model is expected near `frr`;
    `model_rate` (default 10 %, ten times the 1 % FRR, which leaves room for the sampling error of
    a quantile estimated from a few hundred reference inputs: clean test inputs of clean models
    reached 3.5 % against a 200-image reference in the tests' measurements) is the excess of
    low-entropy inputs that means some of them carry a trigger the model obeys. On clean test
    inputs a backdoored model is therefore not flagged either: STRIP needs triggered inputs.

    Args:
        predict, overlays, n_overlays, mode, batch_size: as `strip_entropy`.
        inputs: (N, C, H, W) the test images scanned (SecurityNet: 2,000).
        reference: (R, C, H, W) clean images that set the threshold, disjoint from `overlays`.
        frr: false-rejection rate of the per-input threshold, in (0, 1) (STRIP's evaluation: 1 %).
        model_rate: fraction of flagged inputs above which the model is flagged, in [frr, 1).
        seed: seed of the overlay draws (the reference uses seed + 1).

    Returns:
        a `StripResult`.
    """
    if not frr <= model_rate < 1.0:
        raise ValueError(f"model_rate={model_rate}: must be in [frr={frr}, 1)")
    _check_images("reference", reference)
    ref = strip_entropy(predict, reference, overlays, n_overlays=n_overlays, mode=mode, seed=seed + 1,
                        batch_size=batch_size)
    threshold = strip_threshold(ref, frr)
    ent = strip_entropy(predict, inputs, overlays, n_overlays=n_overlays, mode=mode, seed=seed,
                        batch_size=batch_size)
    rate = float((ent < threshold).double().mean())
    return StripResult(flagged=rate > model_rate, rate=rate, threshold=threshold, model_rate=model_rate,
                       entropy=ent, reference_entropy=ref)


# ------------------------------------------------------------------------------------------- NEO


def dominant_colour(images: torch.Tensor, k: int = 3, iters: int = 10) -> torch.Tensor:
    """Each image's dominant colour: the centroid of the largest of `k` k-means clusters of its pixels
    (NEO; SecurityNet: k = 3).

    Lloyd's algorithm, batched over images, `iters` iterations, initialised deterministically at the
    pixels of the (i + 0.5) / k quantiles of brightness (the channel mean), so no seed is needed;
    an empty cluster keeps its centroid.

    Args:
        images: (N, C, H, W) in [0, 1].
        k: clusters, >= 1.
        iters: Lloyd iterations, >= 1.

    Returns:
        (N, C) colours in [0, 1], on the images' device.
    """
    _check_images("images", images)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: must be an int >= 1")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters={iters!r}: must be an int >= 1")
    n, c, h, w = images.shape
    pix = images.detach().flatten(2).transpose(1, 2).to(torch.float64)  # (N, P, C)
    p = pix.shape[1]
    k = min(k, p)
    order = pix.mean(2).argsort(dim=1)  # brightness order of the pixels
    q = ((torch.arange(k, dtype=torch.float64) + 0.5) / k * p).long().clamp_max(p - 1).to(images.device)
    centroids = torch.gather(pix, 1, order[:, q].unsqueeze(2).expand(n, k, c)).clone()  # (N, k, C)
    for _ in range(iters):
        assign = torch.cdist(pix, centroids).argmin(2)  # (N, P)
        onehot = torch.nn.functional.one_hot(assign, k).to(pix.dtype)  # (N, P, k)
        counts = onehot.sum(1)  # (N, k)
        sums = onehot.transpose(1, 2) @ pix  # (N, k, C)
        centroids = torch.where(counts.unsqueeze(2) > 0, sums / counts.clamp_min(1).unsqueeze(2), centroids)
    assign = torch.cdist(pix, centroids).argmin(2)
    largest = torch.nn.functional.one_hot(assign, k).sum(1).argmax(1)  # (N,)
    return centroids[torch.arange(n, device=images.device), largest].to(images.dtype)


def neo_region_size(height: int, width: int, size: int = 4, ref_size: int = NEO_REF_SIZE) -> int:
    """Side in pixels of NEO's square region on an HxW image: `size` on a `ref_size` image, scaled by
    rounding (at least 1): 4 on 32x32, 4 on 28x28, 2 on 16x16, 12 on 96x96."""
    return max(1, round(size * min(height, width) / ref_size))


@dataclass(frozen=True)
class NeoResult:
    """NEO's model-level decision and what it rests on."""

    flagged: bool                # the model is flagged as backdoored (some candidate confirmed)
    max_rate: float              # the highest confirmation rate of any candidate (the model-level score)
    threshold: float             # a candidate is confirmed when its rate exceeds this
    n_inputs: int                # inputs scanned
    n_candidates: int            # regions whose cover changed an input's prediction
    n_checked: int               # candidates stamped onto the confirmation images
    confirmed: list[tuple[int, int, int, float]] = field(default_factory=list)  # (input, row, col, rate)


def neo_scan(
    predict: Predict,
    inputs: torch.Tensor,
    confirm: torch.Tensor,
    *,
    regions: int = 200,
    region_size: int = 0,
    k: int = 3,
    threshold: float = 0.8,
    max_candidates: int = 3,
    seed: int = 0,
    batch_size: int = 1024,
) -> NeoResult:
    """NEO on a model: search every input for a trigger; the model is flagged if any is confirmed.

    Per input x with prediction c: sample `regions` distinct top-left positions of a
    `region_size` square (seeded, uniformly without replacement; all positions if there are fewer),
    cover each with x's dominant colour (`dominant_colour`, k clusters); a cover that changes the
    prediction makes the region a candidate. Up to `max_candidates` candidates per input (in the
    sampled order) are checked: x's original pixels in the region are stamped at the same place on
    each confirmation image, and the candidate's rate is the fraction of the confirmation images not
    already predicted c that the stamp sends to c (a trigger sends inputs to its target, NEO's
    confirmation). Rate > `threshold` confirms the trigger. The model-level rule (flag if any input's
    trigger is confirmed) follows SecurityNet ("if most predictions change, the input is backdoored,
    and so the model").

    Args:
        predict: (n, C, H, W) in [0, 1] -> (n, K) posteriors (only the argmax is used).
        inputs: (N, C, H, W) the images scanned (SecurityNet: 2,000 test images).
        confirm: (M, C, H, W) clean images the candidates are stamped on.
        regions: positions sampled per input (SecurityNet: 200).
        region_size: side in pixels; 0 = `neo_region_size` (4 on 32x32, scaled to the image).
        k: k-means clusters of the dominant colour (SecurityNet: 3).
        threshold: confirmation rate in (0, 1) (SecurityNet: 0.8).
        max_candidates: candidates checked per input, >= 1 (bounds the cost on a model whose
            predictions many covers change; NEO does not say how many it checks).
        seed: seed of the sampled positions.
        batch_size: images per `predict` call.

    Returns:
        a `NeoResult`.
    """
    _check_images("inputs", inputs)
    _check_images("confirm", confirm)
    if inputs.shape[1:] != confirm.shape[1:]:
        raise ValueError(f"confirm shape={tuple(confirm.shape)}: must match inputs' per-image shape "
                         f"{tuple(inputs.shape[1:])}")
    for name, val in (("regions", regions), ("max_candidates", max_candidates), ("batch_size", batch_size)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name}={val!r}: must be an int >= 1")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold={threshold}: must be in (0, 1)")
    n, c, h, w = inputs.shape
    s = region_size or neo_region_size(h, w)
    if not isinstance(s, int) or not 1 <= s <= min(h, w):
        raise ValueError(f"region_size={region_size!r}: must be an int in [1, {min(h, w)}] pixels (0 = scaled 4x4)")
    gen = torch.Generator().manual_seed(seed)
    rows, cols = h - s + 1, w - s + 1
    n_pos = min(regions, rows * cols)
    pred_in = _labels(predict, inputs, batch_size)
    pred_conf = _labels(predict, confirm, batch_size)
    colours = dominant_colour(inputs, k)
    n_candidates = n_checked = 0
    max_rate = 0.0
    confirmed: list[tuple[int, int, int, float]] = []
    for i in range(n):
        pos = torch.randperm(rows * cols, generator=gen)[:n_pos]
        ys, xs = (pos // cols).tolist(), (pos % cols).tolist()
        x = inputs[i]
        covered = x.unsqueeze(0).repeat(n_pos, 1, 1, 1)
        for j, (y0, x0) in enumerate(zip(ys, xs)):
            covered[j, :, y0 : y0 + s, x0 : x0 + s] = colours[i].view(c, 1, 1)
        changed = (_labels(predict, covered, batch_size) != pred_in[i]).nonzero().flatten().tolist()
        n_candidates += len(changed)
        cls = int(pred_in[i])
        others = pred_conf != cls
        if not changed or not others.any():
            continue
        targets = confirm[others.to(confirm.device)]
        for j in changed[:max_candidates]:
            y0, x0 = ys[j], xs[j]
            stamped = targets.clone()
            stamped[:, :, y0 : y0 + s, x0 : x0 + s] = x[:, y0 : y0 + s, x0 : x0 + s].to(stamped.device)
            rate = float((_labels(predict, stamped, batch_size) == cls).double().mean())
            n_checked += 1
            max_rate = max(max_rate, rate)
            if rate > threshold:
                confirmed.append((i, y0, x0, rate))
    return NeoResult(flagged=bool(confirmed), max_rate=max_rate, threshold=threshold, n_inputs=n,
                     n_candidates=n_candidates, n_checked=n_checked, confirmed=confirmed)

