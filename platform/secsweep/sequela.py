"""What every sequela trainable attacks: a defended model (docs/methods.md §6).

`SequelaConfig` names the defense whose output to attack (any defense trainable, "none" for the
backdoored model itself, "clean" for a clean model with the victim's recipe); `load_defended` gets
that model as a cached stage, so a sweep over every defense pays for each defended model once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import registry
from .backdoor import DefenseConfig, Victim, load_victim
from .config import build, fail, one_of, require
from .errors import ArtifactError

DEFENSE_FIELDS = tuple(f.name for f in dataclasses.fields(DefenseConfig))
BASELINES = ("none", "clean")  # the backdoored model itself; a clean model with the victim's recipe


# -- shared by every sequela trainable ------------------------------------------------------------

@dataclass(frozen=True)
class SequelaConfig(DefenseConfig):
    """A defended model to attack: the DefenseConfig fields, plus which defense produced it."""

    defense: str = "sft"                                   # a defense trainable, or "none" / "clean"
    defense_options: dict = field(default_factory=dict)   # defense-specific fields, e.g. {"lr_max1": 0.3}

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("defense", self.defense, registry.names("defense") + BASELINES)
        if self.defense in BASELINES:
            require(not self.defense_options, "defense_options", self.defense_options,
                    f"must be empty for defense={self.defense!r}")
        else:
            self.defense_config()  # validates defense_options against the defense's Config

    def defense_config(self):
        """The defense's Config: every DefenseConfig field of this config plus `defense_options`."""
        spec = registry.get(self.defense)
        shared = sorted(set(self.defense_options) & set(DEFENSE_FIELDS))
        if shared:
            fail(f"defense_options.{shared[0]}", self.defense_options[shared[0]],
                 "is a shared setting of defense and sequela; set it directly, not in defense_options")
        values = {k: getattr(self, k) for k in DEFENSE_FIELDS}
        values.update(self.defense_options)
        return build(spec.config, values, what=f"defense {self.defense!r} (defense_options)",
                     nested=("defense_options", self.defense_options))

    def clean_config(self):
        """Config of the "clean" model stage: the victim's data, architecture and training recipe."""
        return registry.get("clean").build_config({
            "dataset": self.dataset, "model": self.model, "train_size": self.train_size,
            "image_size": self.image_size, "channels": self.channels, "epochs": self.attack_epochs,
            "lr": self.attack_lr, "momentum": self.attack_momentum, "weight_decay": self.attack_weight_decay,
            "batch_size": self.attack_batch_size, "val_fraction": self.val_fraction, "seed": self.victim_seed,
            "augment": self.augment, "augment_padding": self.augment_padding,
        })


def load_defended(cfg: SequelaConfig, ctx) -> Victim:
    """The victim of `cfg` (trigger, clean training set, test evaluation) with its model replaced by
    the output `model` of `cfg.defense` (a cached stage); "none" keeps the backdoored model, "clean"
    loads a clean model trained with the victim's recipe."""
    victim = load_victim(cfg, ctx)
    if cfg.defense == "none":
        return victim
    if cfg.defense == "clean":
        out = ctx.stage("clean", cfg.clean_config())
    else:
        out = ctx.stage(cfg.defense, cfg.defense_config())
    if not (out.path / "model.safetensors").is_file():
        raise ArtifactError(f"defense={cfg.defense!r}: its stage saved no output 'model' "
                            "(a defense must save its model: secsweep.backdoor.save_classifier)")
    victim.model, _ = ctx.load_model(out, "model", role="classifier")
    return victim
