"""Adversarial examples from the stolen surrogate (thesis §4.4, T-Tab 4.4; docs/methods.md, "Model
stealing"): does a Cont-Steal surrogate make a better springboard for transfer attacks on the
target than an unrelated model?

Three encoders, each with a downstream head trained the same way (`secsweep.ops.ssl.linear_probe`
on its clean features of `downstream_task`, default the surrogate stage's `downstream_dataset`;
`probe_train_size` images less a stratified `val_fraction`), so that each becomes a classifier
x -> head(E(x)):

* the target E_T — the `target` of the surrogate stage (the owner's encoder);
* the surrogate E_S — the stealing stage `surrogate` (default: Cont-Steal of that target);
* the springboard E_B — an encoder trained on other data (`springboard`, default SimCLR on MNIST
  digits; the target and the surrogate see Fashion-MNIST), the "baseline springboard" of T-Tab 4.4.

On the test images (`probe_test_size`) the attacker crafts untargeted L-inf adversarial examples on
the surrogate's classifier and on the springboard's, against the true labels, with each attack of
`secsweep.ops.adversarial` (FGSM, BIM, PGD, DI-FGSM; `eps` and `alpha` in pixel units of [0, 1],
the model in eval mode, BIM/PGD `steps` iterations) and sends them to the target's classifier:

    transfer rate = #{x : target(x) = y  and  target(x') != y} / #{x : target(x) = y}

(among the test images the target classifies correctly, the share whose adversarial version it
misclassifies; the thesis does not give its formula). `transfer_<attack>` is the rate of examples
crafted on the surrogate, `springboard_transfer_<attack>` on the springboard, `whitebox_<attack>` the
same rate on the surrogate itself (the attack works where it was crafted), `transfer` /
`springboard_transfer` the means over the four attacks, `val_transfer` the surrogate's mean on the
validation hold-out (what sweeps select on). `target_acc`, `surrogate_acc`, `springboard_acc`: the
heads' clean test accuracies. The target's weights are used only to evaluate (the attacker's side
never reads them: the examples are crafted before the target is loaded).

DI-FGSM is the documents' single step (T-Eq 5.3) with Xie et al.'s resize-and-pad transform
(`di_steps` > 1: the iterative DI^2-FGSM); eps default 0.1 (about 26/255: the small 28x28 models
need a larger budget than ImageNet's 8/255 for the rates to leave zero; the sweep varies it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from secsweep import data as data_mod
from secsweep import refs
from secsweep.config import one_of, require
from secsweep.names import DEVICE_HOURS
from secsweep.ops import adversarial as adv
from secsweep.ops import ssl as ssl_ops
from secsweep.refs import StageRef
from secsweep.registry import register
from secsweep.ssl import features_of

from . import downstream_splits

ATTACKS = ("fgsm", "bim", "pgd", "di_fgsm")
TRANSFER, SPRINGBOARD_TRANSFER, VAL_TRANSFER = "transfer", "springboard_transfer", "val_transfer"
METRICS = (*(f"{p}_{a}" for p in ("transfer", "springboard_transfer", "whitebox") for a in ATTACKS),
           TRANSFER, SPRINGBOARD_TRANSFER, VAL_TRANSFER, "target_acc", "surrogate_acc", "springboard_acc",
           DEVICE_HOURS)
BATCH = 256   # images per attack batch (memory only: every image is attacked on its own loss)

# the default surrogate: Cont-Steal of the stealing sweeps' SimCLR target with Fashion-MNIST queries
# (with MNIST queries the small surrogate hardly leaves its initialisation, docs/methods.md)
DEFAULT_SURROGATE = {"surrogate_dataset": "fashion_mnist", "surrogate_size": 2000, "epochs": 6}
# the default springboard: the same SimCLR recipe on MNIST digits, data the target never saw
DEFAULT_SPRINGBOARD = {"dataset": "mnist", "train_size": 4000, "epochs": 3}


@dataclass(frozen=True)
class Config:
    surrogate: StageRef = field(default_factory=lambda: StageRef("cont_steal", DEFAULT_SURROGATE))
    springboard: StageRef = field(default_factory=lambda: StageRef("simclr", DEFAULT_SPRINGBOARD))
    eps: float = 0.1                 # L-inf radius, pixel units of [0, 1]
    steps: int = adv.STEPS           # BIM / PGD iterations
    alpha: float = 0.0               # step size of BIM / PGD, 0 = adv.default_alpha(eps, steps)
    di_steps: int = 1                # DI-FGSM steps (1 = the documents' single step)
    downstream_task: str = ""        # a dataset; "" = the surrogate stage's downstream_dataset
    probe_train_size: int = 2000     # images the three heads train on (train + validation), 0 = all
    probe_test_size: int = 1000      # test images attacked, 0 = all
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        ref = refs.check(self, "surrogate", kinds=("stealing",))
        require(isinstance(getattr(ref.config(), "target", None), StageRef)
                and ref.config().target.spec().kind in ("encoder", "encoder_attack"), "surrogate", ref.trainable,
                "must be an encoder-stealing attack (cont_steal, encoder_steal)")
        refs.check(self, "springboard", kinds=("encoder", "encoder_attack"))
        require(0.0 < self.eps <= 1.0, "eps", self.eps, "must be in (0, 1] (pixel units)")
        require(self.steps >= 1, "steps", self.steps, "must be >= 1")
        require(self.di_steps >= 1, "di_steps", self.di_steps, "must be >= 1")
        require(0.0 <= self.alpha <= 1.0, "alpha", self.alpha, "must be in [0, 1] (0 = default)")
        if self.downstream_task:
            one_of("downstream_task", self.downstream_task, data_mod.DATASETS)
        require(self.probe_train_size >= 0, "probe_train_size", self.probe_train_size, "must be >= 0 (0 = all)")
        require(self.probe_test_size >= 0, "probe_test_size", self.probe_test_size, "must be >= 0 (0 = all)")
        require(0.0 < self.val_fraction <= 0.5, "val_fraction", self.val_fraction, "must be in (0, 0.5]")

    @property
    def target(self) -> StageRef:
        return self.surrogate.config().target

    @property
    def downstream(self) -> str:
        return self.downstream_task or self.surrogate.config().downstream_dataset


def craft(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config, seed: int) -> torch.Tensor:
    """Adversarial versions of x (untargeted against y) by attack `name`, in batches of BATCH."""
    alpha = cfg.alpha or None
    out = []
    for i in range(0, len(x), BATCH):
        xb, yb = x[i:i + BATCH], y[i:i + BATCH]
        g = torch.Generator().manual_seed(seed * 7919 + i)
        if name == "fgsm":
            out.append(adv.fgsm(model, xb, yb, cfg.eps))
        elif name == "bim":
            out.append(adv.bim(model, xb, yb, cfg.eps, alpha=alpha, steps=cfg.steps))
        elif name == "pgd":
            out.append(adv.pgd(model, xb, yb, cfg.eps, alpha=alpha, steps=cfg.steps, generator=g))
        else:
            out.append(adv.di_fgsm(model, xb, yb, cfg.eps, steps=cfg.di_steps, generator=g))
    return torch.cat(out)


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + BATCH]).argmax(1) for i in range(0, len(x), BATCH)])


def fooled(target: nn.Module, clean_ok: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    """Share of the images `target` got right (`clean_ok`) that it gets wrong on x_adv."""
    if not bool(clean_ok.any()):
        return 0.0
    wrong = predict(target, x_adv) != y
    return wrong[clean_ok].float().mean().item()


@register("adv_transfer", kind="stealing", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    torch.manual_seed(cfg.seed)
    dev = ctx.device
    surrogate_enc, card = ctx.load_model(cfg.surrogate, "encoder", role="encoder")
    springboard_enc, sb_card = ctx.load_model(cfg.springboard, "encoder", role="encoder")
    c, h = card.input.channels, card.input.size
    require((sb_card.input.channels, sb_card.input.size) == (c, h), "springboard", cfg.springboard.trainable,
            f"must take the surrogate's input shape {c}x{h}x{h}")
    train, val, test = downstream_splits(cfg, ctx, c, h, cfg.downstream)

    def classifier(enc: nn.Module) -> tuple[nn.Module, float]:
        f_train, f_val, f_test = (features_of(enc, ds.images, dev) for ds in (train, val, test))
        res = ssl_ops.linear_probe(f_train, train.labels, f_test, test.labels, val_feats=f_val,
                                   val_labels=val.labels, num_classes=train.num_classes, seed=cfg.seed)
        return nn.Sequential(enc, res.head.to(dev)).eval(), float(res.test_acc)

    sources = {"surrogate": classifier(surrogate_enc), "springboard": classifier(springboard_enc)}
    splits = {"test": (test.images.to(dev), test.labels.to(dev)), "val": (val.images.to(dev), val.labels.to(dev))}
    # the attacker's side: examples crafted on its own models only, before the target is loaded
    crafted = {(who, split, a): craft(a, sources[who][0], *splits[split], cfg, cfg.seed)
               for who in sources for split in ("test", "val") if who == "surrogate" or split == "test"
               for a in ATTACKS}

    target_enc, _ = ctx.load_model(cfg.target, "encoder", role="encoder")
    target, target_acc = classifier(target_enc)
    metrics: dict[str, float] = {"target_acc": target_acc, "surrogate_acc": sources["surrogate"][1],
                                 "springboard_acc": sources["springboard"][1]}
    ok = {s: predict(target, x) == y for s, (x, y) in splits.items()}
    surrogate_ok = predict(sources["surrogate"][0], splits["test"][0]) == splits["test"][1]
    for a in ATTACKS:
        x, y = splits["test"]
        metrics[f"transfer_{a}"] = fooled(target, ok["test"], crafted[("surrogate", "test", a)], y)
        metrics[f"springboard_transfer_{a}"] = fooled(target, ok["test"], crafted[("springboard", "test", a)], y)
        metrics[f"whitebox_{a}"] = fooled(sources["surrogate"][0], surrogate_ok, crafted[("surrogate", "test", a)], y)
    val_rates = [fooled(target, ok["val"], crafted[("surrogate", "val", a)], splits["val"][1]) for a in ATTACKS]
    metrics[TRANSFER] = sum(metrics[f"transfer_{a}"] for a in ATTACKS) / len(ATTACKS)
    metrics[SPRINGBOARD_TRANSFER] = sum(metrics[f"springboard_transfer_{a}"] for a in ATTACKS) / len(ATTACKS)
    metrics[VAL_TRANSFER] = sum(val_rates) / len(val_rates)
    ctx.save_output("adv_transfer", {k: torch.tensor(v) for k, v in metrics.items()})
    ctx.report(metrics)
