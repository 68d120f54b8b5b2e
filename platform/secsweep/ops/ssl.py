"""Self-supervised learning (SSL) helpers: view augmentation, the kNN monitor and the linear probe.

Pure tensor code: batches in, batches / numbers / a fitted `nn.Linear` out; no files, no devices
chosen (everything runs on the device of its inputs). The SSL losses, projection/prediction heads and
momentum updates come from lightly (`lightly.loss.NTXentLoss`, `NegativeCosineSimilarity`,
`lightly.models.modules`, `lightly.models.utils.update_momentum`) and are used directly by the
trainables; this module holds only what lightly lacks as plain tensor code:

* `augment` / `two_views`: SimCLR-style views of a whole (N, C, H, W) batch on its own device.
  lightly's `SimCLRTransform` is a per-image PIL/torchvision pipeline meant for DataLoader workers;
  the platform keeps small sets as tensors on the trial's device, so the same recipe is done here
  batched (random resized crop through `affine_grid`/`grid_sample`, horizontal flip, colour jitter,
  random grayscale, optional Gaussian blur). Defaults are SimCLR's CIFAR-10 recipe as lightly's
  CIFAR-10 benchmark uses it: crop scale (0.08 in SimCLR's ImageNet recipe, 0.2 for 32x32 images in
  lightly's benchmarks and MoCo v2's), colour-jitter strength 0.4 (SimCLR's 0.8 strength x 0.5)
  applied with probability 0.8, grayscale with probability 0.2, no blur (SimCLR drops it on CIFAR-10).
  Hue jitter is left out: it needs an RGB->HSV round trip per pixel and has no meaning for the
  1-channel default data; say so when comparing with RGB anchors.
* `rand_augment`: torchvision's `transforms.v2.RandAugment(num_ops, magnitude)` per sample, seeded
  from a caller's generator; Cont-Steal (docs/methods.md, Cont-Steal) augments with RandAugment
  n = 2, m = 14.
* `knn_scores` / `knn_predict` / `knn_accuracy`: the weighted kNN monitor of SSL benchmarks
  (Wu et al. 2018, instance discrimination; lightly's benchmarks use k = 200, t = 0.1): cosine
  similarity s between L2-normalised features, each of the k most similar bank samples votes for
  its label with weight exp(s / t), the class with the largest summed weight wins. lightly ships
  the same formula in `lightly.utils.benchmarking.knn_predict`, but that package imports
  PyTorch Lightning on import (~3 s), wants the bank transposed, fails when k exceeds the bank and
  returns only a class ranking; the ten lines are written out here instead.
* `linear_probe`: logistic regression on frozen features (the standard linear evaluation of SSL
  encoders), see its docstring for the choices.

Randomness comes only from the `torch.Generator` passed in (a CPU generator): every random
parameter is drawn there, on the CPU, and moved to the batch's device, so a given (generator state,
batch) gives the same views on CPU and GPU (up to floating-point differences of `grid_sample`), and
each call advances the generator by an amount that depends only on the batch size and the options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "augment",
    "two_views",
    "rand_augment",
    "knn_scores",
    "knn_predict",
    "knn_accuracy",
    "ProbeResult",
    "linear_probe",
]

CROP_SCALE = (0.2, 1.0)      # area fraction of the random resized crop (lightly CIFAR-10 benchmark, MoCo v2)
CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratio w/h of the crop (torchvision RandomResizedCrop default)
JITTER = 0.4                 # brightness/contrast/saturation factor range 1 +- 0.4 (SimCLR CIFAR-10)
JITTER_P = 0.8               # probability of applying colour jitter (SimCLR)
GRAYSCALE_P = 0.2            # probability of converting an RGB view to grayscale (SimCLR)
BLUR_P = 0.5                 # probability of Gaussian blur when enabled (SimCLR ImageNet recipe)
BLUR_SIGMA = (0.1, 2.0)      # blur sigma range in pixels (SimCLR)
BLUR_KERNEL_FRACTION = 0.1   # blur kernel size as a fraction of the image side (SimCLR: 10 %)
RAND_AUGMENT_OPS = 2         # Cont-Steal: RandAugment n = 2
RAND_AUGMENT_MAGNITUDE = 14  # Cont-Steal: RandAugment m = 14 (of torchvision's 31 bins)
KNN_K = 200                  # neighbours of the kNN monitor (lightly benchmarks, Wu et al. 2018)
KNN_TEMPERATURE = 0.1        # temperature of the kNN vote weights exp(s / t) (same sources)
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision's rgb_to_grayscale


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x shape={shape}: must be a (N, C, H, W) batch with C in (1, 3)")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x dtype={x.dtype}: must be a float tensor with values in [0, 1]")


def _check_range(name: str, value: tuple[float, float], lo: float, hi: float) -> None:
    if len(value) != 2 or not lo < value[0] <= value[1] <= hi:
        raise ValueError(f"{name}={value!r}: must be (a, b) with {lo} < a <= b <= {hi}")


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 1, H, W) luma (the image itself when C = 1)."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _resized_crop(x: torch.Tensor, generator: torch.Generator, scale: tuple[float, float],
                  ratio: tuple[float, float], flip: bool) -> torch.Tensor:
    """Random resized crop (and horizontal flip) of every image, resampled bilinearly to H x W.

    Per image: area fraction a ~ U(scale), log aspect ratio ~ U(log ratio), crop width / height
    fractions sqrt(a r), sqrt(a / r), clipped to 1 (torchvision instead retries 10 times and falls back
    to a centre crop; the clip keeps the batch free of Python loops and only changes how rare
    out-of-range draws are handled), centre uniform over the positions that keep the crop inside.
    """
    n = x.shape[0]
    area = _uniform(n, scale[0], scale[1], generator)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator)
    u_x, u_y = torch.rand(n, generator=generator), torch.rand(n, generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    fw = (area * log_r.exp()).sqrt().clamp(max=1.0)   # crop width as a fraction of the image width
    fh = (area / log_r.exp()).sqrt().clamp(max=1.0)
    # affine_grid maps output coordinates in [-1, 1] to input coordinates: x_in = sx * x_out + tx.
    # A crop of fractional width fw centred at c in [fw/2, 1 - fw/2] is sx = fw, tx = 2c - 1.
    tx = (2 * (fw / 2 + u_x * (1 - fw)) - 1)
    ty = (2 * (fh / 2 + u_y * (1 - fh)) - 1)
    sx = torch.where(flips & flip, -fw, fw)  # a negative x scale mirrors the crop
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, fh, ty
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _colour_jitter(x: torch.Tensor, generator: torch.Generator, strength: float, p: float) -> torch.Tensor:
    """Brightness, contrast, then saturation (RGB only) with factors ~ U(1 - s, 1 + s), each image
    jittered with probability p; torchvision's formulas (brightness: x b; contrast: blend with the
    image's mean luma; saturation: blend with the per-pixel luma), clamped to [0, 1] after each.
    torchvision shuffles the order per call; a fixed order is used here (order effects are small)."""
    n = x.shape[0]
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    b, c, s = (_uniform(n, lo, hi, generator) for _ in range(3))
    apply = torch.rand(n, generator=generator) < p
    one = torch.ones(n)
    b, c, s = (torch.where(apply, f, one).to(x.device, x.dtype).view(n, 1, 1, 1) for f in (b, c, s))
    x = (x * b).clamp(0.0, 1.0)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (c * x + (1 - c) * mean).clamp(0.0, 1.0)
    if x.shape[1] == 3:
        x = (s * x + (1 - s) * _gray(x)).clamp(0.0, 1.0)
    return x


def _gaussian_blur(x: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """Separable Gaussian blur with sigma ~ U(BLUR_SIGMA) pixels per image, applied with probability
    p; kernel side = the odd number nearest 10 % of the image side (at least 3), reflect padding."""
    n, ch, h, w = x.shape
    sigma = _uniform(n, BLUR_SIGMA[0], BLUR_SIGMA[1], generator)
    apply = torch.rand(n, generator=generator) < p
    k = max(3, int(round(BLUR_KERNEL_FRACTION * min(h, w))) // 2 * 2 + 1)
    pos = torch.arange(k, dtype=torch.float64) - k // 2
    kern = torch.exp(-(pos.view(1, k) ** 2) / (2 * sigma.double().view(n, 1) ** 2))
    kern = kern / kern.sum(dim=1, keepdim=True)
    identity = torch.zeros(k, dtype=torch.float64)
    identity[k // 2] = 1.0
    kern = torch.where(apply.view(n, 1), kern, identity).to(x.device, x.dtype)
    kern = kern.repeat_interleave(ch, dim=0)          # (n * ch, k): one kernel per image channel
    y = x.reshape(1, n * ch, h, w)
    y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), kern.view(n * ch, 1, 1, k), groups=n * ch)
    y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), kern.view(n * ch, 1, k, 1), groups=n * ch)
    return y.reshape(n, ch, h, w)


def augment(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    crop_scale: tuple[float, float] = CROP_SCALE,
    crop_ratio: tuple[float, float] = CROP_RATIO,
    flip: bool = True,
    jitter: float = JITTER,
    jitter_p: float = JITTER_P,
    grayscale_p: float = GRAYSCALE_P,
    blur: bool = False,
) -> torch.Tensor:
    """One SimCLR-style random view of every image of a float batch, on the batch's device.

    Order as SimCLR: random resized crop (+ horizontal flip with probability 1/2), colour jitter with
    probability `jitter_p`, grayscale with probability `grayscale_p` (RGB only; a 1-channel image is
    already gray), Gaussian blur with probability 1/2 if `blur`. Defaults and their sources: module
    docstring. `crop_scale=(1, 1)` disables the crop, `jitter=0` the jitter, `grayscale_p=0` the
    grayscale. All random draws come from `generator` (CPU) in a fixed order and number.

    Args:
        x: (N, C, H, W) float images in [0, 1], C in (1, 3).
        generator: CPU torch.Generator the parameters are drawn from (advanced by this call).

    Returns:
        (N, C, H, W) tensor of the same dtype and device, clamped to [0, 1].
    """
    _check_images(x)
    _check_range("crop_scale", crop_scale, 0.0, 1.0)
    _check_range("crop_ratio", crop_ratio, 0.0, math.inf)
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter={jitter}: must be in [0, 1] (factor range 1 +- jitter)")
    for name, p in (("jitter_p", jitter_p), ("grayscale_p", grayscale_p)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name}={p}: must be a probability in [0, 1]")
    if x.shape[0] == 0:
        return x.clone()
    v = _resized_crop(x, generator, crop_scale, crop_ratio, flip)
    v = _colour_jitter(v, generator, jitter, jitter_p)
    to_gray = (torch.rand(x.shape[0], generator=generator) < grayscale_p).to(x.device).view(-1, 1, 1, 1)
    if x.shape[1] == 3:
        v = torch.where(to_gray, _gray(v).expand_as(v), v)
    if blur:
        v = _gaussian_blur(v, generator, BLUR_P)
    return v.clamp(0.0, 1.0)


def two_views(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    crop_scale: tuple[float, float] = CROP_SCALE,
    flip: bool = True,
    jitter: float = JITTER,
    grayscale_p: float = GRAYSCALE_P,
    blur: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent `augment` views (v1, v2) of the batch, for the two-view SSL losses."""
    kw = dict(crop_scale=crop_scale, flip=flip, jitter=jitter, grayscale_p=grayscale_p, blur=blur)
    return augment(x, generator, **kw), augment(x, generator, **kw)


def rand_augment(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    num_ops: int = RAND_AUGMENT_OPS,
    magnitude: int = RAND_AUGMENT_MAGNITUDE,
) -> torch.Tensor:
    """torchvision's `transforms.v2.RandAugment(num_ops, magnitude)` on every image separately.

    RandAugment works on uint8 images, so the batch is quantised to 1/255 steps and converted back
    (the output is a multiple of 1/255). Each image gets its own ops (one RandAugment call per image:
    a call on the batch would apply the same ops to all). torchvision draws from the global CPU RNG;
    here a seed is drawn from `generator` and the CPU RNG is seeded with it inside
    `torch.random.fork_rng`, so the result is reproducible and the caller's global RNG is untouched.
    1- and 3-channel images both work (torchvision treats a 1-channel tensor as grayscale).

    Args:
        x: (N, C, H, W) float images in [0, 1], C in (1, 3).
        generator: CPU torch.Generator (advanced by one draw).
        num_ops, magnitude: RandAugment's n and m (Cont-Steal: 2 and 14, of 31 magnitude bins).

    Returns:
        (N, C, H, W) float tensor of x's dtype and device with values in [0, 1].
    """
    from torchvision.transforms import v2  # imported here: torchvision is only needed by this op

    _check_images(x)
    if not isinstance(num_ops, int) or num_ops < 0:
        raise ValueError(f"num_ops={num_ops!r}: must be an int >= 0")
    if not isinstance(magnitude, int) or not 0 <= magnitude < 31:
        raise ValueError(f"magnitude={magnitude!r}: must be an int in [0, 30] (torchvision's 31 bins)")
    seed = int(torch.randint(2**62, (1,), generator=generator))
    ra = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
    images = (x.detach() * 255.0).round().clamp(0, 255).to(torch.uint8)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # only the CPU generator, which torchvision uses
        out = torch.stack([ra(img) for img in images]) if len(images) else images
    return out.to(x.dtype) / 255.0


def _check_feats(name: str, feats: torch.Tensor, labels: torch.Tensor | None, labels_name: str) -> None:
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] == 0:
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"{name} shape={shape}: must be a non-empty 2-D tensor (N, D)")
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != feats.shape[0]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{labels_name} shape={shape}: must be a 1-D tensor of length {feats.shape[0]}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{labels_name} dtype={labels.dtype}: must be an integer tensor of class indices")


@torch.no_grad()
def knn_scores(
    features: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted-kNN class scores: score[i, c] = sum over the k bank samples most cosine-similar to
    features[i] with label c of exp(sim / temperature). Features and bank are L2-normalised here;
    k is capped at the bank size. Queries are processed `chunk_size` at a time (memory: chunk x bank).

    Returns:
        (N, num_classes) float tensor on the features' device.
    """
    _check_feats("features", features, None, "")
    _check_feats("bank", bank, bank_labels, "bank_labels")
    if features.shape[1] != bank.shape[1]:
        raise ValueError(f"features dim={features.shape[1]}: must equal bank dim={bank.shape[1]}")
    if not isinstance(num_classes, int) or num_classes < 1 or int(bank_labels.max()) >= num_classes \
            or int(bank_labels.min()) < 0:
        raise ValueError(f"num_classes={num_classes!r}: must be an int > every bank label (max "
                         f"{int(bank_labels.max())}) with labels >= 0")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: must be an int >= 1")
    if not temperature > 0.0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    k = min(k, bank.shape[0])
    bank_n = F.normalize(bank.float(), dim=1).to(features.device)
    labels = bank_labels.to(features.device)
    out = []
    for start in range(0, features.shape[0], chunk_size):
        q = F.normalize(features[start : start + chunk_size].float(), dim=1)
        sim, idx = (q @ bank_n.T).topk(k, dim=1)                     # (B, k) cosine similarities
        scores = torch.zeros(q.shape[0], num_classes, device=q.device)
        out.append(scores.scatter_add_(1, labels[idx], (sim / temperature).exp()))
    return torch.cat(out)


def knn_predict(
    features: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> torch.Tensor:
    """(N,) predicted labels of the weighted kNN monitor (`knn_scores`' argmax; ties: lowest class)."""
    return knn_scores(features, bank, bank_labels, num_classes, k, temperature).argmax(dim=1)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
) -> float:
    """Top-1 accuracy of the kNN monitor with the training features as the bank. `num_classes`
    defaults to 1 + the largest label of either split."""
    _check_feats("test_feats", test_feats, test_labels, "test_labels")
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    pred = knn_predict(test_feats, train_feats, train_labels, num_classes, k, temperature)
    return (pred == test_labels.to(pred.device)).float().mean().item()


@dataclass(frozen=True)
class ProbeResult:
    """Result of `linear_probe`: accuracies (fractions in [0, 1]; `val_acc` None without a
    validation split) and the fitted head, which acts on raw (unstandardised) features."""

    train_acc: float
    val_acc: float | None
    test_acc: float
    head: nn.Linear


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    val_feats: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    num_classes: int | None = None,
    epochs: int = 100,
    lr: float = 0.01,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> ProbeResult:
    """Logistic regression (one `nn.Linear`, softmax cross-entropy) on frozen encoder features.

    Features are standardised per dimension with the mean and standard deviation of the training
    features (std floored at 1e-6), not L2-normalised: a linear classifier is invariant to
    per-dimension scaling in what it can express, but Adam with one learning rate converges at
    the same speed on any encoder only if the inputs have unit scale, and encoders (a random one,
    a BYOL one, a BadEncoder one) differ in feature scale by orders of magnitude. The statistics are
    then folded into the returned layer (W / std, b - W mean / std), so `head(raw_features)` gives
    the probe's logits with no separate scaler to carry around.

    Adam (lr 0.01, no weight decay, 100 epochs of shuffled mini-batches of 256): choices made here
    (SSL papers train this layer with SGD or LARS for 90-100 epochs on ImageNet-size sets; on the
    standardised small sets used here Adam converges without a schedule). Initialisation and
    shuffling are seeded without touching the global RNG, so the result is a function of the data
    and `seed`. Trains on the training features' device. Selection: train on train, select on
    `val_acc` (the caller's sweep does), report `test_acc`.

    Returns:
        ProbeResult(train_acc, val_acc, test_acc, head).
    """
    _check_feats("train_feats", train_feats, train_labels, "train_labels")
    _check_feats("test_feats", test_feats, test_labels, "test_labels")
    if (val_feats is None) != (val_labels is None):
        raise ValueError("val_feats/val_labels: pass both or neither")
    if val_feats is not None:
        _check_feats("val_feats", val_feats, val_labels, "val_labels")
    d = train_feats.shape[1]
    for name, f in (("test_feats", test_feats), ("val_feats", val_feats)):
        if f is not None and f.shape[1] != d:
            raise ValueError(f"{name} dim={f.shape[1]}: must equal train_feats dim={d}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r}: must be an int >= 1")
    if not lr > 0.0:
        raise ValueError(f"lr={lr}: must be > 0")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay={weight_decay}: must be >= 0")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be an int >= 1")
    label_max = max(int(t.max()) for t in (train_labels, test_labels, val_labels) if t is not None)
    if num_classes is None:
        num_classes = label_max + 1
    if not isinstance(num_classes, int) or num_classes <= label_max:
        raise ValueError(f"num_classes={num_classes!r}: must be an int > the largest label {label_max}")

    device = train_feats.device
    x = train_feats.detach().float()
    y = train_labels.to(device)
    mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False).clamp(min=1e-6)
    z = (x - mean) / std
    with torch.random.fork_rng(devices=[]):  # seeded init without changing the caller's RNG
        torch.manual_seed(seed)
        head = nn.Linear(d, num_classes)
    head.to(device).train()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = z.shape[0]
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(device)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(head(z[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    with torch.no_grad():  # fold the standardisation into the layer: logits = W (x - m) / s + b
        w = head.weight / std
        head.bias.sub_((w * mean).sum(dim=1))
        head.weight.copy_(w)
    head.eval().requires_grad_(False)

    def acc(f: torch.Tensor, t: torch.Tensor) -> float:
        with torch.no_grad():
            return (head(f.detach().float().to(device)).argmax(dim=1) == t.to(device)).float().mean().item()

    return ProbeResult(
        train_acc=acc(train_feats, train_labels),
        val_acc=None if val_feats is None else acc(val_feats, val_labels),
        test_acc=acc(test_feats, test_labels),
        head=head,
    )
