"""Conventional stealing of a classifier (thesis §4.2, T-Eq 4.1; docs/methods.md, "Model stealing"):
the attacker queries the deployed classifier f_T with its surrogate images x and trains a surrogate
classifier f_S on the answers. What the service returns decides the loss:

* `response="label"`: the predicted label y_T = argmax f_T(x); L = cross-entropy(f_S(x), y_T);
* `response="posterior"`: the softmax posterior p_T(x); L = mean ||softmax(f_S(x)) - p_T(x)||^2
  (MSE over the K class probabilities), as T-Eq 4.1 writes it.

The owner's output defenses (noise, top-k, rounding, ReverseSigmoid) act on posteriors only
(`secsweep.oracle`): a label oracle refuses them. Every epoch queries every surrogate image once.

Evaluation on the target's task (`downstream_dataset`, by default Fashion-MNIST, the default
target's data; it must have the target's number of classes): `steal_acc` is the surrogate's test
accuracy, `target_acc` the accuracy of the target's answers through an evaluation oracle with the
same defenses (argmax of the defended posterior), `agreement` the fraction of test images on which
the two predict the same class (no head to train: both are classifiers); `val_` versions on a
stratified validation hold-out of the downstream training split (selection). The validation images
come from the training split the target may itself have trained on: they select, they do not report.

Output: the surrogate as the model artifact `model` (role classifier, architecture `surrogate_model`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from secsweep import models as models_mod
from secsweep import refs
from secsweep.artifacts import InputContract
from secsweep.config import one_of, require
from secsweep.names import AGREEMENT
from secsweep.ops.metrics import accuracy
from secsweep.oracle import Oracle
from secsweep.refs import StageRef
from secsweep.registry import register
from secsweep.training import predict
from trainables import stealing as common

RESPONSES = ("label", "posterior")
CLASSIFIER_KINDS = ("model", "attack", "downstream")
DEFAULT_TARGET = {"train_size": 6000, "epochs": 3}   # a clean small CNN on Fashion-MNIST


@dataclass(frozen=True)
class Config(common.StealConfig):
    target: StageRef = field(default_factory=lambda: StageRef("clean", DEFAULT_TARGET))
    response: str = "label"    # what the service returns: label (-> cross-entropy) or posterior (-> MSE)

    def __post_init__(self) -> None:
        refs.check(self, "target", kinds=CLASSIFIER_KINDS)
        self.check_steal(models_mod.model_names())
        one_of("response", self.response, RESPONSES)
        defended = self.noise_sigma > 0 or self.top_k or self.round_digits != common.ROUND_OFF or self.reverse_sigmoid
        require(self.response == "posterior" or not defended, "response", self.response,
                "must be posterior with an output defense (a label oracle takes none)")


def step_of(cfg: Config):
    def make(oracle: Oracle) -> common.Step:
        def step(model, x, y, gen):
            answer = oracle.query(x)
            logits = model(x)
            if cfg.response == "label":
                return F.cross_entropy(logits, answer)
            return F.mse_loss(logits.softmax(dim=1), answer)
        return step
    return make


def classifier_evaluator(cfg: Config, ctx, evaluation: Oracle, info: common.TargetInfo):
    train, val, test = common.downstream_splits(cfg, ctx, info.channels, info.size)
    if train.num_classes != info.out_dim:
        raise ValueError(f"downstream_dataset={cfg.downstream_dataset!r}: has {train.num_classes} classes, the "
                         f"target classifies {info.out_dim}; use the target's dataset ({info.dataset})")

    def labels_of(images: torch.Tensor) -> torch.Tensor:
        answer = evaluation.query(images, "cpu")
        return answer if answer.dim() == 1 else answer.argmax(dim=1)

    target_val, target_test = labels_of(val.images), labels_of(test.images)
    fixed = {common.TARGET_ACC: accuracy(target_test, test.labels),
             common.VAL_TARGET_ACC: accuracy(target_val, val.labels)}

    def evaluate(model, device):
        pred_val, pred_test = predict(model, val.images, device), predict(model, test.images, device)
        return {AGREEMENT: common.agreement(pred_test, target_test),
                common.VAL_AGREEMENT: common.agreement(pred_val, target_val),
                common.STEAL_ACC: accuracy(pred_test, test.labels), common.VAL_STEAL_ACC: accuracy(pred_val, val.labels),
                **fixed}

    return evaluate


@register("classifier_steal", kind="stealing", config=Config, metrics=common.METRICS)
def run(cfg: Config, ctx) -> None:
    torch.manual_seed(cfg.seed)
    attack, evaluation, info = common.target_oracles(cfg, ctx, cfg.response)
    images = common.surrogate_images(cfg, ctx, info)
    evaluate = classifier_evaluator(cfg, ctx, evaluation, info)
    args = {"num_classes": info.out_dim, "in_channels": info.channels, "image_size": info.size}
    torch.manual_seed(cfg.seed)
    surrogate = models_mod.build(cfg.surrogate_model, args)
    trained = common.steal(attack, surrogate, images, ctx, cfg, step_of=step_of(cfg), evaluate=evaluate,
                           target_device_hours=info.device_hours, extra={"surrogate_images": float(len(images))})
    ctx.save_model("model", trained, cfg.surrogate_model, args, "classifier",
                   input=InputContract(info.channels, info.size))
