"""The DE-FAKE corpus stage: real images and each generator's fakes, every image with its prompt,
in one encoding (docs/methods.md "DE-FAKE").

Real images are `per_source` images of the dataset's test split (never seen by the generators nor
by their fidelity judge, both trained on the training split), each captioned from the class-name
templates (`secsweep.data.caption_pairs`). Each generator (three upstream "generator" stages, by
default the DDPM, the conditional GAN and the conditional VAE) makes `per_source` fakes: the
prompts are drawn the same way — a uniform class, a template drawn uniformly — and the fake is
conditioned on the class its prompt names. So the prompt distribution is the same for every source
and a text-aware detector cannot tell sources apart by wording alone.

No format shortcut: every source is stored as uint8 pixels of the same shape (the generators' float
outputs in [0, 1] are rounded to the nearest 1/255, exactly how the real 8-bit images became floats),
read back as float32 multiples of 1/255 in [0, 1]. Published detectors have learnt JPEG-vs-PNG
differences instead of generation artefacts; here nothing but the origin differs.

Splits: per source, a seeded permutation puts `train_fraction` of the images in train,
`val_fraction` in validation and the rest in test (equal sizes per source in every split).

Outputs: `corpus.safetensors` (pixels uint8, source, labels, split: int64) and `prompts.json`
(the prompt of every image and the generators' names, source g = generators[g - 1]).
Metrics: the clean classifier's accuracy on the real images against their labels
(`real_conditioned_acc`) and on the fakes against the class they were conditioned on
(`fake_conditioned_acc`, mean over generators; `conditioned_acc/<generator>` each).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from secsweep import data as data_mod
from secsweep import refs
from secsweep.config import one_of, positive, require
from secsweep.names import DEVICE_HOURS, EPOCH
from secsweep.refs import StageRef
from secsweep.registry import register
from secsweep.training import predict
from trainables.generators import generate

from . import CORPUS, PROMPTS_FILE

N_IMAGES = "n_images"
REAL_CONDITIONED_ACC, FAKE_CONDITIONED_ACC = "real_conditioned_acc", "fake_conditioned_acc"
METRICS = (N_IMAGES, REAL_CONDITIONED_ACC, FAKE_CONDITIONED_ACC, DEVICE_HOURS)
GENERATOR_FIELDS = ("generator1", "generator2", "generator3")


@dataclass(frozen=True)
class Config:
    dataset: str = "fashion_mnist"
    per_source: int = 1000           # images per source (real, and each generator)
    train_fraction: float = 0.6      # of each source's images (thesis: proportions not stated)
    val_fraction: float = 0.2        # the threshold and model selection split; the rest is test
    generator1: StageRef = field(default_factory=lambda: StageRef("ddpm"))
    generator2: StageRef = field(default_factory=lambda: StageRef("cgan"))
    generator3: StageRef = field(default_factory=lambda: StageRef("vae"))
    caption_seed: int = 0            # seed of the prompts (class and template per image)
    seed: int = 0                    # seed of the samples and the splits

    def __post_init__(self) -> None:
        one_of("dataset", self.dataset, data_mod.DATASETS)
        positive("per_source", self.per_source)
        require(0 < self.train_fraction < 1, "train_fraction", self.train_fraction, "must be in (0, 1)")
        require(0 < self.val_fraction < 1 - self.train_fraction, "val_fraction", self.val_fraction,
                f"must be in (0, 1 - train_fraction = {1 - self.train_fraction:g}) (the rest is test)")
        for name in GENERATOR_FIELDS:
            ref = refs.coerce(name, getattr(self, name))
            if "dataset" not in ref.options:  # the generators learn the corpus's dataset
                ref = ref.with_options(dataset=self.dataset)
            object.__setattr__(self, name, ref)
            refs.check(self, name, kinds=("generator",))
            got = getattr(self, name).config().dataset
            require(got == self.dataset, f"{name}.dataset", got, f"must be {self.dataset!r} (the corpus's)")
        names = self.generator_names()
        require(len(set(names)) == len(names), "generators", names, "must be three different generators")

    def generator_names(self) -> tuple[str, ...]:
        return tuple(getattr(self, f).trainable for f in GENERATOR_FIELDS)


def split_of(n: int, cfg: Config, seed: int) -> torch.Tensor:
    """(n,) split codes 0 train / 1 val / 2 test in a seeded random order."""
    n_train, n_val = round(cfg.train_fraction * n), round(cfg.val_fraction * n)
    codes = torch.cat([torch.zeros(n_train), torch.ones(n_val), torch.full((n - n_train - n_val,), 2)]).long()
    return codes[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def quantise(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 pixels (round to the nearest of 256 levels)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def prompts_for(labels: torch.Tensor, names: tuple[str, ...], seed: int) -> tuple[str, ...]:
    """A caption-template prompt per label (the template drawn uniformly, seeded)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(len(data_mod.DEFAULT_TEMPLATES), (len(labels),), generator=g).tolist()
    return tuple(data_mod.DEFAULT_TEMPLATES[i].format(names[y]) for i, y in zip(t, labels.tolist()))


@register("defake_corpus", kind="corpus", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    names = data_mod.class_names(cfg.dataset)
    k = len(names)
    test = data_mod.load(cfg.dataset, "test", ctx.data_root, download=ctx.download)
    first = getattr(cfg, GENERATOR_FIELDS[0]).config()
    gen_cfgs = [getattr(cfg, f).config() for f in GENERATOR_FIELDS]
    shapes = {g.shape for g in gen_cfgs}
    c, h = first.shape
    require(shapes == {(c, h)}, "generators", sorted(shapes), "must all make images of one shape")
    if test.shape[:2] != (c, h):
        test = data_mod.load(cfg.dataset, "test", ctx.data_root, download=ctx.download, image_size=h, channels=c)
    require(cfg.per_source <= len(test), "per_source", cfg.per_source, f"must be <= {len(test)} (the test split)")
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.per_source]
    real = test.subset(perm.sort().values)
    pixels = [quantise(real.images)]
    labels = [real.labels]
    prompts = list(data_mod.caption_pairs(real, seed=cfg.caption_seed).texts)
    judge, _ = ctx.load_model(first.classifier, "model")
    metrics = {REAL_CONDITIONED_ACC: float((predict(judge, real.images, ctx.device) == real.labels).float().mean())}
    for i, name in enumerate(GENERATOR_FIELDS):
        ref = getattr(cfg, name)
        model, _ = ctx.load_model(ref, "generator")
        g = torch.Generator().manual_seed(cfg.caption_seed * 1009 + i + 1)
        y = torch.randint(k, (cfg.per_source,), generator=g)
        prompts.extend(prompts_for(y, names, cfg.caption_seed * 1009 + i + 101))
        fake = quantise(generate(model, y, cfg.seed * 7919 + i, device=ctx.device))
        pixels.append(fake)
        labels.append(y)
        metrics[f"conditioned_acc/{ref.trainable}"] = float(
            (predict(judge, fake.float() / 255, ctx.device) == y).float().mean())
    n = cfg.per_source
    tensors = {
        "pixels": torch.cat(pixels),
        "source": torch.arange(4).repeat_interleave(n),
        "labels": torch.cat(labels),
        "split": torch.cat([split_of(n, cfg, cfg.seed * 31 + s) for s in range(4)]),
    }
    ctx.save_output(CORPUS, tensors)
    if ctx.rank == 0:
        (ctx.output_dir / PROMPTS_FILE).write_text(json.dumps({"generators": list(cfg.generator_names()),
                                                               "prompts": prompts}))
    fakes = [metrics[f"conditioned_acc/{r}"] for r in cfg.generator_names()]
    ctx.report({EPOCH: 1, N_IMAGES: float(len(tensors["source"])), FAKE_CONDITIONED_ACC: sum(fakes) / len(fakes),
                **metrics})
