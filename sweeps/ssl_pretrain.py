"""Self-supervised pre-training: SimCLR, MoCo v2, BYOL and SimSiam over temperature x batch size,
kNN and linear-probe accuracy against device-hours (docs/methods.md, "Self-supervised encoders").

    python sweeps/ssl_pretrain.py                   # offline default: Fashion-MNIST, small CNN, 2 CPUs
    python sweeps/ssl_pretrain.py --preset paper --download --address auto --gpus-per-trial 0.5

The temperature dimension applies to the contrastive methods only (SimCLR's NT-Xent, MoCo's
InfoNCE); BYOL and SimSiam have none. Every trial's encoder is a cached stage (artifact `encoder`)
that the downstream sweeps can name (`--set encoder=byol`).
"""

from secsweep.presets import PAPER_SSL
from secsweep.sweep import Sweep, grid, main, variants

CONTRASTIVE = ["simclr", "moco"]
NON_CONTRASTIVE = ["byol", "simsiam"]

SWEEP = Sweep(
    name="ssl_pretrain",
    description=__doc__,
    # 6,000 images x 3 epochs: one trial ~1 CPU-minute, the 10-trial grid ~6 min on 2 CPUs
    # (docs/methods.md gives the 10,000 x 5 epoch figures of each method's defaults)
    fixed={"dataset": "fashion_mnist", "model": "smallcnn", "train_size": 6000, "epochs": 3},
    grid=variants(
        grid(trainable=CONTRASTIVE, temperature=[0.1, 0.5], batch_size=[128, 256]),
        grid(trainable=NON_CONTRASTIVE, batch_size=[256]),
    ),
    objectives={"val_linear_acc": "max"},
    selection=("val_knn_acc", "max"),  # the per-epoch monitor: ASHA can stop on it (the probe runs last)
    columns=("trainable", "temperature", "batch_size", "knn_acc", "linear_acc", "device_hours"),
    presets={
        # lightly's CIFAR-10 benchmark (ResNet-18, 200 epochs, batch 512, SGD): its kNN accuracies
        # are the anchors docs/methods.md compares with (SimCLR 0.847, BYOL 0.869, MoCo 0.838,
        # SimSiam 0.819); secsweep.presets.PAPER_SSL
        "paper": {
            "fixed": dict(PAPER_SSL),
            "grid": variants(
                grid(trainable=CONTRASTIVE, temperature=[0.1, 0.2, 0.5], batch_size=[256, 512]),
                grid(trainable=NON_CONTRASTIVE, batch_size=[256, 512]),
            ),
        },
    },
    smoke={
        "fixed": {"train_size": 1000, "epochs": 1, "monitor_size": 500},
        "grid": variants(grid(trainable=["simclr"], temperature=[0.5]), grid(trainable=["byol"])),
    },
)

if __name__ == "__main__":
    main(SWEEP)
