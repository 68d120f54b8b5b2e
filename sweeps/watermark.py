"""Ownership watermark against Cont-Steal (docs/methods.md, "Model stealing"; T-Tab 4.5): the owner
watermarks its SimCLR encoder with BadEncoder (a trigger and one reference input of a target class
of the downstream task); the attacker steals it with Cont-Steal; the watermark rate (wr: the
fraction of triggered test images of the other classes a linear head on the encoder assigns to the
target class) and the clean accuracy of that head are reported for the watermarked target, the
Cont-Steal surrogate and the clean encoder BadEncoder started from (the baseline).

    python sweeps/watermark.py                     # offline default: 2 trials, 2 CPUs
    python sweeps/watermark.py --set steal_epochs=20
    python sweeps/watermark.py --preset paper --download --gpus-per-trial 0.5

Offline default: SimCLR on 3,000 Fashion-MNIST images for 3 epochs; BadEncoder with the recipe that
implants at this scale (docs/methods.md, "BadEncoder": the corner trigger, one reference input, SGD
lr 0.05 at batch 64 on 2,000 shadow images for 25 epochs; its own probe ASR ~0.7), MNIST downstream,
target class 0; Cont-Steal with 2,000 surrogate images for 10 epochs. The two trials are the
thesis's strong adversary (surrogate data = the downstream data, MNIST) and an attacker querying
with the target's pre-training distribution (Fashion-MNIST); both share the watermarked target.
"""

from secsweep.presets import PAPER_SSL
from secsweep.sweep import Sweep, grid, main

SIMCLR = {"trainable": "simclr", "train_size": 3000, "epochs": 3, "monitor_size": 500, "batch_size": 128}
# BadEncoder's fields given explicitly: the recipe measured to implant at this scale (not its defaults)
IMPLANTING = {"trigger_position": "bottom_right", "optimizer": "sgd", "lr": 0.05, "batch_size": 64, "epochs": 25,
              "n_reference": 1, "shadow_size": 2000}
WATERMARKED = {"trainable": "badencoder", "encoder": SIMCLR, "downstream_dataset": "mnist", "target_label": 0,
               **IMPLANTING}
# the thesis: a CIFAR-10 SimCLR ResNet-18 watermarked for a Fashion-MNIST downstream task, Cont-Steal
# on the downstream data (strong adversary), 100 epochs; BadEncoder with the public code's recipe
PAPER_WATERMARKED = {"trainable": "badencoder", "encoder": {"trainable": "simclr", **PAPER_SSL},
                     "downstream_dataset": "fashion_mnist", "shadow_size": 0, "epochs": 200,
                     "trigger_position": "bottom_right", "optimizer": "sgd", "lr": 0.001, "batch_size": 256}

SWEEP = Sweep(
    name="watermark",
    description=__doc__,
    trainable="watermark",
    fixed={"target": WATERMARKED, "steal_size": 2000, "steal_epochs": 10},
    grid=grid(steal_dataset=["mnist", "fashion_mnist"]),
    objectives={"val_surrogate_wr": "max"},   # the owner's view: does the watermark survive stealing?
    selection=("val_surrogate_wr", "max"),
    columns=("steal_dataset", "target_wr", "surrogate_wr", "baseline_wr", "target_acc", "surrogate_acc",
             "baseline_acc", "device_hours"),
    presets={"paper": {"fixed": {"target": PAPER_WATERMARKED, "steal_size": 0, "steal_epochs": 100,
                                 "probe_train_size": 0, "probe_test_size": 0},
                       "grid": grid(steal_dataset=["fashion_mnist"])}},
    # < 1 min: a 1-epoch SimCLR, a 2-epoch BadEncoder on 300 shadow images, a 1-epoch Cont-Steal
    smoke={"fixed": {"target": {"trainable": "badencoder", "downstream_dataset": "mnist", **IMPLANTING,
                                "epochs": 2, "shadow_size": 300, "monitor_size": 200,
                                "encoder": {"trainable": "simclr", "train_size": 1000, "epochs": 1,
                                            "monitor_size": 300}},
                     "steal_size": 300, "steal_epochs": 1, "steal_batch_size": 64,
                     "probe_train_size": 500, "probe_test_size": 300},
           "grid": grid(steal_dataset=["mnist"])},
)

if __name__ == "__main__":
    main(SWEEP)
