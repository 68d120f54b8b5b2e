"""Backdoor-sample detectors compared (docs/methods.md, "DeDe", "ASSET", "DECREE"): DeDe, ASSET and
DECREE on the five victims of DeDe's paper — BadEncoder, DRUPE, CTRL, CLIP-Backdoor and BadCLIP —
one trial per (detector, victim), in the layout of DD-Tab 1-3:

* DD-Tab 1, balanced test sets (50 % triggered): `tpr`, `fpr`, `auc` (the first poison rate);
* DD-Tab 3, unbalanced (1 %): `tpr_1pct`, `fpr_1pct`, `auc_1pct`;
* DD-Tab 2, the downstream-defense protocol: `clean_acc` / `asr` after dropping what the detector
  flags (detected triggered test inputs count as failed attacks), beside the same classifier trained
  on the poisoned downstream data without a detector ("No Def.": `clean_acc_before` / `asr_before`);
* DECREE's encoder-level decision (`decree_flagged`, `decree_l1_fraction`; DD marks it with *),
  ASSET's selected epoch (`asset_epoch`).

    python sweeps/detector_comparison.py                 # offline defaults of every victim and detector, 15 trials
    python sweeps/detector_comparison.py --smoke-test    # < 1 min: the three detectors on a tiny digits BadEncoder
    python sweeps/detector_comparison.py --preset digits  # ~3 min on 2 CPUs: every victim at its tests' scale (the README table)
    python sweeps/detector_comparison.py --preset paper --download --gpus-per-trial 0.5   # CIFAR-10, ViT-B/16 CLIPs

Every victim is a cached stage, trained once for its three detectors. ASSET runs 30 epochs on CTRL
(the public run script's; 10 elsewhere). DECREE runs on every victim, although it addresses patch
triggers only (DD: "-" for CTRL and BadCLIP). Selection is on `val_auc`; the tables report the test split.
"""

import dataclasses
import importlib.util
from pathlib import Path

from secsweep.presets import PAPER_VICTIM
from secsweep.sweep import Sweep, main
from trainables.attacks import badclip, clip_backdoor

DETECTORS = ["dede", "asset", "decree"]
VICTIMS = ["badencoder", "drupe", "ctrl", "clip_backdoor", "badclip"]
# per (detector, victim) settings: ASSET's public run script trains 30 epochs on CTRL, 10 elsewhere
SETTINGS = {("asset", "ctrl"): {"epochs": 30}}


def comparison(victims: dict[str, object], detectors: dict[str, dict]) -> list[dict]:
    """One grid point per (detector, victim): {trainable, victim, the detector's settings}."""
    return [{"trainable": det, "victim": victim, **values, **SETTINGS.get((det, name), {})}
            for name, victim in victims.items() for det, values in detectors.items()]


def _dede_sweep():
    """sweeps/dede.py (DeDe's own sweep): its paper and smoke settings are DeDe's, not repeated here."""
    spec = importlib.util.spec_from_file_location("_dede_sweep", Path(__file__).with_name("dede.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEDE = _dede_sweep()

# --preset paper: the documents' setting (DD §5.1). ResNet-18 victims pre-trained on CIFAR-10 (BadEncoder
# and DRUPE with the public BadEncoder recipe, CTRL a poisoned SimCLR run with the same recipe), ViT-B/16
# CLIPs (open_clip's OpenAI weights, online) for CLIP-Backdoor and BadCLIP; CIFAR-10 downstream, target
# "truck" (9, a choice). Detection test sets of 10,000 images; DeDe as sweeps/dede.py's paper preset;
# ASSET's base set 1,000 clean images (DD: "[.]k for CL", not legible: the smallest reading) and the
# public script's epochs; DECREE's shadow set 10,000 CIFAR-10 images, 100 inversion epochs (DD: not stated).
def _own_fields(module) -> dict:
    """A victim module's `PAPER` values that its Config has (BadCLIP's copies CLIP-Backdoor's)."""
    names = {f.name for f in dataclasses.fields(module.Config)}
    return {k: v for k, v in module.PAPER.items() if k in names}


TARGET = {"downstream_dataset": "cifar10", "target_label": 9}
PAPER_SIMCLR_FIELDS = {k: v for k, v in DEDE.PAPER_SIMCLR.items() if k != "trainable"}
PAPER_VICTIMS = {
    "badencoder": {**DEDE.PAPER_BADENCODER, **TARGET},
    "drupe": {**DEDE.PAPER_BADENCODER, "trainable": "drupe", **TARGET},
    "ctrl": {"trainable": "ctrl", **PAPER_SIMCLR_FIELDS, "model": PAPER_VICTIM["model"], **TARGET},
    # the CLIP victims' own paper settings (open_clip's ViT-B/16 OpenAI weights fine-tuned on CIFAR-10)
    "clip_backdoor": {"trainable": "clip_backdoor", **_own_fields(clip_backdoor), **TARGET},
    "badclip": {"trainable": "badclip", **_own_fields(badclip), **TARGET},
}
PAPER_DETECTORS = {
    "dede": {**DEDE.PAPER_DEDE, "train_poison_rate": 0.01},
    "asset": {"base_size": 1000, "epochs": 10},
    "decree": {"shadow_size": 10000, "epochs": 100, "batch_size": 256},
}

# --smoke-test (< 1 min): a one-epoch SimCLR on 300 digits and a one-epoch BadEncoder on 200 of them
# (sweeps/dede.py's smoke victim), DeDe with sweeps/dede.py's smoke settings, ASSET and DECREE cut down
SMOKE_DEDE = {k: v for k, v in DEDE.SWEEP.smoke["fixed"].items() if k not in ("victim", "test_size", "downstream_epochs")}
SMOKE_DETECTORS = {"dede": SMOKE_DEDE, "asset": {"base_size": 50, "epochs": 3},
                   "decree": {"shadow_size": 100, "epochs": 3}}

# --preset digits (~3 min on 2 CPUs, 2 min 38 s measured): every victim at the scale of its tests (the SSL victims on
# sklearn digits: SimCLR 3 epochs, BadEncoder / DRUPE 5 epochs, CTRL 9 % of the digits poisoned; the
# CLIP victims on 2,222 Fashion-MNIST image-caption pairs, CLIP-Backdoor at 5 %, BadCLIP at 1 %), DeDe
# with tests/test_dede.py's decoder (4-pixel patches on the CLIPs' 32-pixel inputs), ASSET at its
# defaults, DECREE on 200 shadow images for 15 epochs: the small-scale table of the README
_DIGITS_SIMCLR = {"trainable": "simclr", "dataset": "digits", "train_size": 0, "epochs": 3, "batch_size": 64,
                  "monitor_size": 300}
_DIGITS_ENCODER_ATTACK = {"encoder": _DIGITS_SIMCLR, "downstream_dataset": "digits", "shadow_size": 0, "epochs": 5,
                          "monitor_size": 200}
_SMALL_CLIP = {"trainable": "clip", "train_size": 2222, "epochs": 3, "batch_size": 32, "monitor_size": 500}
DIGITS_VICTIMS = {
    "badencoder": {"trainable": "badencoder", **_DIGITS_ENCODER_ATTACK},
    "drupe": {"trainable": "drupe", **_DIGITS_ENCODER_ATTACK, "n_reference": 50},
    "ctrl": {**_DIGITS_SIMCLR, "trainable": "ctrl", "downstream_dataset": "digits", "poison_rate": 0.09},
    "clip_backdoor": {"trainable": "clip_backdoor", "encoder": _SMALL_CLIP, "poison_rate": 0.05, "eval_size": 500},
    "badclip": {"trainable": "badclip", "encoder": _SMALL_CLIP, "poison_rate": 0.01, "trigger_size": 8,
                "finetune_epochs": 2, "finetune_lr": 5e-4, "patch_steps": 100, "eval_size": 500},
}
DIGITS_DETECTORS = {
    "dede": {"patch_size": 2, "width": 64, "heads": 2, "encoder_depth": 2, "decoder_depth": 2, "epochs": 16,
             "batch_size": 32, "lr": 1e-3, "schedule": "cosine", "train_size": 2000, "train_poison_rate": 0.1},
    "asset": {},
    "decree": {"shadow_size": 200, "epochs": 15},
}
SETTINGS.update({("dede", "clip_backdoor"): {"patch_size": 4}, ("dede", "badclip"): {"patch_size": 4}})

SWEEP = Sweep(
    name="detector_comparison",
    description=__doc__,
    grid=comparison({v: v for v in VICTIMS}, {d: {} for d in DETECTORS}),
    objectives={"val_auc": "max"},
    selection=("val_auc", "max"),
    columns=("trainable", "victim", "tpr", "fpr", "auc", "tpr_1pct", "fpr_1pct", "auc_1pct", "val_auc",
             "clean_acc_before", "asr_before", "clean_acc", "asr", "decree_flagged", "decree_l1_fraction",
             "asset_epoch", "device_hours"),
    presets={
        "paper": {"fixed": {"test_size": 10000, "downstream_epochs": 100},
                  "grid": comparison(PAPER_VICTIMS, PAPER_DETECTORS)},
        "digits": {"fixed": {"test_size": 200, "downstream_epochs": 5, "downstream_size": 600},
                   "grid": comparison(DIGITS_VICTIMS, DIGITS_DETECTORS)},
    },
    smoke={"fixed": {"test_size": 200, "downstream_epochs": 3, "downstream_size": 500},
           "grid": comparison({"badencoder": DEDE.SMOKE_VICTIM}, SMOKE_DETECTORS)},
)

if __name__ == "__main__":
    main(SWEEP)
