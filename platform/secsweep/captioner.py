"""Captions for images that come without a prompt (DE-FAKE's hybrid detector, docs/methods.md "DE-FAKE").

The thesis captions prompt-less images with BLIP. Two captioners, named by a spec string:

* ``"retrieval"`` (offline): each image gets the candidate caption its CLIP image embedding is most
  similar to (cosine), the candidates being every class name of the dataset in every caption
  template (`secsweep.data.DEFAULT_TEMPLATES`). It can only say what the templates can say, so it is
  a stand-in for a generative captioner; with the small CLIP trained here it is a zero-shot
  classifier that writes its answer as a sentence.
* ``"blip:NAME"`` (online, or a local folder): transformers' ``BlipForConditionalGeneration`` and
  ``BlipProcessor`` from the Hugging Face Hub name or folder NAME (e.g.
  ``blip:Salesforce/blip-image-captioning-base``), loaded from safetensors only (a checkpoint that
  only has pickled weights is refused), greedy decoding of at most `max_new_tokens` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import ArtifactError

RETRIEVAL = "retrieval"
BLIP_PREFIX = "blip:"


def check_spec(spec: str) -> None:
    """Raise ValueError naming what is allowed unless `spec` is a captioner spec."""
    if spec == RETRIEVAL or (spec.startswith(BLIP_PREFIX) and len(spec) > len(BLIP_PREFIX)):
        return
    raise ValueError(f"must be {RETRIEVAL!r} (CLIP retrieval over the caption templates, offline) or "
                     f"'{BLIP_PREFIX}NAME' (a BLIP captioning model: Hub name or local folder)")


def candidate_captions(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name (class-major order)."""
    return [t.format(c) for c in class_names for t in templates]


@torch.no_grad()
def retrieval_captions(clip_model: torch.nn.Module, images: torch.Tensor, candidates: Sequence[str],
                       device: torch.device | str, batch_size: int = 512) -> list[str]:
    """The most CLIP-similar candidate caption of each image ((N, C, H, W) in [0, 1])."""
    from . import clip as clip_mod

    if not candidates:
        raise ValueError("retrieval_captions: needs at least one candidate caption")
    text = clip_mod.encode_texts(clip_model, list(candidates), device)                    # (K, E), normalised
    img = clip_mod.encode_images(clip_model, images, device, batch_size=batch_size)        # (N, E), normalised
    best = (img @ text.T).argmax(1)
    return [candidates[int(i)] for i in best]


def _load_blip(name: str, device: torch.device | str):
    try:
        from transformers import BlipForConditionalGeneration, BlipProcessor
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ArtifactError(f"captioner={BLIP_PREFIX}{name!r}: needs transformers ({e})") from e
    try:
        processor = BlipProcessor.from_pretrained(name)
        model = BlipForConditionalGeneration.from_pretrained(name, use_safetensors=True)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ArtifactError(f"captioner={BLIP_PREFIX}{name!r}: cannot load a BLIP captioner with safetensors "
                            f"weights from the Hub or that folder ({first})") from e
    return processor, model.to(device).eval()


@torch.no_grad()
def blip_captions(name: str, images: torch.Tensor, device: torch.device | str, *, batch_size: int = 64,
                  max_new_tokens: int = 20) -> list[str]:
    """BLIP captions (greedy) of (N, C, H, W) images in [0, 1]; grey images are repeated to RGB."""
    processor, model = _load_blip(name, device)
    out: list[str] = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # the processor resizes and normalises; it takes [0, 1] floats when told not to rescale
        inputs = processor(images=list(x), return_tensors="pt", do_rescale=False).to(device)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out.extend(t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True))
    return out


def caption(spec: str, images: torch.Tensor, device: torch.device | str, *, clip_model: torch.nn.Module | None = None,
            class_names: Sequence[str] = (), templates: Sequence[str] = ()) -> list[str]:
    """Captions of `images` by the captioner `spec` (module docstring); retrieval needs the CLIP,
    the dataset's class names and the templates."""
    check_spec(spec)
    if spec == RETRIEVAL:
        if clip_model is None:
            raise ValueError("caption('retrieval'): needs clip_model")
        return retrieval_captions(clip_model, images, candidate_captions(class_names, templates), device)
    return blip_captions(spec[len(BLIP_PREFIX):], images, device)
