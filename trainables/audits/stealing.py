"""Model stealing on a public model (SecurityNet §3.1; docs/methods.md, "Audits of public models").

Threat model: black-box, the target answers every query with its full posterior. The attacker
holds auxiliary images, queries the target once on each (`secsweep.oracle.Oracle`, no output
defense: the audit measures the model, not a service's defenses), and trains a surrogate on the
answers for `epochs` epochs with SGD at `lr`:

* `aux="train_half"` (SecurityNet's default): a seeded 50 % of the target's training split;
* `aux="ood:<dataset>"`: the training split of another dataset (e.g. `ood:fashion_mnist` for an
  MNIST model), converted to the target's input shape; SecurityNet uses an ImageNet subset.
  Labels of the auxiliary images are never used.

`aux_size` caps the queries (SecurityNet's query budget, App. B); 0 = as many images as half the
training split (also for OOD data, so both kinds of auxiliary data spend the same budget).

Loss: SecurityNet does not state it. `loss="soft_ce"` (default) is the cross-entropy of the
surrogate's logits against the target's posterior (KL divergence up to a constant);
`loss="mse"` is T-Eq 4.1's mean squared error between the two posteriors, the loss the
conventional classifier stealing of this platform uses (trainables/stealing/classifier_steal.py,
whose posterior step it reuses). Measured on the default target (MNIST smallcnn, test accuracy
0.945, 1,800 auxiliary images, smallcnn surrogate, SGD lr 0.01, 10 epochs of batch 128): agreement
0.498 with soft_ce, 0.237 with mse (MSE's gradients through the softmax are small at SGD's lr 0.01).

Surrogate (`surrogate`, a secsweep.models architecture): SecurityNet's is ResNet-18; the
registered ResNet-18 here is `preact_resnet18`. Measured on this 2-core CPU (one thread, shared
with other jobs: load about 15): one step of 128
MNIST-sized images takes about 20 s for preact_resnet18 and 0.27 s for smallcnn, so 30 epochs
of 1,800 images would take about 2.4 h with ResNet-18 and about 2 min with smallcnn. The offline
default is smallcnn; `--set surrogate=preact_resnet18` gives SecurityNet's on a GPU. Epochs:
SecurityNet's 30 is the field's default. Batch size, momentum and weight decay are not stated there:
momentum 0.9 and weight decay 5e-4 are the platform's usual SGD recipe, and batch 32 was measured
(default target, 30 epochs): agreement 0.956 (steal_acc 0.940) at batch 32 against 0.902 at 128,
whose 450 steps at lr 0.01 are not yet converged; 30 epochs at batch 32 took 108 s on this loaded
2-core machine (10 epochs: agreement 0.902).

Metrics (every epoch; the last is the result): `steal_acc` (the surrogate's accuracy on the target's
test split: SecurityNet's attack accuracy), `agreement` (fraction of test images on which surrogate
and target predict the same class), `target_acc` (the target's test accuracy), `steal_acc_ratio`
(steal_acc / target_acc, SecurityNet's ratio), each with a `val_` version on the target's
validation hold-out; `queries` (auxiliary images sent); and the target's `secsweep.audit.model_facts`.
Output: the surrogate as the model artifact `surrogate` (role classifier).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from secsweep import audit
from secsweep import data as data_mod
from secsweep import models as models_mod
from secsweep.artifacts import InputContract
from secsweep.config import fail, one_of, positive, require
from secsweep.loop import fit
from secsweep.names import AGREEMENT, DEVICE_HOURS
from secsweep.ops.metrics import accuracy
from secsweep.oracle import Oracle
from secsweep.registry import register
from trainables import stealing as common
from trainables.stealing import classifier_steal

LOSSES = ("soft_ce", "mse")
TRAIN_HALF = "train_half"
OOD_PREFIX = "ood:"
STEAL_RATIO, VAL_STEAL_RATIO = "steal_acc_ratio", "val_steal_acc_ratio"
METRICS = (common.STEAL_ACC, common.VAL_STEAL_ACC, AGREEMENT, common.VAL_AGREEMENT, common.TARGET_ACC,
           common.VAL_TARGET_ACC, STEAL_RATIO, VAL_STEAL_RATIO, common.QUERIES, *audit.FACT_METRICS, DEVICE_HOURS)


@dataclass(frozen=True)
class Config(audit.AuditConfig):
    surrogate: str = "smallcnn"   # surrogate architecture (SecurityNet: ResNet-18 = preact_resnet18; see docstring)
    aux: str = TRAIN_HALF         # auxiliary data: train_half (50 % of the target's training split) or ood:<dataset>
    aux_size: int = 0             # queries (auxiliary images), 0 = half the target's training split
    epochs: int = 30              # surrogate epochs (SecurityNet: 30)
    lr: float = 0.01              # SGD learning rate per step (SecurityNet: 0.01)
    momentum: float = 0.9         # SGD momentum (not stated)
    weight_decay: float = 5e-4    # L2 weight decay (not stated)
    batch_size: int = 32          # images per step (not stated; 32 measured better than 128, docstring)
    loss: str = "soft_ce"         # soft_ce (cross-entropy to the posterior) or mse (T-Eq 4.1); not stated

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("surrogate", self.surrogate, models_mod.model_names())
        if self.aux != TRAIN_HALF:
            kind, sep, name = self.aux.partition(":")
            if kind + sep != OOD_PREFIX or name not in data_mod.DATASETS:
                fail("aux", self.aux, f"must be {TRAIN_HALF} or ood:<dataset>, dataset one of "
                     + ", ".join(data_mod.DATASETS))
        require(self.aux_size >= 0, "aux_size", self.aux_size, "must be >= 0 (0 = half the training split)")
        require(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        positive("lr", self.lr)
        require(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        require(self.batch_size >= 2, "batch_size", self.batch_size, "must be >= 2")
        one_of("loss", self.loss, LOSSES)


def aux_images(cfg: Config, ctx, target: audit.Target) -> torch.Tensor:
    """The attacker's auxiliary (unlabelled) images, in the target's input shape (module docstring)."""
    half = len(target.members) // 2
    n = cfg.aux_size or half
    if cfg.aux == TRAIN_HALF:
        require(n <= half, "aux_size", cfg.aux_size, f"must be <= {half} (half the target's training split) "
                "with aux=train_half")
        return audit.cap(target.members, n, cfg.seed, salt=11).images
    c, h = target.input_shape
    ds = data_mod.load(cfg.aux.partition(":")[2], "train", ctx.data_root, download=ctx.download,
                       image_size=h, channels=c)
    return audit.cap(ds, n, cfg.seed, salt=12).images


def soft_ce_step(model, x, posteriors, gen):
    """Cross-entropy of the surrogate's logits against the target's posteriors."""
    return -(posteriors * F.log_softmax(model(x), dim=1)).sum(dim=1).mean()


@register("audit_stealing", kind="audit", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    target = audit.load_target(cfg, ctx)
    facts = audit.model_facts(target)
    oracle = Oracle(target.module, output="posterior")
    images = aux_images(cfg, ctx, target)
    test = audit.cap(target.nonmembers, cfg.max_samples, cfg.seed, salt=1)
    val = audit.cap(target.val, cfg.max_samples, cfg.seed, salt=2)
    target_test, target_val = target.predict(test.images), target.predict(val.images)
    fixed = {common.TARGET_ACC: accuracy(target_test, test.labels), common.VAL_TARGET_ACC: accuracy(target_val, val.labels)}

    if cfg.loss == "mse":  # T-Eq 4.1 through the conventional stealing's posterior step (queries every batch)
        step, data = classifier_steal.step_of(SimpleNamespace(response="posterior"))(oracle), (images, None)
        queries = len(images) * cfg.epochs
    else:  # one query per auxiliary image; the answers are the training targets of every epoch
        step, data = soft_ce_step, (images, oracle.query(images, "cpu"))
        queries = len(images)

    def evaluate(model, device):
        from secsweep.training import predict

        pred_test, pred_val = predict(model, test.images, device).cpu(), predict(model, val.images, device).cpu()
        out = {common.STEAL_ACC: accuracy(pred_test, test.labels), common.VAL_STEAL_ACC: accuracy(pred_val, val.labels),
               AGREEMENT: common.agreement(pred_test, target_test),
               common.VAL_AGREEMENT: common.agreement(pred_val, target_val), **fixed}
        out[STEAL_RATIO] = out[common.STEAL_ACC] / fixed[common.TARGET_ACC] if fixed[common.TARGET_ACC] else float("nan")
        out[VAL_STEAL_RATIO] = (out[common.VAL_STEAL_ACC] / fixed[common.VAL_TARGET_ACC]
                                if fixed[common.VAL_TARGET_ACC] else float("nan"))
        return out

    c, h = target.input_shape
    args = {"num_classes": target.num_classes, "in_channels": c, "image_size": h}
    torch.manual_seed(cfg.seed)
    surrogate = models_mod.build(cfg.surrogate, args)
    trained = fit(surrogate, data, ctx, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, step=step,
                  opt="sgd", lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, evaluate=evaluate,
                  extra={**facts, common.QUERIES: float(queries), "aux_images": float(len(images))})
    ctx.save_model("surrogate", trained, cfg.surrogate, args, "classifier", input=InputContract(c, h))
