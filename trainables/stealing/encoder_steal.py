"""Conventional stealing of an encoder (thesis §4.2, T-Eq 4.2; docs/methods.md, "Model stealing"):
the attacker queries the deployed encoder E_T with its surrogate images x (no augmentation) and
trains a surrogate encoder E_S to reproduce the answers, L = mean_i ||E_S(x_i) - E_T(x_i)||^2
(the mean squared error over the embedding's entries). Cont-Steal (`cont_steal`) is the same
attack with the contrastive loss instead.

Every epoch queries every surrogate image once (the answers do not change without an output
defense; with one, every query draws fresh noise), so at equal epochs and surrogate data it uses
exactly as many queries as Cont-Steal: the comparisons in the sweeps and tests are at equal queries.

Evaluation (both the target and the surrogate, the same downstream task, T section 4.3): a linear
layer (`secsweep.ops.ssl.linear_probe`) is trained on the downstream training images' embeddings of
each — the target's answers through an evaluation oracle with the owner's defenses, the
surrogate's own — and `steal_acc` / `target_acc` are their test accuracies, `agreement` the fraction
of test images on which the two heads predict the same class (the `val_` versions on a stratified
validation hold-out of the downstream training images: what sweeps select on). Every epoch.

Surrogate: `surrogate_model` without a head; when its width differs from the target's embedding
dimension (ResNet-18's 512 against a small CNN's 64), a linear layer maps it to the target's size
(the artifact is then an `encoder_classifier` with `num_classes` = the embedding dimension).
Output: the surrogate as the model artifact `encoder` (role encoder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from secsweep import models as models_mod
from secsweep import refs, ssl
from secsweep.artifacts import InputContract
from secsweep.context import Context
from secsweep.names import AGREEMENT
from secsweep.ops import ssl as ssl_ops
from secsweep.oracle import Oracle
from secsweep.refs import StageRef
from secsweep.registry import register
from trainables import stealing as common

# the default target: SimCLR on 6,000 Fashion-MNIST images for 3 epochs (the ssl_pretrain sweep's
# offline setting, so the stage is shared with it)
DEFAULT_TARGET = {"train_size": 6000, "epochs": 3}
ENCODER_KINDS = ("encoder", "encoder_attack")


@dataclass(frozen=True)
class EncoderStealConfig(common.StealConfig):
    """A stealing attack on an encoder (kind encoder or encoder_attack)."""

    target: StageRef = field(default_factory=lambda: StageRef("simclr", DEFAULT_TARGET))

    def __post_init__(self) -> None:
        refs.check(self, "target", kinds=ENCODER_KINDS)
        self.check_steal(models_mod.encoder_names())


Config = EncoderStealConfig


def build_surrogate(cfg: common.StealConfig, info: common.TargetInfo) -> tuple[nn.Module, str, dict[str, Any]]:
    """(surrogate encoder, artifact arch, artifact args) whose output has the target's dimension."""
    base = {"num_classes": 0, "in_channels": info.channels, "image_size": info.size}
    torch.manual_seed(cfg.seed)
    model = models_mod.build(cfg.surrogate_model, base)
    if model.feature_dim == info.out_dim:
        return model, cfg.surrogate_model, base
    args = {"encoder": {"arch": cfg.surrogate_model, "args": base}, "num_classes": info.out_dim, "hidden_dim": 0}
    torch.manual_seed(cfg.seed)
    return models_mod.build("encoder_classifier", args), "encoder_classifier", args


def encoder_evaluator(cfg: common.StealConfig, ctx: Context, evaluation: Oracle, info: common.TargetInfo):
    """`evaluate(surrogate, device)`: agreement and downstream accuracy of target and surrogate
    (module docstring). The target's side is computed once, here, from the evaluation oracle."""
    train, val, test = common.downstream_splits(cfg, ctx, info.channels, info.size)
    k = train.num_classes
    target_feats = [evaluation.query(s.images, "cpu") for s in (train, val, test)]
    target_probe = ssl_ops.linear_probe(target_feats[0], train.labels, target_feats[2], test.labels,
                                        val_feats=target_feats[1], val_labels=val.labels, num_classes=k, seed=cfg.seed)
    with torch.no_grad():
        target_val, target_test = (target_probe.head(f).argmax(1) for f in target_feats[1:])
    fixed = {common.TARGET_ACC: float(target_probe.test_acc), common.VAL_TARGET_ACC: float(target_probe.val_acc)}

    def evaluate(model: nn.Module, device: torch.device) -> dict[str, float]:
        feats = [ssl.features_of(model, s.images, device) for s in (train, val, test)]
        probe = ssl_ops.linear_probe(feats[0], train.labels, feats[2], test.labels, val_feats=feats[1],
                                     val_labels=val.labels, num_classes=k, seed=cfg.seed)
        with torch.no_grad():
            pred_val, pred_test = (probe.head(f).argmax(1) for f in feats[1:])
        return {AGREEMENT: common.agreement(pred_test, target_test),
                common.VAL_AGREEMENT: common.agreement(pred_val, target_val),
                common.STEAL_ACC: float(probe.test_acc), common.VAL_STEAL_ACC: float(probe.val_acc), **fixed}

    return evaluate


def run_encoder_steal(cfg: common.StealConfig, ctx: Context, step_of: Callable[[Oracle], common.Step]) -> nn.Module:
    """The body every encoder-stealing trainable shares: oracles, data, surrogate, `common.steal`,
    the `encoder` artifact. `step_of(oracle)` is the method's loss of one batch."""
    torch.manual_seed(cfg.seed)
    attack, evaluation, info = common.target_oracles(cfg, ctx, "embedding")
    images = common.surrogate_images(cfg, ctx, info)
    evaluate = encoder_evaluator(cfg, ctx, evaluation, info)
    surrogate, arch, args = build_surrogate(cfg, info)
    trained = common.steal(attack, surrogate, images, ctx, cfg, step_of=step_of, evaluate=evaluate,
                           target_device_hours=info.device_hours, extra={"surrogate_images": float(len(images))})
    ctx.save_model("encoder", trained, arch, args, "encoder", input=InputContract(info.channels, info.size))
    return trained


def mse_step_of(oracle: Oracle) -> common.Step:
    """T-Eq 4.2: the surrogate's embedding of x against the target's answer for the same x."""
    def step(model, x, y, gen):
        return F.mse_loss(model(x), oracle.query(x))
    return step


@register("encoder_steal", kind="stealing", config=Config, metrics=common.METRICS)
def run(cfg: Config, ctx) -> None:
    run_encoder_steal(cfg, ctx, mse_step_of)
