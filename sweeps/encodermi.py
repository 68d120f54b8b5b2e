"""EncoderMI: membership inference against pre-trained encoders over the target's over-fitting
level (pre-training epochs) x its member-set size (docs/methods.md, EncoderMI).

    python sweeps/encodermi.py                      # offline default: real MNIST at 14 px, smallcnn, 2 CPUs
    python sweeps/encodermi.py --preset paper --download --address auto --gpus-per-trial 0.5

Every trial evaluates all three inference classifiers (vector, set, threshold) on one target /
shadow pair; the shadow encoder mirrors the target's recipe (epochs, member-set size) on another
seeded subset, as the paper's attacker, who knows the target's training recipe, would train it. Both
encoders are cached stages, so `--set members=unseen` (the negative control: every classifier at
chance) reuses them. Columns: accuracy and AUC of each classifier on the test half of the balanced
member / non-member set; the sweep selects on the validation half.
"""

from secsweep.presets import PAPER_SSL
from secsweep.sweep import Sweep, main

EPOCHS = [100, 400, 800]        # the target's pre-training epochs: the over-fitting level
SIZES = [142, 562]              # the target's train_size (10 % of it is held out: ~128 / ~506 members)


def pairs(epochs, sizes, **extra):
    """One trial per (epochs, train_size), the shadow encoder mirroring the target's recipe."""
    return [{"target.epochs": e, "shadow.epochs": e, "target.train_size": n, "shadow.train_size": n, **extra}
            for e in epochs for n in sizes]


METRICS = ("vector_acc", "vector_auc", "set_acc", "set_auc", "threshold_acc", "threshold_auc")
# the talk's setting (CIFAR-10 target pre-trained with MoCo, the shadow with SimCLR on STL-10;
# vector / set / threshold accuracy 86.2 / 78.1 / 82.1 %); member-set sizes and the number of
# queried samples are not in the slides (platform choice: 1,000 members and non-members per encoder)
PAPER_TARGET = {"trainable": "moco", **PAPER_SSL}
PAPER_SHADOW = {"trainable": "simclr", **PAPER_SSL, "dataset": "stl10", "image_size": 32, "monitor_size": 1000}

SWEEP = Sweep(
    name="encodermi",
    description=__doc__,
    trainable="encodermi",
    fixed={},
    grid=pairs(EPOCHS, SIZES),
    objectives={"val_vector_auc": "max", "val_threshold_auc": "max"},
    selection=("val_threshold_auc", "max"),
    columns=("trainable", "target.epochs", "target.train_size", *METRICS, "member_similarity",
             "nonmember_similarity", "device_hours"),
    presets={
        "paper": {
            "fixed": {"target": PAPER_TARGET, "shadow": PAPER_SHADOW, "n_samples": 1000},
            "grid": [{"target.epochs": e, "shadow.epochs": e} for e in (200, 1000)],
        },
    },
    # two tiny encoders on sklearn digits (2 epochs each): seconds, checks the wiring only
    smoke={
        "fixed": {"target": {"trainable": "simclr", "dataset": "digits", "train_size": 300, "epochs": 2,
                             "batch_size": 64, "monitor_size": 100},
                  "shadow": {"trainable": "simclr", "dataset": "digits", "train_size": 300, "epochs": 2,
                             "batch_size": 64, "monitor_size": 100, "seed": 1},
                  "n_samples": 40},
        "grid": [{"target.epochs": 2, "shadow.epochs": 2}],
    },
)

if __name__ == "__main__":
    main(SWEEP)
