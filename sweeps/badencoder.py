"""BadEncoder's knobs (Jia et al., S&P 2022; docs/methods.md, "BadEncoder"): the weights lambda1 (L1,
references) and lambda2 (L2, utility), the trigger size and the shadow-data size, each varied around
the default (lambda1 = lambda2 = 1) with the others fixed, and every backdoored encoder judged
downstream as the documents judge it: a downstream classifier trained on it (classifier-only
fine-tuning of an MLP head) gives ASR and the backdoored accuracy BA; the same classifier on the
clean encoder gives CA (the `encoder=simclr` row).

    python sweeps/badencoder.py                   # offline: SimCLR on Fashion-MNIST -> BadEncoder -> MNIST
    python sweeps/badencoder.py --preset paper --download --gpus-per-trial 0.5   # CIFAR-10 -> STL-10

Each trial is a `downstream` trial whose `encoder` is a BadEncoder stage: the grid's dotted keys
(`encoder.lambda1`) set the attack's fields, the clean SimCLR encoder is one cached stage shared by
every BadEncoder, and each backdoored encoder is trained once.
"""

from secsweep.presets import PAPER_VICTIM
from secsweep.sweep import Sweep, main

LAMBDA1 = [0.0, 0.5, 2.0]
LAMBDA2 = [0.0, 0.5, 2.0]
TRIGGER_SIZES = [4, 6, 14]         # pixels on 32x32 (default 10; scaled to the image)
SHADOW_SIZES = [500, 1000, 10000]  # shadow images from the pre-training set (default 5,000)


def one_at_a_time(values: dict[str, list]) -> list[dict]:
    """The default point and every value of each knob with the others at their defaults."""
    return [{}] + [{key: v} for key, vs in values.items() for v in vs]


KNOBS = {"encoder.lambda1": LAMBDA1, "encoder.lambda2": LAMBDA2, "encoder.trigger_size": TRIGGER_SIZES,
         "encoder.shadow_size": SHADOW_SIZES}
CLEAN = {"encoder": {"trainable": "simclr"}}  # CA: the same downstream classifier on the clean encoder

# FTP §4.4 / the slides' setting: SimCLR ResNet-18 on CIFAR-10 (batch 256, 1,000 epochs, lr 3e-4, Adam),
# BadEncoder with the public code's recipe (200 epochs, the CIFAR-10 training set as shadow data),
# downstream STL-10 with the public code's target class "truck" (9); MLP head 200 epochs at lr 3e-4.
PAPER_SIMCLR = {"trainable": "simclr", "dataset": "cifar10", "model": PAPER_VICTIM["model"], "train_size": 0,
                "epochs": 1000, "batch_size": 256, "optimizer": "adam", "lr": 3e-4}
PAPER_BADENCODER = {"trainable": "badencoder", "encoder": PAPER_SIMCLR, "downstream_dataset": "stl10",
                    "target_label": 9, "shadow_size": 0, "epochs": 200, "trigger_position": "bottom_right",
                    "lr": 0.001, "batch_size": 256, "n_reference": 3}
PAPER_KNOBS = {**KNOBS, "encoder.shadow_size": [5000, 10000, 25000]}

SWEEP = Sweep(
    name="badencoder",
    description=__doc__,
    trainable="downstream",
    fixed={"encoder": {"trainable": "badencoder"}, "dataset": "mnist", "finetune": "classifier"},
    grid=[*one_at_a_time(KNOBS), CLEAN],
    # the attacker's view: a backdoor that works downstream and an encoder that stays useful
    objectives={"val_asr": "max", "val_clean_acc": "max"},
    selection=("val_asr", "max"),
    columns=("trainable", *KNOBS, "has_trigger", "asr", "clean_acc", "val_asr", "val_clean_acc", "device_hours"),
    presets={
        "paper": {
            "fixed": {"encoder": PAPER_BADENCODER, "dataset": "stl10", "finetune": "classifier", "epochs": 200,
                      "head_norm": False},  # FTP's MLP head (no feature BatchNorm stated)
            "grid": [*one_at_a_time(PAPER_KNOBS), {"encoder": PAPER_SIMCLR}],
        },
    },
    # < 1 min: a 2-epoch SimCLR on 3,000 images, BadEncoder on 1,000 shadow images, two lambda1 values
    smoke={
        "fixed": {"encoder": {"trainable": "badencoder", "shadow_size": 1000, "epochs": 3,
                              "encoder": {"trainable": "simclr", "train_size": 3000, "epochs": 2}},
                  "epochs": 1},
        "grid": [{"encoder.lambda1": 1.0}, {"encoder.lambda1": 0.0}],
    },
)

if __name__ == "__main__":
    main(SWEEP)
