"""Neural Attention Distillation, NAD (Li et al., "Neural Attention Distillation: Erasing Backdoor
Triggers from Deep Neural Networks", ICLR 2021), a baseline defense of the FTP paper (docs/methods.md
§5.5: "knowledge distillation with a clean teacher model guides fine-tuning of the backdoored
student"; all its hyperparameters are not stated there, BackdoorBench defaults implied).

1. Teacher: a copy of the backdoored model fine-tuned with cross-entropy on the defender's clean
   data (``clean_fraction``) for ``teacher_epochs`` at the constant learning rate ``teacher_lr``.
2. Student: the backdoored model itself, trained on the same clean data with
   CE + sum_i beta_i * AT(student_i, teacher_i) over the model's ``attention_layers()`` (for
   smallcnn its three blocks, for preact_resnet18 its last three stages). The attention map of an
   activation a (N, C, H, W) is mean_c |a|^p, flattened and L2-normalised per sample; AT is the
   mean squared difference of the student's and the (frozen, eval-mode) teacher's maps.

Defaults and where they come from:

* ``betas`` (500, 1000, 1000), ``p`` 2: NAD's CIFAR-10 values (also BackdoorBench's NAD
  ``beta1/2/3: 500/1000/1000``, ``p: 2.0``); one beta per attention layer, low to high. The AT
  term is a mean over the pixels of the maps, so the same betas weigh more on smaller maps. They
  were set for NAD's WRN-16-1 on 32x32 CIFAR (maps 32/16/8 pixels a side, as smallcnn's on 32x32
  inputs; 28/14/7 on Fashion-MNIST is close; preact_resnet18's layers 2-4 give 16/8/4). On 8x8
  digits (maps 8/4/2) they make the student collapse at lr 0.01 (clean accuracy ~0.2): divide
  them by ~16 there (as tests/test_defenses_repair.py does).
* ``teacher_lr`` 0.01: BackdoorBench's NAD learning rate (``lr: 0.01``). ``teacher_epochs`` 2:
  CPU-sized; NAD and BackdoorBench fine-tune the teacher for 10 epochs (``te_epochs: 10``), which
  the paper preset sets (secsweep.presets.DEFENSE_BUDGETS). At CPU
  scale 2 epochs at 0.01 leave the teacher backdoored (digits: ASR 0.92); 0.1 works there.
* ``lr`` 0.01: student learning rate per step, constant: BackdoorBench's ``lr: 0.01`` (there with
  cosine annealing); NAD's code starts at 0.1 and divides by 10 in steps over 20 epochs.
* ``clean_fraction``: the DefenseConfig default (all clean data); NAD and BackdoorBench give the
  defender 5 % (``ratio: 0.05``), set clean_fraction=0.05 for that.
* ``epochs``, ``batch_size``, ``momentum``, ``weight_decay``: DefenseConfig's CPU-sized defaults
  (NAD: 20 epochs, batch 64, momentum 0.9 with Nesterov, weight decay 1e-4).

Reports: epoch 0 = the backdoored model (before the teacher is trained); then every student epoch
with ``asr``, ``clean_acc``, ``train_loss`` (CE + AT), ``nad_ce_loss``, ``nad_at_loss`` (the
beta-weighted AT term, mean over the epoch's samples), ``nad_attention_gap`` (unweighted sum over
layers of the AT distance between student and teacher on up to 512 clean test images, eval mode)
and the constants ``nad_attention_gap_before`` (the same for the backdoored model),
``teacher_asr`` / ``teacher_clean_acc``, ``asr_before`` / ``clean_acc_before``. The resume state
holds the student, its optimizer and the teacher. The teacher's cost is charged to the trial's
device_hours (NAD's "computational cost is high", docs/methods.md §5.5). In multi-worker trials every
worker fine-tunes the same teacher on all the clean data (deterministic, identical copies) and the
student is trained data-parallel on its shard.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from secsweep import loop
from secsweep.backdoor import DefenseConfig, clean_subset, load_victim, report_before, save_classifier
from secsweep.config import fail, positive, require
from secsweep.names import ASR, CLEAN_ACC, DEVICE_HOURS
from secsweep.registry import register
from secsweep.training import augment_generator, epoch_order

AT_LOSS = "nad_at_loss"
GAP_IMAGES = 512  # clean test images on which the attention gap is measured


@dataclass(frozen=True)
class Config(DefenseConfig):
    lr: float = 0.01                      # student learning rate per step, constant (BackdoorBench NAD: 0.01)
    teacher_lr: float = 0.01              # teacher fine-tuning learning rate per step (BackdoorBench NAD: 0.01)
    teacher_epochs: int = 2               # teacher fine-tuning epochs (NAD/BackdoorBench: 10)
    betas: tuple[float, ...] = (500.0, 1000.0, 1000.0)  # AT weight per attention layer, low to high (NAD CIFAR)
    p: float = 2.0                        # exponent of the attention map mean_c |a|^p (NAD: 2)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("lr", self.lr)
        positive("teacher_lr", self.teacher_lr)
        require(self.teacher_epochs >= 1, "teacher_epochs", self.teacher_epochs, "must be >= 1")
        require(len(self.betas) >= 1 and all(b >= 0 for b in self.betas), "betas", self.betas,
                "must be a non-empty list of weights >= 0, one per attention layer")
        positive("p", self.p)


def attention_map(a: torch.Tensor, p: float) -> torch.Tensor:
    """(N, C, H, W) activations -> (N, H*W) attention maps: mean over channels of |a|^p, L2-normalised."""
    return F.normalize(a.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float) -> torch.Tensor:
    """Mean squared difference of the two attention maps (NAD's attention-transfer loss)."""
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


class _Taps:
    """Forward hooks keeping the latest output of each of `layers`."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.out: list[torch.Tensor | None] = [None] * len(layers)
        self._handles = [layer.register_forward_hook(self._keep(i)) for i, layer in enumerate(layers)]

    def _keep(self, i: int):
        def hook(module, inputs, output):
            self.out[i] = output
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def finetune_teacher(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: Config,
                     device: torch.device) -> None:
    """Cross-entropy fine-tuning of the teacher on all the clean data (no sharding: every worker
    builds the same teacher)."""
    opt = torch.optim.SGD(teacher.parameters(), lr=cfg.teacher_lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    teacher.train()
    transform = cfg.train_transform()
    for epoch in range(cfg.teacher_epochs):
        order = epoch_order(len(labels), cfg.seed + 1, epoch)  # not the student's batch order
        aug_gen = augment_generator(cfg.seed + 1, epoch)
        for i in range(0, len(order), cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            x = images[b].to(device)
            if transform is not None:
                x = transform(x, aug_gen)
            loss = F.cross_entropy(teacher(x), labels[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    teacher.eval()
    teacher.requires_grad_(False)


@torch.no_grad()
def attention_gap(student: nn.Module, teacher: nn.Module, s_taps: _Taps, t_taps: _Taps, images: torch.Tensor,
                  device: torch.device, p: float, batch_size: int = 256) -> float:
    """Sum over attention layers of the AT distance student vs teacher, averaged over `images` (eval mode)."""
    was_training = student.training
    student.eval()
    total = 0.0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device)
        student(x)
        teacher(x)
        total += len(x) * sum(float(at_loss(s, t, p)) for s, t in zip(s_taps.out, t_taps.out))
    student.train(was_training)
    return total / max(len(images), 1)


@register("nad", kind="defense", config=Config, metrics=(ASR, CLEAN_ACC, DEVICE_HOURS, AT_LOSS))
def run(cfg: Config, ctx) -> None:
    victim = load_victim(cfg, ctx)
    data = clean_subset(victim.train, cfg.clean_fraction, cfg.seed)
    base = report_before(victim, ctx)
    bare = victim.model
    n_layers = len(bare.attention_layers())
    if len(cfg.betas) != n_layers:
        fail("betas", cfg.betas, f"must give one weight per attention layer of {cfg.model}: {n_layers}")

    state = ctx.restored()
    teacher = copy.deepcopy(bare)
    if state is not None and "teacher" in state:
        teacher.load_state_dict(state["teacher"])
        teacher.eval()
        teacher.requires_grad_(False)
    else:
        finetune_teacher(teacher, data.images, data.labels, cfg, ctx.device)
    gap_images = victim.evaluate.images[:GAP_IMAGES]
    s_taps, t_taps = _Taps(bare.attention_layers()), _Taps(teacher.attention_layers())
    teacher_metrics = victim.evaluate(teacher, ctx.device)
    extra = {**base, "teacher_asr": teacher_metrics[ASR], "teacher_clean_acc": teacher_metrics[CLEAN_ACC]}
    if state is not None and "gap_before" in state:
        extra["nad_attention_gap_before"] = float(state["gap_before"])
    else:
        extra["nad_attention_gap_before"] = attention_gap(bare, teacher, s_taps, t_taps, gap_images, ctx.device, cfg.p)

    def step(student, x, y, gen):  # student and teacher see the same augmented batch
        with torch.no_grad():
            teacher(x)
        ce = F.cross_entropy(student(x), y)
        at = sum(beta * at_loss(s, t, cfg.p) for beta, s, t in zip(cfg.betas, s_taps.out, t_taps.out))
        return ce + at, {"nad_ce_loss": ce, AT_LOSS: at}

    def evaluate(student, device):
        return {"nad_attention_gap": attention_gap(bare, teacher, s_taps, t_taps, gap_images, device, cfg.p),
                **victim.evaluate(student, device)}

    # the one training loop (secsweep.loop): SGD at a constant lr, the teacher and the gap before the
    # distillation in every checkpoint so a restart distils towards the same teacher
    loop.fit(bare, (data.images, data.labels), ctx, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
             step=step, opt="sgd", lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
             evaluate=evaluate, extra=extra, transform=cfg.train_transform(),  # the victim recipe's augmentation
             extra_state={"teacher": teacher.state_dict(), "gap_before": extra["nad_attention_gap_before"]})
    s_taps.remove()
    t_taps.remove()
    save_classifier(ctx, bare, cfg)
