"""The DE-FAKE face corpus stage: real faces against the pre-trained face GAN's fakes
(docs/methods.md "DE-FAKE").

Real: the 100 face crops of scikit-image's `lfw_subset` (Labeled Faces in the Wild, grey 25 x 25;
`secsweep.data.lfw_faces`). Fake: the DCGAN of the PyPI package gan-face-generate
(`trainables/generators/face_gan.py`, the model registry's sha256-pinned port; 64 x 64 RGB,
trained on DigiFace1M), turned grey and resized
to 25 x 25 so both sources have one shape. Both are then stored the one way the class-conditional
corpus stores its images (`corpus.quantise`: uint8, rounded to the nearest of 256 levels), so
nothing but the origin differs in encoding, size or value range.

Prompts: a caption template with the class name "face", drawn uniformly and seeded, for every image
of either source (the wording carries no information about the source).

Scale: 100 real faces are all there is; with the default 0.6 / 0.2 / 0.2 split a detector sees 60
real and 60 fake training images and is tested on 20 + 20, so one test image moves accuracy by
2.5 points and a 95 % interval around 0.9 spans about +-0.09. The real and fake faces also come
from different face distributions (LFW photographs vs the GAN's rendered-face training set), so a
high accuracy shows the two sources are separable, not that GAN artefacts were found.

Outputs and splits: as `corpus.py` (`corpus.safetensors`, `prompts.json`; source 0 real, 1 face_gan).
Metrics: n_images and the mean pixel value of each source (mean_pixel/real, mean_pixel/face_gan),
a first look at what a detector might key on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from secsweep import data as data_mod
from secsweep.config import positive, require
from secsweep.names import DEVICE_HOURS, EPOCH
from secsweep.registry import register
from trainables.generators import face_gan

from . import CORPUS, PROMPTS_FILE
from .corpus import N_IMAGES, prompts_for, quantise, split_of

GENERATOR = "face_gan"
CLASS_NAMES = ("face",)
MEAN_PIXEL = "mean_pixel"  # mean_pixel/<source>: the source's mean value in [0, 1]
METRICS = (N_IMAGES, DEVICE_HOURS)


@dataclass(frozen=True)
class Config:
    per_source: int = data_mod.LFW_FACES  # real faces used (all 100 by default) and as many fakes
    train_fraction: float = 0.6
    val_fraction: float = 0.2            # the rest is test
    caption_seed: int = 0                # seed of the prompts' templates
    seed: int = 0                        # seed of the GAN's noise and the splits

    def __post_init__(self) -> None:
        positive("per_source", self.per_source)
        require(self.per_source <= data_mod.LFW_FACES, "per_source", self.per_source,
                f"must be <= {data_mod.LFW_FACES} (the real faces of lfw_subset)")
        require(0 < self.train_fraction < 1, "train_fraction", self.train_fraction, "must be in (0, 1)")
        require(0 < self.val_fraction < 1 - self.train_fraction, "val_fraction", self.val_fraction,
                f"must be in (0, 1 - train_fraction = {1 - self.train_fraction:g}) (the rest is test)")

    @property
    def dataset(self) -> str:
        return "lfw_subset"  # what a CLIP stage would have to be trained on (not a secsweep.data dataset)

    def generator_names(self) -> tuple[str, ...]:
        return (GENERATOR,)


def face_pixels(cfg: Config, device: torch.device | str = "cpu", *, cache_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, fake) uint8 (per_source, 1, 25, 25): the first per_source LFW faces and as many GAN faces."""
    real = data_mod.lfw_faces().images[: cfg.per_source]
    gan = face_gan.load_face_gan(device, cache_dir=cache_dir)
    g = torch.Generator(device=torch.device(device)).manual_seed(cfg.seed)
    fake = face_gan.to_grey(face_gan.sample(gan, cfg.per_source, g).float().cpu(), real.shape[-1])
    return quantise(real), quantise(fake)


@register("defake_faces", kind="corpus", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    real, fake = face_pixels(cfg, ctx.device)
    n = cfg.per_source
    labels = torch.zeros(2 * n, dtype=torch.long)
    tensors = {
        "pixels": torch.cat([real, fake]),
        "source": torch.arange(2).repeat_interleave(n),
        "labels": labels,
        "split": torch.cat([split_of(n, cfg, cfg.seed * 31 + s) for s in range(2)]),
    }
    ctx.save_output(CORPUS, tensors)
    prompts = prompts_for(labels[:n], CLASS_NAMES, cfg.caption_seed * 1009 + 1) + \
        prompts_for(labels[n:], CLASS_NAMES, cfg.caption_seed * 1009 + 2)
    if ctx.rank == 0:
        (ctx.output_dir / PROMPTS_FILE).write_text(json.dumps({"generators": [GENERATOR], "prompts": list(prompts)}))
    ctx.report({EPOCH: 1, N_IMAGES: float(2 * n), f"{MEAN_PIXEL}/real": float(real.float().mean() / 255),
                f"{MEAN_PIXEL}/{GENERATOR}": float(fake.float().mean() / 255)})
