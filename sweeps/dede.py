"""DeDe's knobs (docs/methods.md, "DeDe"): training mask ratio x patch size x threshold rule x
in-distribution / out-of-distribution training data, on the BadEncoder victim; each trial trains one
DeDe decoder on the frozen victim and reports TPR / FPR / AUC on balanced (50 % triggered) and
unbalanced (1 %) test sets and the downstream-defense protocol (CA, ASR with detected inputs counted
as failed attacks, beside the undefended classifier's).

    python sweeps/dede.py                       # offline: Fashion-MNIST SimCLR -> BadEncoder -> MNIST, 16 trials
    python sweeps/dede.py --preset search       # Optuna over the two mask ratios for validation AUC
    python sweeps/dede.py --preset paper --download --gpus-per-trial 0.5   # ResNet-18 victims on CIFAR-10

The victim (a cached stage) is trained once for all trials. Selection is on `val_auc` (the
downstream validation hold-out); the tables report the test split.
"""

from ray import tune

from secsweep.presets import PAPER_VICTIM
from secsweep.sweep import Sweep, main


def grid(*points: list[dict], **axes: list) -> list[dict]:
    """Every combination of the axes' values and of the given lists of points."""
    out = [{}]
    for key, values in axes.items():
        out = [{**p, key: v} for p in out for v in values]
    for alternatives in points:
        out = [{**p, **q} for p in out for q in alternatives]
    return out


MASK_RATIOS = [0.75, 0.9]          # training ratio (public code: 0.9, CTRL 0.75); test ratio 0.99
PATCH_SIZES = [4, 7]               # pixels; they must divide the victim's 28x28 input (DD: 4 to 32)
THRESHOLDS = ["train_mean", "median"]  # DD §4.3's average training loss; the public script's test median
# the victim's pre-training images (1 % stamped, the public code's), or another offline dataset (OoD,
# unpoisoned: public data carry no trigger)
TRAIN_DATA = [{"train_data": "id"}, {"train_data": "digits", "train_poison_rate": 0.0}]

# the documents' setting: SimCLR ResNet-18 on CIFAR-10 (sweeps/badencoder.py's recipe), BadEncoder with
# the public code's recipe on the CIFAR-10 training set as shadow data, each downstream task of DD §5.1
PAPER_SIMCLR = {"trainable": "simclr", "dataset": "cifar10", "model": PAPER_VICTIM["model"], "train_size": 0,
                "epochs": 1000, "batch_size": 256, "optimizer": "adam", "lr": 3e-4}
PAPER_BADENCODER = {"trainable": "badencoder", "encoder": PAPER_SIMCLR, "shadow_size": 0, "epochs": 200,
                    "trigger_position": "bottom_right", "lr": 0.001, "batch_size": 256, "n_reference": 3}
# downstream tasks (DD-Tab 2, 4, 5) with their target classes (a choice: truck, priority road, digit one)
PAPER_DOWNSTREAM = [("cifar10", 9), ("gtsrb", 12), ("svhn", 1)]
PAPER_DEDE = {"mask_ratio_train": 0.9, "mask_ratio_test": 0.99, "patch_size": 4, "width": 192, "heads": 3,
              "encoder_depth": 6, "decoder_depth": 4, "epochs": 200, "batch_size": 256, "lr": 1e-3,
              "weight_decay": 1e-6, "train_size": 50000, "test_size": 10000, "downstream_epochs": 100}

# < 1 min: a one-epoch SimCLR on 300 digits, a one-epoch BadEncoder on 200 of them, one-epoch DeDe
SMOKE_VICTIM = {"trainable": "badencoder", "downstream_dataset": "digits", "shadow_size": 200, "epochs": 1,
                "batch_size": 64, "monitor_size": 100,
                "encoder": {"trainable": "simclr", "dataset": "digits", "train_size": 300, "epochs": 1,
                            "batch_size": 64, "monitor_size": 100}}

SWEEP = Sweep(
    name="dede",
    description=__doc__,
    trainable="dede",
    fixed={"victim": {"trainable": "badencoder"}},
    grid=grid(TRAIN_DATA, mask_ratio_train=MASK_RATIOS, patch_size=PATCH_SIZES, threshold=THRESHOLDS),
    objectives={"val_auc": "max"},
    selection=("val_auc", "max"),
    columns=("mask_ratio_train", "mask_ratio_test", "patch_size", "threshold", "train_data", "tpr", "fpr", "auc",
             "tpr_1pct", "fpr_1pct", "auc_1pct", "val_auc", "clean_acc_before", "asr_before", "clean_acc", "asr",
             "device_hours"),
    presets={
        # Optuna over the mask ratios (ranges keep the test ratio above the training ratio at every corner)
        "search": {"grid": None, "num_samples": 12,
                   "space": {"mask_ratio_train": tune.uniform(0.5, 0.95), "mask_ratio_test": tune.uniform(0.96, 1.0)}},
        "paper": {
            "fixed": {**PAPER_DEDE, "train_poison_rate": 0.01},  # the public code's slightly poisoned ID data
            "grid": [{"victim": {**PAPER_BADENCODER, "downstream_dataset": ds, "target_label": t}, **point}
                     for ds, t in PAPER_DOWNSTREAM
                     for point in ({"train_data": "id"}, {"train_data": "stl10", "train_poison_rate": 0.0})],
        },
    },
    smoke={"fixed": {"victim": SMOKE_VICTIM, "patch_size": 2, "width": 32, "heads": 2, "encoder_depth": 1,
                     "decoder_depth": 1, "epochs": 1, "train_size": 300, "test_size": 200, "downstream_epochs": 3},
           "grid": [{"mask_ratio_train": 0.75}, {"mask_ratio_train": 0.9, "threshold": "median"}]},
)

if __name__ == "__main__":
    main(SWEEP)
