"""DE-FAKE (thesis ch. 5; docs/methods.md "DE-FAKE"): detecting and attributing generated images.

Shared by the corpus stage (`corpus.py`), the image-only detector (`detector.py`) and the hybrid
CLIP detector (`hybrid.py`): reading a corpus back, the label sets of the two tasks with one
generator held out, and the unseen-generator threshold rule.

Sources are numbered 0 = real, 1..G = the corpus's generators in their config order.
Tasks: "detect" (binary: 0 real, 1 fake) and "attribute" (which source; with a generator held out,
the classes are real and the seen generators, and at test time a maximum softmax probability below
a threshold t means "unseen": the open-set rule of the thesis, T§5.4.4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from secsweep import refs
from secsweep.config import one_of, positive, require
from secsweep.refs import StageRef

SPLITS = ("train", "val", "test")
TASKS = ("detect", "attribute")
PROMPTS_FILE = "prompts.json"
CORPUS = "corpus"  # the tensors' file name in the corpus stage's outputs
# thresholds of the unseen rule searched on validation: 0, 0.1, ..., 1.0 (thesis T§5.4.4)
THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(11))

ACC, VAL_ACC = "acc", "val_acc"                              # the task's accuracy (test / validation)
UNSEEN_DETECT_ACC = "unseen_detect_acc"                      # detect: real vs the held-out generator's fakes (test)
VAL_UNSEEN_DETECT_ACC = "val_unseen_detect_acc"
OPEN_ACC, VAL_OPEN_ACC = "open_acc", "val_open_acc"          # attribute + held out: (seen + 2)-class accuracy at the picked t
THRESHOLD = "threshold"                                      # the t picked on validation


def threshold_key(prefix: str, t: float) -> str:
    """Metric name of the open-set accuracy at threshold t: e.g. open_acc_t090 for t = 0.9."""
    return f"{prefix}_t{round(t * 100):03d}"


@dataclass(frozen=True)
class Corpus:
    """A corpus read back: uint8 pixels (N, C, H, W), source (0 real, g >= 1 generator g), class
    label, split (0 train, 1 val, 2 test), the prompt of each image and the generators' names."""

    pixels: torch.Tensor
    source: torch.Tensor
    labels: torch.Tensor
    split: torch.Tensor
    prompts: tuple[str, ...]
    generators: tuple[str, ...]

    @property
    def images(self) -> torch.Tensor:
        """float32 images in [0, 1], every value a multiple of 1/255 (the one encoding of all sources)."""
        return self.pixels.float() / 255.0

    def where(self, split: str) -> torch.Tensor:
        return torch.nonzero(self.split == SPLITS.index(split)).flatten()


def read_corpus(out) -> Corpus:
    """The corpus of a corpus stage's output (`StageOutput`)."""
    t = out.tensors(CORPUS)
    meta = json.loads((Path(out.path) / PROMPTS_FILE).read_text())
    return Corpus(t["pixels"], t["source"], t["labels"], t["split"], tuple(meta["prompts"]), tuple(meta["generators"]))


# the smoke-test corpus the DE-FAKE sweeps share: sklearn's 8x8 digits (a Fashion-MNIST smoke corpus
# took 4 min on a loaded 2-CPU machine), every generator 1 epoch, 150 images per source
_TINY_GEN = {"epochs": 1, "fidelity_samples": 5, "classifier": {"trainable": "clean", "epochs": 1}}
SMOKE_CORPUS = {"trainable": "defake_corpus", "dataset": "digits", "per_source": 150,
                "generator1": {"trainable": "ddpm", **_TINY_GEN, "width": 8, "sample_steps": 10},
                "generator2": {"trainable": "cgan", **_TINY_GEN},
                "generator3": {"trainable": "vae", **_TINY_GEN}}


# the hybrid detector's CLIP in the smoke tests: one epoch on the 8x8 digits
SMOKE_HYBRID_CLIP = {"trainable": "clip", "dataset": "digits", "image_size": 8, "vision_patch": 4, "epochs": 1,
                     "monitor_size": 200}
# the tests' corpus and detectors, and the sweeps' `--preset digits` (the README's small-scale tables):
# 300 digits per source (150 / 75 / 75), generators trained for seconds, smallcnn 15 epochs, a 64-d
# CLIP at 8 px for 5 epochs
_DIGITS_GEN = {"dataset": "digits", "fidelity_samples": 20, "classifier": {"trainable": "clean", "epochs": 5}}
DIGITS_CORPUS = {"trainable": "defake_corpus", "dataset": "digits", "per_source": 300, "train_fraction": 0.5,
                 "val_fraction": 0.25,
                 "generator1": {"trainable": "ddpm", **_DIGITS_GEN, "epochs": 6, "batch_size": 64, "width": 16,
                                "sample_steps": 25},
                 "generator2": {"trainable": "cgan", **_DIGITS_GEN, "epochs": 10},
                 "generator3": {"trainable": "vae", **_DIGITS_GEN, "epochs": 20, "batch_size": 32}}
DIGITS_IMAGE = {"epochs": 15, "batch_size": 32}
DIGITS_CLIP = {"trainable": "clip", "dataset": "digits", "image_size": 8, "vision_patch": 4, "epochs": 5,
               "batch_size": 64, "monitor_size": 200}
# the sweeps' detector dimension: pixels, CLIP image + prompt (the thesis's hybrid), CLIP image alone
# through a linear probe (UnivFD, the modern peer)
DETECTORS = ["defake_image", "defake_hybrid", "defake_univfd"]


def digits_detectors(**dims) -> list[dict]:
    """The `--preset digits` grid: each detector with its test-scale settings x the sweep's `dims`."""
    from secsweep.presets import crossed

    per = {"defake_image": DIGITS_IMAGE, "defake_hybrid": {"clip": DIGITS_CLIP}, "defake_univfd": {"clip": DIGITS_CLIP}}
    return crossed([{"trainable": d, **per[d]} for d in DETECTORS], **dims)
HELD_OUT = ["", "ddpm", "cgan", "vae"]          # the offline corpus's generators a trial may hold out ("" none)


def _default_corpus() -> StageRef:
    return StageRef("defake_corpus")


@dataclass(frozen=True)
class DetectorConfig:
    """What the image-only and hybrid detectors share."""

    corpus: StageRef = field(default_factory=_default_corpus)
    task: str = "attribute"          # detect (real vs fake) or attribute (which source)
    held_out: str = ""               # a generator of the corpus left out of training ("" = none)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    robustness: bool = False         # after training: test accuracy under the attacks at ROBUST_EPS
    # share of each trained source's training images used (the training-set-size curve; thesis: the
    # detectors' accuracy as the training set grows). The validation and test splits are unchanged
    train_fraction: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        refs.check(self, "corpus", kinds=("corpus",))
        one_of("task", self.task, TASKS)
        if self.held_out:
            one_of("held_out", self.held_out, self.generator_names())
        require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        positive("batch_size", self.batch_size)
        positive("lr", self.lr)
        require(0.0 < self.train_fraction <= 1.0, "train_fraction", self.train_fraction, "must be in (0, 1]")

    def generator_names(self) -> tuple[str, ...]:
        return self.corpus.config().generator_names()


@dataclass(frozen=True)
class Task:
    """The label map of a task with a held-out generator: `target[source]` is the training class of
    each source (-1: held out, never trained on); `num_classes` the classes trained."""

    name: str
    held: int                 # source index of the held-out generator, 0 = none
    target: torch.Tensor      # (G + 1,) int64
    num_classes: int
    train_fraction: float = 1.0   # share of each source's training images trained on
    seed: int = 0                 # which ones (a seeded draw per source)


def make_task(cfg: DetectorConfig, corpus: Corpus) -> Task:
    g = len(corpus.generators)
    held = corpus.generators.index(cfg.held_out) + 1 if cfg.held_out else 0
    if cfg.task == "detect":
        target = torch.tensor([0] + [1] * g)
        k = 2
    else:
        seen = [s for s in range(g + 1) if not held or s != held]  # held = 0: none held out
        target = torch.full((g + 1,), -1, dtype=torch.long)
        target[seen] = torch.arange(len(seen))
        k = len(seen)
    if held:
        target[held] = -1
    return Task(cfg.task, held, target, k, cfg.train_fraction, cfg.seed)


def trained_positions(corpus: Corpus, task: Task, split: str) -> torch.Tensor:
    """Positions of `split` whose source is trained on (the held-out generator's images excluded).
    For detection the real images are repeated once per seen generator, so that real and fake
    weigh the same in training (the thesis trains on half real, half fake)."""
    idx = corpus.where(split)
    idx = idx[task.target[corpus.source[idx]] >= 0]
    if split == "train" and task.train_fraction < 1.0:
        # the same share of every source (at least one image each), a seeded draw kept in corpus order
        g = torch.Generator().manual_seed(task.seed)
        kept = []
        for s in corpus.source[idx].unique():
            mine = idx[corpus.source[idx] == s]
            n = max(1, round(task.train_fraction * len(mine)))
            kept.append(mine[torch.randperm(len(mine), generator=g)[:n]])
        idx = torch.cat(kept).sort().values
    if task.name == "detect":
        real = idx[corpus.source[idx] == 0]
        seen = int((task.target[1:] >= 0).sum())
        idx = torch.cat([idx, real.repeat(max(seen - 1, 0))])
    return idx


def balanced_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the classes present of the fraction of that class predicted right."""
    classes = target.unique()
    return float(torch.stack([(pred[target == c] == c).float().mean() for c in classes]).mean()) if len(target) else float("nan")


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred == target).float().mean()) if len(target) else float("nan")


def evaluate_task(probs_of, corpus: Corpus, task: Task) -> dict[str, float]:
    """Every metric of the task from `probs_of(positions) -> softmax (n, num_classes)`.

    detect:    acc / val_acc on the trained sources, balanced (the mean of the real and the fake
               images' accuracies: every source has equally many images); with a held-out generator also
               unseen_detect_acc: real test images vs the held-out generator's (balanced by sampling
               equally many real ones, the first in order);
    attribute: acc / val_acc on the trained sources (closed set); with a held-out generator the
               open-set accuracy over real, the seen generators and "unseen" at every threshold of
               THRESHOLDS on validation and test, the threshold picked on validation (ties: the
               lowest t) and open_acc at it.
    """
    out: dict[str, float] = {}
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split, key in (("val", VAL_ACC), ("test", ACC)):
        idx = corpus.where(split)
        probs = probs_of(idx)
        cache[split] = (idx, probs)
        src = corpus.source[idx]
        seen = task.target[src] >= 0
        score = balanced_accuracy if task.name == "detect" else accuracy  # detect: 1 real : G fake
        out[key] = score(probs[seen].argmax(1), task.target[src[seen]])
        if not task.held:
            continue
        held = src == task.held
        if task.name == "detect":
            n = int(held.sum())
            real = torch.nonzero(src == 0).flatten()[:n]
            pred = torch.cat([probs[real].argmax(1), probs[held].argmax(1)])
            want = torch.cat([torch.zeros(len(real), dtype=torch.long), torch.ones(n, dtype=torch.long)])
            out[VAL_UNSEEN_DETECT_ACC if split == "val" else UNSEEN_DETECT_ACC] = accuracy(pred, want)
        else:
            # open set: the held-out generator's images are class "unseen" (= num_classes)
            want = torch.where(held, torch.tensor(task.num_classes), task.target[src].clamp(min=0))
            conf, arg = probs.max(1)
            for t in THRESHOLDS:
                pred = torch.where(conf < t, torch.tensor(task.num_classes), arg)
                out[threshold_key(VAL_OPEN_ACC if split == "val" else OPEN_ACC, t)] = accuracy(pred, want)
    if task.held and task.name == "attribute":
        best = max(THRESHOLDS, key=lambda t: (out[threshold_key(VAL_OPEN_ACC, t)], -t))
        out[THRESHOLD] = best
        out[VAL_OPEN_ACC] = out[threshold_key(VAL_OPEN_ACC, best)]
        out[OPEN_ACC] = out[threshold_key(OPEN_ACC, best)]
    return out


# -- robustness (thesis T§5.5, T-Tab 5.4) ---------------------------------------------------------

ROBUST_EPS = (0.001, 0.005, 0.01)  # L-inf budgets in [0, 1] pixel units (thesis T-Tab 5.4)
PIXEL_ATTACKS = ("fgsm", "bim", "di_fgsm")


def robust_key(attack: str, eps: float) -> str:
    """Metric name of the test accuracy under `attack` at `eps`: e.g. robust_acc_fgsm_e0010 (eps 0.01)."""
    return f"robust_acc_{attack}_e{round(eps * 1000):04d}"


def robustness(model, images: torch.Tensor, target: torch.Tensor, score, *, extra=None) -> dict[str, float]:
    """Accuracy (`score(pred, target)`) of `model` (pixels -> logits) on `images` perturbed by FGSM,
    BIM (10 steps) and DI-FGSM (one step at a resized-and-padded copy, p = 0.5) at every eps of
    ROBUST_EPS (untargeted, white-box: the attacks differentiate through `model`), plus `eps = 0`
    (clean). `extra(eps) -> perturbed images` adds one more attack under the key "hybridfool"."""
    from secsweep.ops import adversarial as adv

    model.eval()
    with torch.no_grad():
        out = {"robust_acc_clean": score(model(images).argmax(1), target)}
    attacks = {"fgsm": lambda e: adv.fgsm(model, images, target, e),
               "bim": lambda e: adv.bim(model, images, target, e),
               "di_fgsm": lambda e: adv.di_fgsm(model, images, target, e, p=0.5,
                                                generator=torch.Generator().manual_seed(0))}
    if extra is not None:
        attacks["hybridfool"] = extra
    for name, attack in attacks.items():
        for eps in ROBUST_EPS:
            x = attack(eps)
            with torch.no_grad():
                out[robust_key(name, eps)] = score(model(x).argmax(1), target)
    return out


def score_of(task: Task):
    return balanced_accuracy if task.name == "detect" else accuracy


# -- frequency spectra (thesis T-Fig 5.4 / 5.8) ---------------------------------------------------

HF_SHARE = "hf_share"  # metric prefix: hf_share/<source> = spectral energy share above half Nyquist


def mean_spectra(images: torch.Tensor, source: torch.Tensor, n_sources: int) -> torch.Tensor:
    """(n_sources, H, W) mean log(1 + |FFT|) of the grey, mean-removed images of each source, the
    zero frequency at the centre (fftshift): where generators leave periodic or missing detail."""
    x = images.float().mean(1)                      # (N, H, W) grey
    x = x - x.mean(dim=(1, 2), keepdim=True)        # drop the DC term's brightness
    mag = torch.fft.fftshift(torch.fft.fft2(x).abs(), dim=(-2, -1))
    return torch.stack([torch.log1p(mag[source == s]).mean(0) for s in range(n_sources)])


def high_frequency_share(images: torch.Tensor) -> float:
    """Fraction of the power |FFT|^2 (DC removed) at radial frequencies above half the Nyquist
    frequency: low for smooth (blurry) images."""
    x = images.float().mean(1)
    x = x - x.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2).sum(0)
    h, w = power.shape
    fy = torch.fft.fftfreq(h).abs().view(-1, 1)
    fx = torch.fft.fftfreq(w).abs().view(1, -1)
    high = torch.sqrt(fy ** 2 + fx ** 2) > 0.25    # cycles per pixel; Nyquist = 0.5
    return float(power[high].sum() / power.sum().clamp_min(1e-12))


def spectra_report(ctx, corpus: Corpus, split: str = "test") -> dict[str, float]:
    """hf_share/<source> of every source's `split` images, and a PNG of the mean spectra
    (`spectra.png`, attached to the trial's MLflow run)."""
    idx = corpus.where(split)
    names = ("real", *corpus.generators)
    images, source = corpus.images[idx], corpus.source[idx]
    out = {f"{HF_SHARE}/{n}": high_frequency_share(images[source == s]) for s, n in enumerate(names)}
    spectra = mean_spectra(images, source, len(names))
    with ctx.uncharged():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(names), figsize=(2.4 * len(names), 2.6), dpi=110)
        lo, hi = float(spectra.min()), float(spectra.max())
        for ax, n, s in zip(axes, names, spectra):
            ax.imshow(s.numpy(), cmap="viridis", vmin=lo, vmax=hi)
            ax.set_title(f"{n}\nhf share {out[f'{HF_SHARE}/{n}']:.3f}", fontsize=8)
            ax.axis("off")
        fig.suptitle("mean log(1 + |FFT|), centred", fontsize=9)
        fig.tight_layout()
        fig.savefig(ctx.artifact_path("spectra.png"))
        plt.close(fig)
    return out
