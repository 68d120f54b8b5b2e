"""Class-conditional image generators trained here (the offline fake-image sources of DE-FAKE,
docs/methods.md "DE-FAKE"): a DDPM (diffusers' UNet2DModel + DDPMScheduler), a conditional GAN and
a conditional VAE, each trained on a real dataset (Fashion-MNIST by default).

A prompt is a class-name template ("a photo of a {class}."): the generators are text-to-image
models over a closed vocabulary, conditioned on the class the prompt names (`GeneratorConfig.prompts`).

Shared here: the config every generator extends, the training driver (`train_generator`: loop.fit
with the generator's own loss, then the fidelity proxy), and `conditioned_accuracy` — the fraction
of samples a clean classifier (an upstream "clean" stage on the same dataset) assigns to the class
they were conditioned on: a cheap stand-in for FID that also checks the conditioning works.
Every generator module has ``sample(labels, generator) -> images`` in [0, 1], (N, C, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from secsweep import data as data_mod
from secsweep import refs
from secsweep.backdoor import input_shape, load_split
from secsweep.config import one_of, positive, require
from secsweep.loop import fit
from secsweep.names import DEVICE_HOURS
from secsweep.refs import StageRef
from secsweep.training import predict

CONDITIONED_ACC = "conditioned_acc"  # clean classifier's accuracy on samples vs their conditioned class
TRAIN_LOSS = "train_loss"            # what loop.fit reports: the epoch's mean training loss
METRICS = (TRAIN_LOSS, CONDITIONED_ACC, DEVICE_HOURS)
ROLE = "generator"
ARTIFACT = "generator"


def _default_classifier() -> StageRef:
    # the dataset / size are filled in from the generator's own config (GeneratorConfig.__post_init__)
    return StageRef("clean", {"epochs": 3, "train_size": 4000})


@dataclass(frozen=True)
class GeneratorConfig:
    dataset: str = "fashion_mnist"
    train_size: int = 4000           # real training images (train + val), 0 = all
    image_size: int = 0              # pixels per side, 0 = native (28 for Fashion-MNIST)
    channels: int = 0                # 0 = native
    val_fraction: float = 0.1        # held out of training (the split machinery needs it; unused here)
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3                 # Adam
    fidelity_samples: int = 50       # samples per class for the conditioned-accuracy proxy
    classifier: StageRef = field(default_factory=_default_classifier)  # the fidelity judge ("clean", same data)
    seed: int = 0

    def __post_init__(self) -> None:
        one_of("dataset", self.dataset, data_mod.DATASETS)
        require(self.train_size >= 0, "train_size", self.train_size, "must be >= 0 (0 = all)")
        require(self.image_size == 0 or self.image_size >= 8, "image_size", self.image_size, "must be 0 or >= 8")
        require(self.channels in (0, 1, 3), "channels", self.channels, "must be 0 (native), 1 or 3")
        require(0.0 < self.val_fraction <= 0.5, "val_fraction", self.val_fraction, "must be in (0, 0.5]")
        require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        positive("batch_size", self.batch_size)
        positive("lr", self.lr)
        positive("fidelity_samples", self.fidelity_samples)
        ref = refs.coerce("classifier", self.classifier)
        # the judge sees what the generator makes: same dataset, size and channels unless given
        fill = {k: v for k, v in (("dataset", self.dataset), ("image_size", self.image_size),
                                  ("channels", self.channels)) if k not in ref.options}
        if fill:
            ref = ref.with_options(**fill)
        object.__setattr__(self, "classifier", ref)
        refs.check(self, "classifier", kinds=("model",))
        c = self.classifier.config()
        require(c.dataset == self.dataset, "classifier.dataset", c.dataset, f"must be {self.dataset!r} (the generator's)")

    @property
    def shape(self) -> tuple[int, int]:
        """(channels, size) of the generated images (those of the real ones)."""
        return input_shape(self)

    @property
    def num_classes(self) -> int:
        return data_mod.num_classes(self.dataset)

    def prompts(self) -> tuple[tuple[str, ...], ...]:
        """Per class, the prompts that condition on it: every caption template with its name."""
        return tuple(tuple(t.format(n) for t in data_mod.DEFAULT_TEMPLATES) for n in data_mod.class_names(self.dataset))


@dataclass(frozen=True)
class LatentGeneratorConfig(GeneratorConfig):
    """A generator drawing `z_dim` latent dimensions, `width` channels at its widest, and two 2x
    resolution steps between its 1/4-size feature map and the image (the cGAN and the cVAE)."""

    z_dim: int = 16
    width: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.shape[1] % 4 == 0, "image_size", self.shape[1], "must be a multiple of 4 (two 2x resolution steps)")
        require(self.z_dim >= 1, "z_dim", self.z_dim, "must be >= 1")
        require(self.width >= 1, "width", self.width, "must be >= 1")

    def model_args(self) -> dict:
        """The registered architecture's arguments (the artifact card's `args`)."""
        c, h = self.shape
        return {"num_classes": self.num_classes, "channels": c, "image_size": h, "z_dim": self.z_dim, "width": self.width}


def sample_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """(num_classes * per_class,) labels, each class `per_class` times, in class order."""
    return torch.arange(num_classes).repeat_interleave(per_class)


@torch.no_grad()
def generate(model: nn.Module, labels: torch.Tensor, seed: int, *, batch_size: int = 500,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Samples of `model` conditioned on `labels` (CPU float, [0, 1]), batch by batch, reproducible
    for a seed (one torch generator on `device`)."""
    device = torch.device(device)
    was = model.training
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    out = [model.sample(labels[i:i + batch_size].to(device), g).float().cpu() for i in range(0, len(labels), batch_size)]
    model.train(was)
    return torch.cat(out) if out else torch.empty(0)


def conditioned_accuracy(cfg: GeneratorConfig, ctx, model: nn.Module, *, seed: int = 12345) -> float:
    """Fraction of `fidelity_samples` per class that the clean classifier assigns to their class."""
    judge, _ = ctx.load_model(cfg.classifier, "model")
    labels = sample_labels(cfg.num_classes, cfg.fidelity_samples)
    fakes = generate(model, labels, seed, device=ctx.device)
    return float((predict(judge, fakes, ctx.device) == labels).float().mean())


def _own_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The step of every generator here: the model's own `loss(images, labels, generator)` (unwrapped
    from DDP, which the loop may have put around it)."""
    return getattr(model, "module", model).loss(x, y, g)


def train_generator(cfg: GeneratorConfig, ctx, model: nn.Module, *, arch: str, args: dict, opt,
                    step=_own_loss) -> nn.Module:
    """Train `model` on the real training split with `step` (its loss; default the model's own
    `loss`), report the loss per epoch and the conditioned accuracy at the end, and save it as the
    "generator" artifact (no input contract: it takes labels and noise; the images it makes are
    (C, H, W) = cfg.shape in [0, 1])."""
    torch.manual_seed(cfg.seed)
    train = load_split(cfg, ctx, "train")
    model = fit(model, (train.images, train.labels), ctx, epochs=cfg.epochs, batch_size=cfg.batch_size,
                seed=cfg.seed, step=step, opt=opt, lr=cfg.lr,
                final_evaluate=lambda m, device: {CONDITIONED_ACC: conditioned_accuracy(cfg, ctx, getattr(m, "module", m))})
    ctx.save_model(ARTIFACT, model, arch, args, ROLE)
    return model


def noise(shape: tuple[int, ...], g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn with `g` (on its device), moved to `device`."""
    return torch.randn(shape, generator=g, device=g.device).to(device)
