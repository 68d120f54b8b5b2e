"""Model artifacts: a model as a stage output, with everything a consumer needs to rebuild it.

An artifact is two files in a run's output folder: `<name>.safetensors` (the weights) and
`<name>.model.json`, the model card:

* ``arch`` and ``args`` — the registered architecture (`secsweep.models.build`) and its arguments,
  so a consumer rebuilds the module without knowing the config that trained it;
* ``role`` — what the model is for (classifier, encoder, projector, ...): a consumer that needs an
  encoder refuses a generator;
* ``input`` — the input contract: channels, size and value range of the images the model takes
  (every model normalises inside itself; the card records the mean and std it applies);
* ``feature_dim`` / ``num_classes`` — its output sizes, where they apply;
* ``provenance`` — the producing trainable, its config and code fingerprint (added by the
  Context that saves it), for the MLflow run and for `secsweep stages list`.

Weights are safetensors only: reading an artifact never executes code from it. The stage manifest
hashes both files, so a tampered card or weight file is detected before it is used.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from . import models as models_mod
from .errors import ArtifactError

ROLES = ("classifier", "encoder", "projector", "predictor", "generator", "detector", "decoder", "captioner")
CARD_SUFFIX = ".model.json"


@dataclass(frozen=True)
class InputContract:
    """What a model expects as input: (channels, size, size) float images in `value_range`.

    Every model normalises inside itself, so consumers always pass images in `value_range`;
    `mean` / `std` record the normalisation the model applies ((x - mean) / std per channel; None:
    none), for people and for tools that compare models. Adversarial ops rely on this: their ε is in
    pixel units of `value_range`."""

    channels: int
    size: int
    value_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def check(self, images: torch.Tensor, what: str = "input") -> None:
        """ArtifactError naming the mismatch when `images` (N, C, H, W) break the contract."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.channels, self.size, self.size):
            raise ArtifactError(f"{what}: shape {tuple(images.shape)} does not match the model's input contract "
                                f"(N, {self.channels}, {self.size}, {self.size})")

    @classmethod
    def of(cls, images: torch.Tensor, **kw: Any) -> "InputContract":
        """The contract of a (N, C, H, W) image batch or (C, H, W) shape."""
        c, h = (images.shape[-3], images.shape[-2])
        return cls(int(c), int(h), **kw)


@dataclass(frozen=True)
class ModelCard:
    arch: str
    args: Mapping[str, Any]
    role: str
    input: InputContract | None = None
    feature_dim: int | None = None
    num_classes: int | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ArtifactError(f"role={self.role!r}: must be one of {', '.join(ROLES)}")

    def build(self) -> nn.Module:
        """A freshly initialised module of this architecture."""
        return models_mod.build(self.arch, dict(self.args))

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["args"] = dict(self.args)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelCard":
        d = dict(d)
        if d.get("input") is not None:
            inp = dict(d["input"])
            for k in ("value_range", "mean", "std"):
                if inp.get(k) is not None:
                    inp[k] = tuple(inp[k])
            d["input"] = InputContract(**inp)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def describe(self) -> dict[str, Any]:
        """The parts of the card that say what a model IS (for a nested `encoder` argument)."""
        return {"arch": self.arch, "args": dict(self.args)}


def card_for(model: nn.Module, arch: str, args: Mapping[str, Any], role: str, *,
             input: InputContract | None = None) -> ModelCard:
    """A card for `model` built as `models.build(arch, args)`; output sizes read off the module."""
    fd = getattr(model, "feature_dim", None)
    nc = args.get("num_classes")
    return ModelCard(arch, dict(args), role, input, int(fd) if fd is not None else None,
                     int(nc) if nc is not None else None)


def save(directory: Path, name: str, model: nn.Module, card: ModelCard) -> Path:
    """Write `<name>.safetensors` and `<name>.model.json` into `directory`; returns the weights' path."""
    from .stages import save_tensors

    directory.mkdir(parents=True, exist_ok=True)
    bare = getattr(model, "module", model)  # DDP
    path = save_tensors(directory, name, bare.state_dict())
    (directory / f"{name}{CARD_SUFFIX}").write_text(json.dumps(card.as_dict(), indent=1, sort_keys=True, default=str))
    return path


def read_card(directory: Path, name: str) -> ModelCard:
    path = Path(directory) / f"{name}{CARD_SUFFIX}"
    if not path.is_file():
        raise ArtifactError(f"{directory}: no model artifact {name!r} (missing {path.name}); "
                            f"outputs: {', '.join(sorted(p.name for p in Path(directory).glob('*'))) or 'none'}")
    try:
        return ModelCard.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ArtifactError(f"{path}: unreadable model card ({e})") from None


def load(directory: Path, name: str = "model", *, role: str | tuple[str, ...] | None = None,
         device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Rebuild the artifact `name` from its card and load its weights (safetensors, strict).

    `role`: the role(s) the consumer accepts; any other is refused with one line."""
    card = read_card(directory, name)
    if role is not None:
        allowed = (role,) if isinstance(role, str) else tuple(role)
        if card.role not in allowed:
            raise ArtifactError(f"{directory}/{name}: a {card.role}, but a {' or '.join(allowed)} is needed")
    model = card.build()
    weights = Path(directory) / f"{name}.safetensors"
    try:
        state = load_file(str(weights))
    except (OSError, RuntimeError, ValueError) as e:  # safetensors raises SafetensorError (a ValueError... or not)
        raise ArtifactError(f"{weights}: unreadable weights ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ArtifactError(f"{weights}: weights do not fit the card's architecture {card.arch} "
                            f"({str(e).splitlines()[0]})") from None
    return model.to(device), card
