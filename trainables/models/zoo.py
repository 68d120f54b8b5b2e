"""A published model from the model registry (`secsweep.zoo`, docs/zoo.md) as an upstream stage.

Bring your own model: instead of training the model a defense or an audit starts from, the stage
loads a registry model (its weights checked against the card's sha256 and read without running any
of their code, `secsweep.safeload`) and saves it as a model artifact, so every consumer that loads
a classifier through `ctx.load_model` takes it unchanged (`--set victim=zoo:NAME` on any defense).
Its clean accuracy on the validation and test splits of the data the user names (`dataset`, by
default the card's) is measured once here, so a table says what the model does on that data.
"""

from __future__ import annotations

from dataclasses import dataclass

from secsweep import data as data_mod
from secsweep.backdoor import load_split
from secsweep.config import fail, one_of, require
from secsweep.names import CLEAN_ACC, DEVICE_HOURS, EPOCH, VAL_CLEAN_ACC
from secsweep.ops.metrics import accuracy
from secsweep.registry import register
from secsweep.training import predict


@dataclass(frozen=True)
class Config:
    name: str = "digit-recognizer-mnist-cnn"  # a registry model (secsweep.zoo.names(); classifiers only)
    dataset: str = ""              # the clean data the model is used with; "" = the card's dataset
    train_size: int = 0            # as the victim recipe: training samples used, 0 = all
    image_size: int = 0            # 0 = native
    channels: int = 0              # 0 = native
    val_fraction: float = 0.1      # the recipe's validation hold-out (the defender's split)
    seed: int = 0                  # the data seed (subset, validation split): the victim's

    def __post_init__(self) -> None:
        card = check_name(self.name)
        if not self.dataset:
            object.__setattr__(self, "dataset", card.dataset)
        one_of("dataset", self.dataset, data_mod.DATASETS)
        require(0.0 <= self.val_fraction <= 0.5, "val_fraction", self.val_fraction, "must be in [0, 0.5]")
        contract = card.input_contract()
        if contract is not None:  # the data must fit the model's input before anything starts
            from secsweep.backdoor import input_shape

            c, h = input_shape(self)
            if (c, h) != (contract.channels, contract.size):
                fail("dataset", self.dataset, f"gives {c}x{h}x{h} images; {self.name} takes "
                     f"{contract.channels}x{contract.size}x{contract.size} (set image_size / channels, or its dataset "
                     f"{card.dataset})")


def check_name(name: str):
    """The registry card `name`, which must be a classifier (a one-line error names the choices)."""
    from secsweep import zoo

    if name not in zoo.names():
        fail("name", name, "must be a registry model: " + ", ".join(zoo.names()))
    card = zoo.get(name)
    if card.role != "classifier":
        classifiers = [n for n in zoo.names() if zoo.get(n).role == "classifier"]
        fail("name", name, f"is a {card.role}; a classifier is needed: {', '.join(classifiers)}")
    return card


@register("zoo", kind="model", config=Config, metrics=(CLEAN_ACC, VAL_CLEAN_ACC, DEVICE_HOURS))
def run(cfg: Config, ctx) -> None:
    from secsweep import zoo

    model, card = zoo.load(cfg.name, ctx.device)
    test, val = load_split(cfg, ctx, "test"), load_split(cfg, ctx, "val")
    if card.input is not None:
        card.input.check(test.images[:1], what=f"name={cfg.name!r} on dataset={cfg.dataset!r}")
    ctx.report({EPOCH: 0, CLEAN_ACC: accuracy(predict(model, test.images, ctx.device), test.labels),
                VAL_CLEAN_ACC: accuracy(predict(model, val.images, ctx.device), val.labels)})
    ctx.save_model("model", model, card.arch, card.args, "classifier", input=card.input)
