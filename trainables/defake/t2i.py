"""The DE-FAKE text-to-image corpus stage: real captioned images (MSCOCO, Flickr30k, any folder the
user provides) against the fakes diffusers text-to-image pipelines make from the same captions
(docs/methods.md "DE-FAKE", "Text-to-image corpus"; thesis T§5.2: Stable Diffusion and Latent
Diffusion fed MSCOCO / Flickr30k captions).

`captions` is a folder holding the real images and, in one of these forms (the first found wins):

* `captions.csv` (header row) or `captions.jsonl` (one JSON object a line) with the fields `file`
  (the image's path relative to the folder) and `caption`;
* MSCOCO's caption files `annotations/captions_*.json` ("images": [{id, file_name}],
  "annotations": [{image_id, caption}]; the first caption of each image; images looked up in the
  folder named after the file, `captions_train2014.json` -> `train2014/`, else in the folder itself;
  a caption file whose image folder is missing is skipped while another one's is there).

`per_source` images are drawn from the index (a seeded draw, kept in index order); their captions
are the prompts of every source: each pipeline (up to three: Hub model ids or local folders,
default Stable Diffusion v1-4 and the text-to-image Latent Diffusion model of CompVis, the thesis's
SD and LD) makes one fake per caption, each image from its own seeded noise (a torch.Generator per
image, so a fake does not depend on the batch it was made in). The prompt distributions of all
sources are therefore identical and a text-aware detector cannot tell sources apart by wording.

Pipelines load with `diffusers.DiffusionPipeline.from_pretrained(name, use_safetensors=True,
local_files_only=not download)`: safetensors weights only (pickled checkpoints can run code when
loaded), so a pipeline whose weights are only `.bin` / `.ckpt` pickles is refused; a local folder is
checked for that when the config is built. A pipeline's own safety checker, if it has one, stays as
its authors ship it; the images it blanks are counted (`nsfw_flagged/<generator>`).

No format shortcut: real and fake images are both resized (shorter side to `image_size`, bilinear,
antialiased) and centre-cropped to `image_size` x `image_size` RGB by the same function, then stored
as uint8 by `corpus.quantise`: nothing but the origin differs in encoding, size or value range.
(The sources' native resolutions still differ: SD makes 512 px, LD 256 px, MSCOCO photographs are
about 640 x 480 JPEGs, so the resampling each went through is not the same.)

Splits: one seeded permutation of the captions puts `train_fraction` of them in train,
`val_fraction` in validation and the rest in test, the same for every source: a caption's real image
and its fakes share a split, so no test prompt was seen in training by any source.

Labels: there are no classes; every image's label is 0 (the detectors' "detect" and "attribute"
tasks use the source only).

Outputs: as `corpus.py` (`corpus.safetensors`: pixels uint8 (N, 3, S, S), source 0 real / g =
pipelines[g - 1], labels, split; `prompts.json`: every image's prompt, the generators' names, and
the real images' files). The stage is cached by its config: it does not notice a changed folder at
the same path (give a new path or seed).
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from secsweep.config import fail, positive, require
from secsweep.errors import ArtifactError
from secsweep.names import DEVICE_HOURS, EPOCH
from secsweep.registry import register

from . import CORPUS, PROMPTS_FILE
from .corpus import N_IMAGES, quantise, split_of

log = logging.getLogger(__name__)

DEFAULT_PIPELINES = ("CompVis/stable-diffusion-v1-4", "CompVis/ldm-text2im-large-256")
MAX_PIPELINES = 3
CSV_INDEX, JSONL_INDEX = "captions.csv", "captions.jsonl"
COCO_GLOB = "annotations/captions_*.json"
FORMATS = f"{CSV_INDEX} or {JSONL_INDEX} (fields file, caption) or MSCOCO's {COCO_GLOB}"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
NSFW_FLAGGED = "nsfw_flagged"   # nsfw_flagged/<generator>: images the pipeline's safety checker blanked
METRICS = (N_IMAGES, DEVICE_HOURS)


def generator_name(pipeline: str) -> str:
    """A pipeline's name in the corpus (metrics, held_out): the last part of its id or folder."""
    return Path(pipeline.rstrip("/")).name


# the DE-FAKE sweeps' held_out dimension on the default pipelines ("" none): stable-diffusion-v1-4,
# ldm-text2im-large-256
HELD_OUT = ("", *(generator_name(p) for p in DEFAULT_PIPELINES))


def _is_local(pipeline: str) -> bool:
    # a Hub id is "owner/name" (or "name"); anything that exists or starts like a path is a folder
    return pipeline.startswith(("/", ".", "~")) or os.path.exists(pipeline)


def check_pipeline_folder(field: str, folder: Path) -> None:
    """Refuse, in one line, a local pipeline folder that is not a diffusers pipeline or whose model
    weights are pickles only (every component with weight files must have a .safetensors one)."""
    require(folder.is_dir(), field, str(folder), "is not a folder (give a Hub model id or a diffusers pipeline folder)")
    require((folder / "model_index.json").is_file(), field, str(folder),
            "has no model_index.json: not a diffusers pipeline folder (DiffusionPipeline.save_pretrained writes one)")
    for part in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [f for f in part.iterdir() if f.is_file()]
        pickled = sorted(f.name for f in files if f.suffix in PICKLE_SUFFIXES)
        if pickled and not any(f.suffix == ".safetensors" for f in files):
            fail(field, str(folder), f"{part.name}/{pickled[0]} is a pickled checkpoint and {part.name}/ has no "
                 ".safetensors weights: only safetensors are loaded (a pickle can run code when loaded)")


# -- the caption index ------------------------------------------------------------------------------

def _coco_files(folder: Path) -> list[Path]:
    """The MSCOCO caption files whose image folder is there (captions_val2014.json needs val2014/;
    annotations_trainval2014.zip holds both splits' captions, a user may fetch one split's images);
    all of them if none is, the images then in `folder` itself."""
    files = sorted(folder.glob(COCO_GLOB))
    return [f for f in files if (folder / _coco_split(f)).is_dir()] or files


def _coco_split(index: Path) -> str:
    return index.stem.split("captions_", 1)[-1]          # captions_train2014 -> train2014


def _index_file(folder: Path) -> Path | None:
    for name in (CSV_INDEX, JSONL_INDEX):
        if (folder / name).is_file():
            return folder / name
    coco = sorted(folder.glob(COCO_GLOB))
    return coco[0] if coco else None


def read_captions(folder: str | os.PathLike) -> tuple[tuple[str, str], ...]:
    """(image path relative to `folder`, caption) of every captioned image, in index order; a
    one-line ConfigError (field `captions`) for a missing folder, index, field or caption."""
    root = Path(folder).expanduser()
    require(root.is_dir(), "captions", str(folder), f"is not a folder (a folder of real images with {FORMATS})")
    index = _index_file(root)
    if index is None:
        fail("captions", str(folder), f"has no caption index: must hold {FORMATS}")
    files = [index] if index.suffix != ".json" else _coco_files(root)
    stamp = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return _read_cached(str(root), stamp)


@functools.lru_cache(maxsize=8)
def _read_cached(root: str, stamp: tuple) -> tuple[tuple[str, str], ...]:
    # cached by the index files' modification times: configs are built many times per sweep, and
    # MSCOCO's captions_train2014.json is about 80 MB of JSON
    folder = Path(root)
    files = [Path(s[0]) for s in stamp]
    if files[0].name == CSV_INDEX:
        return _read_rows(folder, files[0], _csv_rows(files[0]))
    if files[0].name == JSONL_INDEX:
        return _read_rows(folder, files[0], _jsonl_rows(files[0]))
    return tuple(e for f in files for e in _coco_entries(folder, f))


def _where(folder: Path, index: Path) -> str:
    return str(index.relative_to(folder))


def _csv_rows(index: Path):
    with index.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("file", "caption") if c not in (reader.fieldnames or [])]
        if missing:
            fail("captions", str(index.parent), f"{index.name}: no column {missing[0]!r} in the header "
                 f"{reader.fieldnames}: must have the columns file, caption")
        for i, row in enumerate(reader, start=2):
            yield i, row


def _jsonl_rows(index: Path):
    with index.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                fail("captions", str(index.parent), f"{index.name} line {i}: not JSON ({e.msg})")
            if not isinstance(row, dict) or "file" not in row or "caption" not in row:
                fail("captions", str(index.parent), f"{index.name} line {i}: must be an object with the fields "
                     "file, caption")
            yield i, row


def _read_rows(folder: Path, index: Path, rows) -> tuple[tuple[str, str], ...]:
    out = []
    for i, row in rows:
        file, caption = str(row["file"] or "").strip(), str(row["caption"] or "").strip()
        if not file or not caption:
            fail("captions", str(folder), f"{_where(folder, index)} row {i}: empty {'file' if not file else 'caption'}")
        out.append((file, caption))
    if not out:
        fail("captions", str(folder), f"{_where(folder, index)} lists no images")
    return tuple(out)


def _coco_entries(folder: Path, index: Path) -> list[tuple[str, str]]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail("captions", str(folder), f"{_where(folder, index)}: not JSON ({e})")
    for key, fields in (("images", ("id", "file_name")), ("annotations", ("image_id", "caption"))):
        items = data.get(key) if isinstance(data, dict) else None
        if not isinstance(items, list):
            fail("captions", str(folder), f"{_where(folder, index)}: no list {key!r} (MSCOCO captions format)")
        bad = next((x for x in items if not isinstance(x, dict) or any(f not in x for f in fields)), None)
        if bad is not None:
            fail("captions", str(folder), f"{_where(folder, index)}: an entry of {key!r} lacks "
                 f"{', '.join(fields)}")
    first: dict = {}
    for a in data["annotations"]:  # the first caption of each image, in the file's order
        first.setdefault(a["image_id"], str(a["caption"]).strip())
    sub = _coco_split(index)
    base = f"{sub}/" if (folder / sub).is_dir() else ""
    out = [(base + im["file_name"], first[im["id"]]) for im in data["images"] if first.get(im["id"])]
    if not out:
        fail("captions", str(folder), f"{_where(folder, index)}: no image has a caption")
    return out


@dataclass(frozen=True)
class Config:
    captions: str = ""               # the folder of real images and their captions (required to run)
    pipelines: tuple[str, ...] = DEFAULT_PIPELINES   # diffusers model ids or pipeline folders
    per_source: int = 1000           # real images drawn from the captions, and one fake of each per pipeline
    image_size: int = 256            # pixels of every stored image (square, RGB)
    steps: int = 50                  # denoising steps per fake
    guidance_scale: float = 7.5      # classifier-free guidance of every pipeline (SD's default)
    train_fraction: float = 0.6      # of the captions (a caption's images share its split)
    val_fraction: float = 0.2        # the threshold and model selection split; the rest is test
    seed: int = 0                    # the draw of the captions, the fakes' noise, the splits
    batch_size: int = 8              # prompts per pipeline call

    def __post_init__(self) -> None:
        require(1 <= len(self.pipelines) <= MAX_PIPELINES, "pipelines", self.pipelines,
                f"must name 1 to {MAX_PIPELINES} diffusers pipelines (Hub model ids or local folders)")
        for p in self.pipelines:
            require(isinstance(p, str) and bool(p.strip()), "pipelines", p, "must be a Hub model id or a folder")
            if _is_local(p):
                check_pipeline_folder("pipelines", Path(p).expanduser())
        # local paths absolute: the stage's cache key must not be "." for two different folders
        object.__setattr__(self, "pipelines", tuple(str(Path(p).expanduser().resolve()) if _is_local(p) else p
                                                    for p in self.pipelines))
        if self.captions:
            object.__setattr__(self, "captions", str(Path(self.captions).expanduser().resolve()))
        names = self.generator_names()
        require(len(set(names)) == len(names) and "real" not in names, "pipelines", self.pipelines,
                f"must have different last path parts, none 'real' (the generators' names: {names})")
        positive("per_source", self.per_source)
        require(self.image_size >= 8, "image_size", self.image_size, "must be >= 8 pixels")
        positive("steps", self.steps)
        require(self.guidance_scale >= 1.0, "guidance_scale", self.guidance_scale, "must be >= 1 (1 = no guidance)")
        require(0 < self.train_fraction < 1, "train_fraction", self.train_fraction, "must be in (0, 1)")
        require(0 < self.val_fraction < 1 - self.train_fraction, "val_fraction", self.val_fraction,
                f"must be in (0, 1 - train_fraction = {1 - self.train_fraction:g}) (the rest is test)")
        positive("batch_size", self.batch_size)
        if self.captions:  # empty: the registry's default config; running it asks for the folder
            self.real_files()

    @property
    def dataset(self) -> str:
        return "captions"  # not a secsweep.data dataset: a CLIP for it must be pretrained (clip.pretrained=)

    def generator_names(self) -> tuple[str, ...]:
        return tuple(generator_name(p) for p in self.pipelines)

    def real_files(self) -> tuple[tuple[str, str], ...]:
        """The drawn (relative path, caption) pairs; a one-line error if there are too few or a file is missing."""
        if not self.captions:
            fail("captions", "", f"must be a folder of real images with {FORMATS} (e.g. MSCOCO: "
                 "--set corpus.captions=/path/to/coco; docs/methods.md \"DE-FAKE\")")
        entries = read_captions(self.captions)
        require(self.per_source <= len(entries), "per_source", self.per_source,
                f"must be <= {len(entries)} (the captioned images in captions={self.captions!r})")
        perm = torch.randperm(len(entries), generator=torch.Generator().manual_seed(self.seed))[: self.per_source]
        chosen = tuple(entries[i] for i in perm.sort().values.tolist())
        root = Path(self.captions).expanduser()
        missing = next((f for f, _ in chosen if not (root / f).is_file()), None)
        if missing is not None:
            fail("captions", self.captions, f"the image {missing!r} of its caption index does not exist")
        return chosen


# -- images -------------------------------------------------------------------------------------------

def fit(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) floats in [0, 1] -> (N, 3, size, size): the shorter side resized to `size`
    (bilinear, antialiased), then the centre crop. Real and fake images both pass through here."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return images[..., top : top + size, left : left + size].clamp(0, 1)


def load_real(root: Path, files, size: int) -> torch.Tensor:
    """uint8 (N, 3, size, size) of the real images (any format PIL reads; grey or RGBA -> RGB)."""
    import numpy as np
    from PIL import Image

    out = []
    for f in files:
        try:
            with Image.open(root / f) as im:
                x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
        except OSError as e:
            raise ArtifactError(f"captions={str(root)!r}: cannot read the image {f!r} ({e})") from e
        out.append(quantise(fit(x.permute(2, 0, 1)[None].float() / 255.0, size))[0])
    return torch.stack(out)


def load_pipeline(name: str, device, *, download: bool):
    """A diffusers text-to-image pipeline from safetensors weights only; ArtifactError in one line if
    it cannot be loaded that way (not found offline, not a pipeline, weights only pickled)."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError as e:  # pragma: no cover - diffusers is a dependency
        raise ArtifactError(f"pipelines: {name!r} needs diffusers ({e})") from e
    try:
        pipe = DiffusionPipeline.from_pretrained(name, use_safetensors=True, local_files_only=not download)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        hint = "" if download else " (offline: pass --download to fetch it from the Hugging Face Hub)"
        raise ArtifactError(f"pipelines: cannot load {name!r} as a diffusers pipeline with safetensors weights "
                            f"({first}){hint}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(pipe, prompts: list[str], seeds: list[int], cfg: Config) -> tuple[torch.Tensor, int]:
    """uint8 (N, 3, S, S) fakes of `prompts` (one seeded noise per image) and how many of them the
    pipeline's safety checker flagged."""
    out, flagged = [], 0
    for i in range(0, len(prompts), cfg.batch_size):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + cfg.batch_size]]
        with torch.no_grad():
            res = pipe(prompt=prompts[i : i + cfg.batch_size], num_inference_steps=cfg.steps,
                       guidance_scale=cfg.guidance_scale, generator=gens, output_type="np")
        flagged += sum(bool(f) for f in (getattr(res, "nsfw_content_detected", None) or []))
        x = torch.as_tensor(res.images).float().permute(0, 3, 1, 2)  # NHWC floats in [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out.append(quantise(fit(x, cfg.image_size)))
    return torch.cat(out), flagged


@register("defake_t2i_corpus", kind="corpus", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    chosen = cfg.real_files()
    files, captions = [f for f, _ in chosen], [c for _, c in chosen]
    n = len(chosen)
    pixels = [load_real(Path(cfg.captions).expanduser(), files, cfg.image_size)]
    metrics: dict[str, float] = {}
    for g, (name, gen) in enumerate(zip(cfg.pipelines, cfg.generator_names()), start=1):
        pipe = load_pipeline(name, ctx.device, download=ctx.download)
        seeds = [cfg.seed * 1_000_003 + g * 100_003 + i for i in range(n)]  # distinct per pipeline and image
        log.info("generating %d fakes with %s", n, name)
        fake, flagged = generate(pipe, captions, seeds, cfg)
        pixels.append(fake)
        metrics[f"{NSFW_FLAGGED}/{gen}"] = float(flagged)
        del pipe
    k = len(pixels)
    split = split_of(n, cfg, cfg.seed * 31)  # one split per caption, shared by its sources
    tensors = {
        "pixels": torch.cat(pixels),
        "source": torch.arange(k).repeat_interleave(n),
        "labels": torch.zeros(k * n, dtype=torch.long),   # no classes: detect / attribute use the source
        "split": split.repeat(k),
    }
    ctx.save_output(CORPUS, tensors)
    if ctx.rank == 0:
        (ctx.output_dir / PROMPTS_FILE).write_text(json.dumps(
            {"generators": list(cfg.generator_names()), "prompts": captions * k, "real_files": files}))
    ctx.report({EPOCH: 1, N_IMAGES: float(k * n), **metrics})
