"""Backdoor re-injection into a defended model (Sha et al., "Fine-Tuning Is All You Need to Mitigate
Backdoor Attacks", FTP §6.2 / thesis §3.5.2; docs/methods.md §6.2).

Backdoor sequela, part 2: after a defense removed the backdoor, how quickly does the same attack put
it back? The adversary has white-box access to the defended model and re-uses exactly the original
injection process [S]: new triggered samples made with the original attack's trigger (the attack's
`trigger` hook on its cached stage), and the original training procedure: SGD with the attack's
`attack_lr`, `attack_momentum`, `attack_weight_decay` and `attack_batch_size` (FTP §4.4: SGD, lr 0.001,
batch 256). The paper's baseline is injection into a clean model: run this trainable with
`defense="clean"` (a clean model trained with the victim's recipe); `defense="none"` re-injects into
the backdoored model itself. The defended model comes from any defense trainable through
`SequelaConfig` (shared with trainables/sequela/mia.py), as a cached stage.

Fields:
* `reinject_ratio` (default 0.01): fraction of the training set poisoned for the re-injection. The
  paper sweeps 0.1, 0.01, 0.001, 0.0001 (FTP-Fig 11, 14-17 [S]); 0.01 is where it reports the
  clearest gap (clean model 15 epochs to ASR 0.819, defended models 3-6 epochs). round(ratio * N)
  samples are poisoned, but at least one (`secsweep.poison`): on small training sets the lowest
  ratios all mean a single poisoned sample (`reinject_poisoned` reports the count). The poisoned
  samples are drawn with the config's `seed`, exactly as the original attack draws them.
* `reinject_epochs` (default 25): the paper shows the first 25 epochs [S]. CPU-sized runs set fewer.

Reports: epoch 0 = the model before re-injection, then one report per epoch with `asr`, `clean_acc`,
`asr_start` / `clean_acc_start` (the model before re-injection, in every report) and
`epochs_to_asr90` = the first epoch whose ASR >= 0.9 so far (0 if the starting model already has it;
`reinject_epochs + 1` while it has not been reached, a finite sentinel so that MLflow can store it and
"minimise epochs_to_asr90" ranks never-reached last). That value is carried in the resume state, so a
restarted trial keeps it. The re-injected model is saved as the output `model`.

Attack-specific training extras (e.g. WaNet's noise mode or Inputaware's generator training) are not
replayed: re-injection poisons with the trained attack's trigger function and trains with the plain
cross-entropy loop (`secsweep.backdoor.fit`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from secsweep.backdoor import constant, fit, save_classifier
from secsweep.config import in_open_unit, require
from secsweep.names import ASR, CLEAN_ACC, DEVICE_HOURS, EPOCH
from secsweep.poison import poison
from secsweep.registry import register
from secsweep.sequela import SequelaConfig, load_defended

ASR_GOAL = 0.9          # "epochs to ASR >= 0.9" (the paper quotes 0.935 within 2 epochs, FTP §6.2)
EPOCHS_TO_GOAL = "epochs_to_asr90"
_STATE_KEY = "reinjection_first_epoch_at_goal"


@dataclass(frozen=True)
class Config(SequelaConfig):
    reinject_ratio: float = 0.01    # fraction of the training set poisoned for re-injection (FTP: 0.1 .. 0.0001)
    reinject_epochs: int = 25       # re-injection training epochs (FTP-Fig 11: the first 25 shown)

    def __post_init__(self) -> None:
        super().__post_init__()
        in_open_unit("reinject_ratio", self.reinject_ratio)
        require(self.reinject_epochs >= 1, "reinject_epochs", self.reinject_epochs, "must be >= 1")


class _GoalTracker:
    """Wraps the trial's Context for `fit`: adds `epochs_to_asr90` to every report and keeps the
    first epoch at the goal in the resume state, so that a restarted trial does not lose it."""

    def __init__(self, ctx, never: int):
        self._ctx = ctx
        self._never = never
        state = ctx.restored()
        self.first: int | None = None
        if state is not None and state.get(_STATE_KEY, -1) >= 0:
            self.first = int(state[_STATE_KEY])

    def __getattr__(self, name: str) -> Any:  # device, shard, prepare_model, restored, ...
        return getattr(self._ctx, name)

    def report(self, metrics: Mapping[str, Any], *, state: Mapping[str, Any] | None = None) -> None:
        metrics = dict(metrics)
        if self.first is None and metrics[ASR] >= ASR_GOAL:
            self.first = int(metrics[EPOCH])
        metrics[EPOCHS_TO_GOAL] = float(self._never if self.first is None else self.first)
        if state is not None:
            state = {**state, _STATE_KEY: -1 if self.first is None else self.first}
        self._ctx.report(metrics, state=state)


@register("reinjection", kind="sequela", config=Config,
          metrics=(ASR, CLEAN_ACC, "asr_start", "clean_acc_start", EPOCHS_TO_GOAL, DEVICE_HOURS))
def run(cfg: Config, ctx) -> None:
    torch.manual_seed(cfg.seed)
    victim = load_defended(cfg, ctx)
    pset = poison(victim.train.images, victim.train.labels, victim.trigger, ratio=cfg.reinject_ratio,
                  target=cfg.target_label, seed=cfg.seed)
    tracker = _GoalTracker(ctx, never=cfg.reinject_epochs + 1)

    start = victim.evaluate(victim.model, ctx.device)
    base = {"asr_start": start[ASR], "clean_acc_start": start[CLEAN_ACC],
            "reinject_poisoned": float(pset.poisoned.sum())}
    if ctx.restored() is None:
        tracker.report({EPOCH: 0, **start, **base})
    model = fit(victim.model, pset.images, pset.labels, tracker, epochs=cfg.reinject_epochs,
                batch_size=cfg.attack_batch_size, seed=cfg.seed, lr_at=constant(cfg.attack_lr),
                momentum=cfg.attack_momentum, weight_decay=cfg.attack_weight_decay,
                evaluate=victim.evaluate, extra=base, transform=cfg.train_transform())
    save_classifier(ctx, model, cfg)
