"""CLIP models (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021) through open_clip, as model artifacts (docs/methods.md, "CLIP models").

A CLIP is two towers — an image encoder E_i and a text encoder E_t, each ending in a linear map to
a shared `embed_dim` — trained so that the cosine similarity of an image and its caption is high
and that of every other pairing in the batch is low: with L2-normalised embeddings u_i = E_i(x_i),
v_j = E_t(t_j) and a learned temperature s = exp(logit_scale), the logits are l_ij = s u_i . v_j and
the loss is the mean of the cross-entropies of l over rows (image -> text) and columns
(text -> image) with the diagonal as the target (open_clip's `ClipLoss`). After every optimizer
step logit_scale is clamped to [0, ln 100], as open_clip's training does (s <= 100).

Where a CLIP comes from:

* **online**: open_clip's pretrained weights, `from_pretrained("ViT-B-32", "openai")` (any
  `open_clip.list_pretrained()` pair; `tag` may also be a local checkpoint file). Offline, or with
  ``SECSWEEP_OFFLINE=1``, this is a one-line `ConfigError` saying it needs internet or a cached file;
* **offline** (the default): a small CLIP built from a custom open_clip model config
  (`small_config`: a ViT image tower on 32x32 images with 4x4 patches and a 2-layer text
  transformer) and trained here (`train`, over a `secsweep.data.PairedSet`, e.g. captions from
  class-name templates, `data.caption_pairs`). Custom configs are registered with
  `open_clip.add_model_config` (the library's documented way to add a model config) under a name
  derived from the config's content, then built by `open_clip.create_model`.

The tokenizer is open_clip's default `SimpleTokenizer` (`open_clip.get_tokenizer`): its byte-pair
vocabulary ships inside the package, so it works offline. Configs naming a Hugging Face tokenizer or
text tower (`hf_tokenizer_name`, `hf_model_name`) need internet and are refused here.

The model artifact (arch ``"open_clip"``, role ``encoder``) is a `CLIPModel`: the whole two-tower
open_clip model behind the encoder handles every consumer uses — ``forward(x)`` = ``features(x)`` =
the (unnormalised) image embedding, ``feature_dim`` = embed_dim — plus `encode_text` and `tokenize`.
Its arguments are the open_clip config dict and the normalisation, so `ctx.load_model` rebuilds it
(offline, also for a pretrained model: the weights are in the artifact). Inputs are images in [0, 1]
(N, 3 or 1, H, W): grey images are repeated to 3 channels, other sizes resized (bilinear,
antialiased) to the config's image size, and (x - mean) / std is applied INSIDE the model; the card's
input contract records channels 3, that size, value range [0, 1] and that mean/std (open_clip's
OpenAI statistics unless a pretrained tag says otherwise), so a consumer must not normalise again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import models as models_mod
from .artifacts import InputContract
from .errors import ConfigError


ARCH = "open_clip"
ROLE = "encoder"
OFFLINE_ENV = "SECSWEEP_OFFLINE"  # the same switch as secsweep.zoo's online loaders
MAX_LOGIT_SCALE = math.log(100.0)  # open_clip's training clamps exp(logit_scale) to <= 100
# the CLIP paper's initial temperature 0.07: logit_scale = ln(1 / 0.07) (open_clip's default)
INIT_LOGIT_SCALE = math.log(1 / 0.07)
_PREFIX = "secsweep-clip-"  # open_clip model-config names registered by this module


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise ConfigError("model=open_clip: needs the open_clip_torch package (pip install open_clip_torch)") from None
    return open_clip


# --------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------


def small_config(*, embed_dim: int = 64, image_size: int = 32, patch_size: int = 4, vision_width: int = 64,
                 vision_layers: int = 2, text_width: int = 64, text_layers: int = 2, context_length: int = 20,
                 head_width: int = 32) -> dict[str, Any]:
    """An open_clip model config of a small CLIP that trains in seconds on a CPU: a ViT image tower
    (`image_size` px, `patch_size` px patches, `vision_layers` blocks of width `vision_width`) and a
    causal text transformer (`text_layers` blocks of width `text_width` over `context_length` BPE
    tokens), attention heads of `head_width` channels, both projected to `embed_dim`.

    Not from a paper: sized for 32x32 Fashion-MNIST (~3.4 M parameters, 3.2 M of them the 49,408-token
    embedding table at width 64). ViT-B/32, for comparison: width 768, 12 + 12 layers, 224 px."""
    for name, v in (("embed_dim", embed_dim), ("image_size", image_size), ("patch_size", patch_size),
                    ("vision_width", vision_width), ("vision_layers", vision_layers), ("text_width", text_width),
                    ("text_layers", text_layers), ("context_length", context_length), ("head_width", head_width)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name}={v!r}: must be a positive int")
    cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": vision_width,
                       "layers": vision_layers, "head_width": head_width},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": text_width,
                     "heads": max(1, text_width // head_width), "layers": text_layers},
    }
    check_config(cfg)
    return cfg


def check_config(cfg: Mapping[str, Any]) -> None:
    """ConfigError (one line) unless `cfg` is an open_clip CLIP config this module can build offline."""
    if not isinstance(cfg, Mapping) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ConfigError(f"config={_short(cfg)}: must be an open_clip model config with embed_dim, "
                          "vision_cfg and text_cfg")
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    if not isinstance(v, Mapping) or not isinstance(t, Mapping):
        raise ConfigError("config: vision_cfg and text_cfg must be dicts")
    if "hf_model_name" in t or t.get("hf_tokenizer_name"):
        raise ConfigError("config.text_cfg: a Hugging Face text tower / tokenizer needs internet; "
                          "use open_clip's built-in text transformer")
    if "timm_model_name" not in v:
        size, patch = v.get("image_size", 224), v.get("patch_size", 16)
        layers = v.get("layers", 12)
        if isinstance(layers, int) and isinstance(size, int) and isinstance(patch, int):  # a ViT tower
            if patch < 1 or size % patch:
                raise ConfigError(f"image_size={size}: must be a multiple of patch_size={patch}")
            width, hw = v.get("width", 768), v.get("head_width", 64)
            if hw < 1 or width % hw:
                raise ConfigError(f"vision width={width}: must be a multiple of head_width={hw}")
    width, heads = t.get("width", 512), t.get("heads", 8)
    if heads < 1 or width % heads:
        raise ConfigError(f"text width={width}: must be a multiple of its heads={heads}")
    if t.get("context_length", 77) < 2:
        raise ConfigError(f"context_length={t.get('context_length')}: must be >= 2 (start and end tokens)")


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."


def config_name(cfg: Mapping[str, Any]) -> str:
    """The open_clip model name of a custom config: a digest of its content, so equal configs share
    one registration and `open_clip.get_tokenizer(name)` sees its context length."""
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    return _PREFIX + digest


def register_config(cfg: Mapping[str, Any]) -> str:
    """Register `cfg` with open_clip (`add_model_config` on a JSON file named after it) and return
    its model name. Idempotent; the file is removed once open_clip has read it into its registry."""
    open_clip = _open_clip()
    check_config(cfg)
    name = config_name(cfg)
    if name not in open_clip.list_models():
        with tempfile.TemporaryDirectory(prefix="secsweep-clip-") as d:
            path = Path(d) / f"{name}.json"
            path.write_text(json.dumps(cfg, sort_keys=True))
            open_clip.add_model_config(path)
    return name


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------


class CLIPModel(nn.Module):
    """An open_clip CLIP behind the encoder interface: ``forward(images)`` is the image embedding
    (unnormalised, (N, embed_dim)), ``forward(images, tokens)`` the training triple
    (normalised image embeddings, normalised text embeddings, exp(logit_scale)).

    Images are floats in [0, 1]; grey ones are repeated to 3 channels, other sizes resized to the
    config's `image_size`, and the normalisation `mean`/`std` is applied here."""

    def __init__(self, clip: nn.Module, config: Mapping[str, Any], mean: Sequence[float], std: Sequence[float],
                 tokenizer_name: str):
        super().__init__()
        self.clip = clip
        self.config = copy.deepcopy(dict(config))
        self.feature_dim = int(config["embed_dim"])
        size = config["vision_cfg"].get("image_size", 224)
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.context_length = int(config["text_cfg"].get("context_length", 77))
        self.tokenizer_name = tokenizer_name
        self.norm_mean = tuple(float(v) for v in mean)  # exact values for the card (the buffers are float32)
        self.norm_std = tuple(float(v) for v in std)
        # not in the state dict: the card's arguments carry them
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self._tokenizer = None

    # -- images -----------------------------------------------------------------------------------
    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (N, 1 or 3, H, W) -> the normalised (N, 3, size, size) tower input."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images.shape={tuple(images.shape)}: must be (N, 1 or 3, H, W)")
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return (x - self.mean) / self.std

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_image(self.prepare(images), normalize=normalize)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The image embedding (N, embed_dim), unnormalised: what encoder consumers use."""
        return self.encode_image(images)

    # -- texts ------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = _open_clip().get_tokenizer(self.tokenizer_name, context_length=self.context_length)
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, context_length) int64 BPE tokens (open_clip's SimpleTokenizer; longer texts are cut,
        keeping the end-of-text token the text tower pools at)."""
        return self.tokenizer(list(texts)).long()

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=normalize)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None):
        if tokens is None:
            return self.features(images)
        u = self.encode_image(images, normalize=True)
        v = self.encode_text(tokens, normalize=True)
        return u, v, self.clip.logit_scale.exp()


def default_mean_std() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """open_clip's default normalisation (the OpenAI CLIP training set's channel statistics)."""
    oc = _open_clip()
    return tuple(oc.OPENAI_DATASET_MEAN), tuple(oc.OPENAI_DATASET_STD)


def create(config: Mapping[str, Any], mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           *, seed: int | None = None) -> CLIPModel:
    """A freshly initialised CLIP of the open_clip config `config` (random weights; `seed` seeds
    torch first, so equal seeds give equal models)."""
    open_clip = _open_clip()
    name = register_config(config)
    dm, ds = default_mean_std()
    mean, std = tuple(mean or dm), tuple(std or ds)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(f"mean={mean}, std={std}: must be 3 values each, std > 0")
    if seed is not None:
        torch.manual_seed(seed)
    quiet = _DropRandomInitWarning()
    logging.getLogger().addFilter(quiet)  # open_clip warns on the root logger that no weights were loaded
    try:
        clip = open_clip.create_model(name, pretrained=None, pretrained_image=False, pretrained_text=False)
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise ConfigError(f"config={_short(dict(config))}: open_clip cannot build it "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    finally:
        logging.getLogger().removeFilter(quiet)
    return CLIPModel(clip, config, mean, std, name)


class _DropRandomInitWarning(logging.Filter):
    """Random initialisation is what `create` asks for: not worth a warning per model built."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


def open_clip_model(config: dict, mean: list | None = None, std: list | None = None, num_classes: int = 0) -> nn.Module:
    """The `open_clip` architecture of model artifacts: `create(config, mean, std)`. `num_classes`
    must be 0 (what `encoder_classifier` passes to an encoder: a CLIP has no head)."""
    if num_classes:
        raise ConfigError(f"num_classes={num_classes}: an open_clip CLIP is an encoder (0 only); "
                          "put a head on it with encoder_classifier")
    return create(config, mean, std)


if ARCH not in models_mod.MODELS:  # importing this module twice (reload) must not re-register
    models_mod.register_model(ARCH, image=False)(open_clip_model)


def arch_args(model: CLIPModel) -> dict[str, Any]:
    """The artifact arguments that rebuild `model`: its config and normalisation."""
    return {"config": copy.deepcopy(model.config), "mean": list(model.norm_mean), "std": list(model.norm_std)}


def input_contract(model: CLIPModel) -> InputContract:
    """Channels 3, the config's image size, [0, 1], and the mean/std the model applies itself."""
    return InputContract(3, model.image_size, (0.0, 1.0), model.norm_mean, model.norm_std)


def save(ctx: Any, model: CLIPModel, name: str = "encoder") -> Path:
    """Save `model` (unwrapped) as the model artifact `name`, role encoder."""
    bare = getattr(model, "module", model)
    return ctx.save_model(name, bare, ARCH, arch_args(bare), ROLE, input=input_contract(bare))


def _offline_forced() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


def parse_pretrained(spec: str) -> tuple[str, str]:
    """"ViT-B-32:openai" -> ("ViT-B-32", "openai"); the tag may be a checkpoint file path."""
    name, sep, tag = spec.partition(":")
    if not sep or not name or not tag:
        raise ConfigError(f"pretrained={spec!r}: must be MODEL:TAG, e.g. ViT-B-32:openai "
                          "(open_clip.list_pretrained()), or MODEL:/path/to/checkpoint")
    return name, tag


def from_pretrained(name: str, tag: str, *, cache_dir: str | None = None) -> CLIPModel:
    """open_clip's pretrained CLIP `name` with weights `tag` (a pretrained tag, downloaded into
    `cache_dir` / the Hugging Face cache, or a local checkpoint file). Needs internet for a tag that
    is not cached; offline (or with SECSWEEP_OFFLINE=1 and no local file) a one-line ConfigError."""
    open_clip = _open_clip()
    spec = f"{name}:{tag}"
    if name not in open_clip.list_models():
        raise ConfigError(f"pretrained={spec}: unknown open_clip model {name!r}; "
                          f"see open_clip.list_models()")
    is_file = os.path.isfile(tag)
    if not is_file and tag not in open_clip.list_pretrained_tags_by_model(name):
        raise ConfigError(f"pretrained={spec}: {name} has no pretrained tag {tag!r} (and no such file); "
                          f"tags: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'}")
    config = open_clip.get_model_config(name)
    check_config(config)
    if not is_file and _offline_forced():
        raise ConfigError(f"pretrained={spec}: needs internet to download open_clip's weights, or a "
                          f"cached checkpoint file ({OFFLINE_ENV}=1); offline, leave pretrained empty to train a small CLIP here")
    if is_file:  # a local checkpoint: read through secsweep.safeload (nothing in it executes)
        return _from_local_file(open_clip, name, tag, config)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=tag, cache_dir=cache_dir, weights_only=True)
    except (RuntimeError, OSError, ValueError) as e:
        raise ConfigError(f"pretrained={spec}: needs internet to download open_clip's weights, or a "
                          f"cached checkpoint file; it could not be loaded here ({str(e).splitlines()[0][:160]})") from None
    pp = getattr(clip.visual, "preprocess_cfg", {}) or {}
    dm, ds = default_mean_std()
    mean, std = tuple(pp.get("mean", dm)), tuple(pp.get("std", ds))
    model = CLIPModel(clip, config, mean, std, name)
    # the artifact is rebuilt from `config` by `create`: check it yields the same parameters
    fresh = create(config, mean, std)
    if set(fresh.state_dict()) != set(model.state_dict()):
        raise ConfigError(f"pretrained={spec}: its open_clip config does not rebuild the loaded model")
    fresh.load_state_dict(model.state_dict())
    return fresh


def _from_local_file(open_clip, name: str, path: str, config: dict) -> CLIPModel:
    """open_clip model `name` with the weights of the local file `path`, read by `safeload` (safetensors,
    or a weights-only torch checkpoint converted once to safetensors with its sha256 recorded); a
    `state_dict` wrapper and DataParallel's `module.` prefix are unwrapped as open_clip does."""
    from . import safeload

    tensors = safeload.load_weights(path)
    if any(k.startswith("state_dict.") for k in tensors):
        tensors = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    model = create(config)
    pp = getattr(model.clip.visual, "preprocess_cfg", {}) or {}
    if "mean" in pp or "std" in pp:  # the model's own normalisation, as for a downloaded tag
        model = CLIPModel(model.clip, config, tuple(pp.get("mean", model.norm_mean)),
                          tuple(pp.get("std", model.norm_std)), model.tokenizer_name)
    try:
        missing, unexpected = model.clip.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise ConfigError(f"pretrained={name}:{path}: the checkpoint does not fit {name} ({first[:200]})") from None
    if missing or unexpected:
        raise ConfigError(f"pretrained={name}:{path}: the checkpoint does not fit {name} "
                          f"(missing {len(missing)} tensors, e.g. {missing[:2]}; unexpected {len(unexpected)}, e.g. {unexpected[:2]})")
    return model


# --------------------------------------------------------------------------------------------------
# embeddings and zero-shot classification
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_images(model: nn.Module, images: torch.Tensor, device: torch.device | str, *, batch_size: int = 512,
                  normalize: bool = True) -> torch.Tensor:
    """Image embeddings (N, embed_dim) on the CPU, L2-normalised unless `normalize=False`; `images`
    in [0, 1] (the model resizes, repeats grey channels and normalises)."""
    from .training import batched_eval

    bare = getattr(model, "module", model)
    return batched_eval(lambda x: bare.encode_image(x, normalize=normalize), bare, images, torch.device(device),
                        batch_size)


@torch.no_grad()
def encode_texts(model: nn.Module, texts: Sequence[str] | torch.Tensor, device: torch.device | str, *,
                 batch_size: int = 512, normalize: bool = True) -> torch.Tensor:
    """Text embeddings (N, embed_dim) on the CPU of strings (tokenized here) or of a token tensor."""
    bare = getattr(model, "module", model)
    tokens = texts if isinstance(texts, torch.Tensor) else bare.tokenize(texts)
    was = bare.training
    bare.eval()
    try:
        out = [bare.encode_text(tokens[i:i + batch_size].to(device), normalize=normalize).float().cpu()
               for i in range(0, len(tokens), batch_size)]
    finally:
        bare.train(was)
    return torch.cat(out) if out else torch.empty(0, bare.feature_dim)


def zero_shot_classifier(model: nn.Module, class_names: Sequence[str], templates: Sequence[str],
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """(K, embed_dim) class embeddings: for each class, the mean of the normalised text embeddings
    of `template.format(name)` over `templates`, normalised again (the CLIP paper's prompt
    ensembling, §3.1.4)."""
    if not class_names or not templates:
        raise ValueError("zero_shot_classifier: needs at least one class name and one template")
    texts = [t.format(c) for c in class_names for t in templates]
    emb = encode_texts(model, texts, device).view(len(class_names), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


def zero_shot_logits(model: nn.Module, images: torch.Tensor, classifier: torch.Tensor,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Cosine similarities (N, K) of the images' embeddings to the class embeddings."""
    return encode_images(model, images, device) @ classifier.T


def zero_shot_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                       templates: Sequence[str], device: torch.device | str = "cpu", *,
                       classifier: torch.Tensor | None = None) -> float:
    """Fraction of `images` whose most similar class prompt (`zero_shot_classifier`) is its label."""
    if classifier is None:
        classifier = zero_shot_classifier(model, class_names, templates, device)
    if len(images) == 0:
        return float("nan")
    pred = zero_shot_logits(model, images, classifier, device).argmax(1)
    return float((pred == labels.cpu()).float().mean())


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------


def clip_step(rank: int = 0, world_size: int = 1) -> Callable[..., torch.Tensor]:
    """The `secsweep.loop.fit` step of contrastive image-text training: x = images, y = their
    captions' tokens (N, context_length); open_clip's ClipLoss (gathering the batch over the
    `world_size` DDP workers)."""
    loss = _open_clip().ClipLoss(rank=rank, world_size=world_size)

    def step(model, x, y, gen):
        u, v, scale = model(x, y)
        return loss(u, v, scale)

    return step


def clamp_logit_scale(model: nn.Module) -> Callable[[int], None]:
    """`after_step` of `fit`: logit_scale into [0, ln 100] after every optimizer step."""
    bare = getattr(model, "module", model)

    def after(step: int) -> None:
        with torch.no_grad():
            bare.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    return after


def pair_tensors(model: CLIPModel, pairs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, tokens) of a `data.PairedSet`, for `fit`: captions tokenized once."""
    return pairs.images, model.tokenize(pairs.texts)


def train(model: CLIPModel, pairs: Any, ctx: Any, *, epochs: int, batch_size: int, lr: float,
          weight_decay: float = 0.1, seed: int = 0, lr_at: Callable[[int], float] | None = None,
          evaluate=None, final_evaluate=None, extra: Mapping[str, float] | None = None) -> CLIPModel:
    """Contrastive training of `model` on the image-caption `pairs` with AdamW (`secsweep.loop.fit`:
    per-epoch reports, checkpoints, resume). Returns the trained (unwrapped) model."""
    from .loop import fit

    images, tokens = pair_tensors(model, pairs)
    return fit(model, (images, tokens), ctx, epochs=epochs, batch_size=batch_size, seed=seed,
               step=clip_step(ctx.rank, ctx.world_size), opt="adamw", lr=lr if lr_at is None else None,
               lr_at=lr_at, weight_decay=weight_decay, after_step=clamp_logit_scale(model),
               evaluate=evaluate, final_evaluate=final_evaluate, extra=extra)
