"""Evasion of a public model with FGSM (SecurityNet App. C; docs/methods.md, "Audits of public models").

FGSM (`secsweep.ops.adversarial.fgsm`: x' = Clip_[0,1](x + eps * sign(grad_x J(theta, x, y))),
untargeted, J the cross-entropy at the true label, eps in pixel units of [0, 1]) on the target's test
images (at most `max_samples`), at every eps of `eps` (SecurityNet: 0.01, 0.03, 0.1), in two modes:

* white-box: the gradients are the target's own;
* black-box: the perturbations are crafted on a surrogate trained here on the same data and
  transferred to the target. The surrogate is the stage `transfer_surrogate` (a `clean` model):
  computed once and cached, so every audited model of a dataset is attacked with the same surrogate.
  Its dataset, image size and channels are the audited model's unless given
  (`--set transfer_surrogate.dataset=...` must then name the model's data); its seed (1) differs from the default audited model's (0), so
  the surrogate is never the target itself. SecurityNet's surrogate is a ResNet-18 (here
  `preact_resnet18`, `--set transfer_surrogate.model=preact_resnet18`); the offline default is the small CNN
  (a ResNet-18 step costs about 75 times a smallcnn step on this CPU: docs/methods.md).

Metrics: `evasion_clean_acc` (the target's accuracy on the clean images), for every eps and mode the
accuracy on the adversarial images `evasion_acc_<mode>_<eps>` and the drop
`evasion_drop_<mode>_<eps>` = clean accuracy - adversarial accuracy (mode white or black, eps as
`format(eps, "g")`: evasion_drop_white_0.03; valid MLflow metric names), and the surrogate's own clean
accuracy on those images (`evasion_surrogate_acc`). The declared metrics are those of the default eps;
other eps report names of their own. Plus the target's `secsweep.audit.model_facts`. One report.
Output: the accuracies as tensors (`evasion`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from secsweep import audit, refs
from secsweep.config import fail, require
from secsweep.names import DEVICE_HOURS
from secsweep.ops.adversarial import fgsm
from secsweep.ops.metrics import accuracy
from secsweep.refs import StageRef
from secsweep.registry import register
from secsweep.training import predict

MODES = ("white", "black")
DEFAULT_EPS = (0.01, 0.03, 0.1)
# the black-box surrogate's recipe: the default audited model's, with another seed
DEFAULT_SURROGATE = {k: v for k, v in audit.DEFAULT_MODEL.items() if k != "dataset"} | {"seed": 1}
DATA_FIELDS = ("dataset", "image_size", "channels")
CLEAN_ACC, SURROGATE_ACC = "evasion_clean_acc", "evasion_surrogate_acc"
ATTACK_BATCH = 256  # images per FGSM batch (memory only: FGSM attacks every image separately)


def drop_name(mode: str, eps: float) -> str:
    return f"evasion_drop_{mode}_{format(float(eps), 'g')}"


def acc_name(mode: str, eps: float) -> str:
    return f"evasion_acc_{mode}_{format(float(eps), 'g')}"


METRICS = (CLEAN_ACC, SURROGATE_ACC, *(drop_name(m, e) for m in MODES for e in DEFAULT_EPS),
           *(acc_name(m, e) for m in MODES for e in DEFAULT_EPS), *audit.FACT_METRICS, DEVICE_HOURS)


@dataclass(frozen=True)
class Config(audit.AuditConfig):
    eps: tuple[float, ...] = DEFAULT_EPS   # L-inf budgets in pixel units of [0, 1] (SecurityNet: 0.01, 0.03, 0.1)
    # the black-box surrogate, trained on the audited model's data (dataset / image_size / channels
    # default to the model's)
    transfer_surrogate: StageRef = field(default_factory=lambda: StageRef("clean", DEFAULT_SURROGATE))

    def __post_init__(self) -> None:
        super().__post_init__()
        require(len(self.eps) >= 1, "eps", self.eps, "must give at least one budget")
        for e in self.eps:
            require(0.0 < float(e) <= 1.0, "eps", self.eps, "every budget must be in (0, 1] (pixel units)")
        require(len(set(map(float, self.eps))) == len(self.eps), "eps", self.eps, "must not repeat a budget")
        sref = refs.coerce("transfer_surrogate", self.transfer_surrogate)
        if sref.trainable != "clean":
            fail("transfer_surrogate", sref.trainable, "must be a clean model trained here (trainable clean)")
        mcfg = self.model.config()
        given = {k: sref.options[k] for k in DATA_FIELDS if k in sref.options}
        if "dataset" in given and given["dataset"] != mcfg.dataset:
            fail("transfer_surrogate.dataset", given["dataset"], f"must be the audited model's dataset ({mcfg.dataset}): "
                 "the black-box surrogate is trained on the same data")
        missing = {k: getattr(mcfg, k) for k in DATA_FIELDS if k not in given}
        if missing:
            sref = sref.with_options(**missing)
            sref.config("transfer_surrogate")
        object.__setattr__(self, "transfer_surrogate", sref)


def adversarial_accuracy(model, source, images: torch.Tensor, labels: torch.Tensor, eps: float,
                         device: torch.device) -> float:
    """Accuracy of `model` on FGSM images crafted on `source` (the model itself: white-box)."""
    correct = 0
    for x, y in zip(images.split(ATTACK_BATCH), labels.split(ATTACK_BATCH)):
        x, y = x.to(device), y.to(device)
        adv = fgsm(source, x, y, float(eps))
        with torch.no_grad():
            correct += int((model(adv).argmax(dim=1) == y).sum())
    return correct / max(len(labels), 1)


@register("audit_evasion", kind="audit", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    target = audit.load_target(cfg, ctx)
    surrogate, card = ctx.load_model(cfg.transfer_surrogate, "model", role="classifier")
    surrogate.eval()
    if card.input is not None:
        card.input.check(target.nonmembers.images[:1], what="surrogate on the audited model's images")
    test = audit.cap(target.nonmembers, cfg.max_samples, cfg.seed, salt=31)
    # counted as the adversarial accuracies are (a float32 mean would leave drops of 1e-8 where none is)
    clean = int((target.predict(test.images) == test.labels).sum()) / max(len(test), 1)
    out = {CLEAN_ACC: clean, SURROGATE_ACC: accuracy(predict(surrogate, test.images, ctx.device).cpu(), test.labels)}
    for mode, source in (("white", target.module), ("black", surrogate)):
        for e in cfg.eps:
            adv = adversarial_accuracy(target.module, source, test.images, test.labels, e, ctx.device)
            out[acc_name(mode, e)] = adv
            out[drop_name(mode, e)] = clean - adv
    ctx.save_output("evasion", {"eps": torch.tensor([float(e) for e in cfg.eps]),
                                **{f"acc_{m}": torch.tensor([out[acc_name(m, e)] for e in cfg.eps]) for m in MODES}})
    audit.report(ctx, target, out)
