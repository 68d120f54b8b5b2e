"""A tiny sweep for tests: the BadNets attack trainable on sklearn digits, a grid over poison ratio.

`--set dataset=cifar10 --data-root DIR` with a corrupt CIFAR folder in the grid makes one trial fail.
`--preset uneven` has trials of 10 and 5 (slow) epochs (tests/test_sweeps.py's crash-and-resume test).
"""

from secsweep.sweep import Sweep, grid, main

SWEEP = Sweep(
    name="tiny_sweep",
    trainable="badnets",
    fixed={"dataset": "digits", "model": "smallcnn", "attack_epochs": 6, "attack_batch_size": 64},
    grid=grid(poison_ratio=[0.1, 0.2, 0.3]),
    columns=("poison_ratio", "asr", "clean_acc"),
    smoke={"grid": grid(poison_ratio=[0.1, 0.2])},
    # crash/resume test: two trials at a time, a short one and slow ones (batches of 2: seconds an
    # epoch), so when the short one finishes another is mid-way and Tune's next snapshot, which waits
    # for that one's next checkpoints, is seconds away
    presets={"uneven": {"grid": [{"poison_ratio": 0.1, "attack_epochs": 10},
                                 {"poison_ratio": 0.2, "attack_epochs": 5, "attack_batch_size": 2},
                                 {"poison_ratio": 0.3, "attack_epochs": 5, "attack_batch_size": 2}]}},
)

if __name__ == "__main__":
    main(SWEEP)
