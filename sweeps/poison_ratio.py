"""Attack strength vs poison ratio: every backdoor attack trained at poison ratios 0.5 %-20 %
(docs/methods.md §4.1: the paper uses 0.1 throughout; §6.2 re-injects at 0.1 .. 0.0001).
"""

from secsweep.presets import PAPER_VICTIM, paper_grid
from secsweep.sweep import Sweep, grid, main

ATTACKS = ["badnets", "blended", "wanet", "inputaware", "lf"]
RATIOS = [0.005, 0.01, 0.05, 0.1, 0.2]

SWEEP = Sweep(
    name="poison_ratio",
    description=__doc__,
    fixed={"dataset": "fashion_mnist", "model": "smallcnn", "train_size": 20000, "attack_epochs": 3},
    grid=grid(trainable=ATTACKS, poison_ratio=RATIOS),
    columns=("trainable", "poison_ratio", "asr", "clean_acc", "device_hours"),
    # the FTP §4.4 victim recipe; Input-Aware with its 25 mask pre-training epochs (secsweep.presets)
    presets={"paper": {"fixed": dict(PAPER_VICTIM), "grid": paper_grid(grid(trainable=ATTACKS, poison_ratio=RATIOS))}},
    smoke={"fixed": {"train_size": 3000, "attack_epochs": 1}, "grid": grid(trainable=["badnets"], poison_ratio=[0.1])},
)

if __name__ == "__main__":
    main(SWEEP)
