"""A tiny sweep for tests: the BadNets attack trainable on sklearn digits, a grid over poison ratio.

`--set dataset=cifar10 --data-root DIR` with a corrupt CIFAR folder in the grid makes one trial fail.
"""

from secsweep.sweep import Sweep, grid, main

SWEEP = Sweep(
    name="tiny_sweep",
    trainable="badnets",
    fixed={"dataset": "digits", "model": "smallcnn", "attack_epochs": 6, "attack_batch_size": 64},
    grid=grid(poison_ratio=[0.1, 0.2, 0.3]),
    columns=("poison_ratio", "asr", "clean_acc"),
    smoke={"grid": grid(poison_ratio=[0.1, 0.2])},
)

if __name__ == "__main__":
    main(SWEEP)
