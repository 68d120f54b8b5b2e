"""The image-only DE-FAKE detector and attributor (thesis T§5.3.1, T§5.4.1): a CNN trained from
scratch on the corpus's images alone (docs/methods.md "DE-FAKE").

task="detect": real (0) vs fake (1), trained on real and the seen generators' fakes;
task="attribute": which source (real or a seen generator). With `held_out` set, that generator's
fakes are never trained on: detection reports how well the detector still flags them
(`unseen_detect_acc`), attribution adds the unseen class by the threshold rule — maximum softmax
probability < t means "unseen" — with t searched over 0, 0.1, ..., 1.0 on validation and the
open-set accuracy reported on test at the picked t (`open_acc`; per threshold as open_acc_tNNN).

Thesis: ResNet-18 from scratch. Default here: smallcnn (CPU); `model=preact_resnet18` is the
ResNet-18. `robustness=True` adds, on the last epoch, the test accuracy under FGSM, BIM and
DI-FGSM at eps 0.001 / 0.005 / 0.01 (robust_acc_<attack>_e<eps x 1000>; thesis T-Tab 5.4).
Every report also carries hf_share/<source> (the test images' spectral energy share above half
Nyquist) and the trial attaches `spectra.png` (mean log-magnitude spectrum per source, T-Fig 5.4).
Training: SGD momentum 0.9, lr 0.01, weight decay 5e-4, batch 128 (the platform's
classifier recipe; the thesis's optimiser is not stated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from secsweep import models as models_mod
from secsweep.artifacts import InputContract
from secsweep.config import one_of
from secsweep.loop import fit
from secsweep.names import DEVICE_HOURS
from secsweep.registry import register
from secsweep.training import probabilities

from . import (ACC, VAL_ACC, DetectorConfig, evaluate_task, make_task, read_corpus, robustness, score_of,
               spectra_report, trained_positions)

METRICS = (ACC, VAL_ACC, DEVICE_HOURS)


@dataclass(frozen=True)
class Config(DetectorConfig):
    model: str = "smallcnn"          # thesis: ResNet-18 (preact_resnet18 here)
    lr: float = 0.01                 # SGD
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("model", self.model, models_mod.model_names())


@register("defake_image", kind="fake_detector", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    corpus = read_corpus(ctx.stage(cfg.corpus))
    task = make_task(cfg, corpus)
    images = corpus.images
    c, h = int(images.shape[1]), int(images.shape[2])
    train = trained_positions(corpus, task, "train")
    torch.manual_seed(cfg.seed)
    model = models_mod.build_model(cfg.model, task.num_classes, in_channels=c, image_size=h)

    def evaluate(m, device):
        return evaluate_task(lambda idx: probabilities(m, images[idx], device), corpus, task)

    def attacked(m, device):  # the last epoch only: every attack at every eps on the trained test images
        test = trained_positions(corpus, task, "test").unique()  # (detection repeats real images: once each here)
        bare = getattr(m, "module", m)
        return robustness(bare, images[test].to(device), task.target[corpus.source[test]].to(device),
                          lambda p, t: score_of(task)(p.cpu(), t.cpu()))

    model = fit(model, (images[train], task.target[corpus.source[train]]), ctx, epochs=cfg.epochs,
                batch_size=cfg.batch_size, seed=cfg.seed, opt="sgd", lr=cfg.lr, momentum=cfg.momentum,
                weight_decay=cfg.weight_decay, evaluate=evaluate, final_evaluate=attacked if cfg.robustness else None,
                extra=spectra_report(ctx, corpus))  # the corpus's spectra: what a pixel detector can see
    ctx.save_model("detector", model, cfg.model, {"num_classes": task.num_classes, "in_channels": c, "image_size": h},
                   "detector", input=InputContract(c, h))
