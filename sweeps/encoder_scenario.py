"""The encoder-based scenario of the fine-tuning paper (FTP §5.1, thesis §3.4.1; docs/methods.md,
"The encoder-based scenario"): a downstream user trains a classifier on a BadEncoder-backdoored
encoder by classifier-only fine-tuning (the backdoor stays: paper ASR 0.998), by whole-model
fine-tuning (paper: ASR 0.127 after one epoch, ~0.004 GPU-hours) or by whole-model super-fine-tuning
(SFT's cyclic learning rate); ASR, clean accuracy and device-hours per epoch (MLflow, epoch = step),
and the same classifier on the clean encoder for CA.

    python sweeps/encoder_scenario.py                 # offline: SimCLR on Fashion-MNIST -> BadEncoder -> MNIST
    python sweeps/encoder_scenario.py --preset paper --download --gpus-per-trial 0.5   # CIFAR-10 -> STL-10

The clean encoder and the backdoored encoder are cached stages, trained once for all trials.
"""

from secsweep.presets import PAPER_VICTIM
from secsweep.sweep import Sweep, main

# the three ways the downstream user trains (FTP: classifier-only FT, whole-model FT; SFT alongside:
# whole-model with SFT's schedule, SGD, LR_MAX1 0.1, as the sft defense), and CA on the clean encoder
WAYS = [
    {"finetune": "classifier"},
    {"finetune": "whole"},
    {"finetune": "whole", "schedule": "sft", "optimizer": "sgd"},
]
CLEAN = {"encoder": {"trainable": "simclr"}, "finetune": "classifier"}  # CA: the same head on the clean encoder

# FTP §4.4: the encoder is ResNet-18 trained by SimCLR on CIFAR-10 (batch 256, 1,000 epochs, lr 3e-4,
# Adam), backdoored with BadEncoder's public code (its SGD recipe, 200 epochs, the whole CIFAR-10
# training set as shadow data; target "truck" = STL-10 class 9, the public code's STL-10 reference
# class); the downstream MLP trains 200 epochs at lr 3e-4. Images are resized to the encoder's 32x32.
PAPER_SIMCLR = {"trainable": "simclr", "dataset": "cifar10", "model": PAPER_VICTIM["model"], "train_size": 0,
                "epochs": 1000, "batch_size": 256, "optimizer": "adam", "lr": 3e-4}
PAPER_BADENCODER = {"trainable": "badencoder", "encoder": PAPER_SIMCLR, "downstream_dataset": "stl10",
                    "target_label": 9, "shadow_size": 0, "epochs": 200, "trigger_position": "bottom_right",
                    "lr": 0.001, "batch_size": 256, "n_reference": 3}

SWEEP = Sweep(
    name="encoder_scenario",
    description=__doc__,
    trainable="downstream",
    fixed={"encoder": {"trainable": "badencoder"}, "dataset": "mnist", "epochs": 5},
    grid=[*WAYS, CLEAN],
    # the defender's (downstream user's) view: remove the backdoor, keep the accuracy
    objectives={"val_asr": "min", "val_clean_acc": "max"},
    selection=("val_clean_acc", "max"),
    columns=("trainable", "finetune", "schedule", "has_trigger", "asr", "clean_acc", "val_asr", "val_clean_acc",
             "device_hours"),
    presets={
        "paper": {
            "fixed": {"encoder": PAPER_BADENCODER, "dataset": "stl10", "epochs": 200, "lr": 3e-4,
                      "head_norm": False},  # FTP's MLP head (no feature BatchNorm stated)
            "grid": [*WAYS, {**CLEAN, "encoder": PAPER_SIMCLR}],
        },
    },
    # < 1 min: a 2-epoch SimCLR on 3,000 images, a 3-epoch BadEncoder on 1,500 shadow images, 1 epoch each
    smoke={
        "fixed": {"encoder": {"trainable": "badencoder", "shadow_size": 1500, "epochs": 3,
                              "encoder": {"trainable": "simclr", "train_size": 3000, "epochs": 2}},
                  "epochs": 1},
        "grid": WAYS[:2],
    },
)

if __name__ == "__main__":
    main(SWEEP)
