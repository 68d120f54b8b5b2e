"""SFT ablation: clean-data fraction 0.1-1.0 x LR_MAX1 {0.1, 0.2, 0.3} against Blended (FTP §5.5,
thesis Fig. 3.9 and 3.12; docs/methods.md §5.11, "Ablations"). The paper: with 10 % of the data and
LR_MAX1 0.1 SFT fails on Blended (ASR 0.954), with 0.3 it succeeds; 20 % suffices at 0.1.
"""

from secsweep.presets import DEFENSE_BUDGETS, paper_fixed
from secsweep.sweep import Sweep, grid, main

FRACTIONS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]

SWEEP = Sweep(
    name="sft_ablation",
    description=__doc__,
    trainable="sft",
    fixed={"attack": "blended", "dataset": "fashion_mnist", "model": "smallcnn", "train_size": 20000,
           "attack_epochs": 3, "epochs": 2},
    grid=grid(lr_max1=[0.1, 0.2, 0.3], clean_fraction=FRACTIONS),
    columns=("attack", "lr_max1", "clean_fraction", "asr", "clean_acc", "device_hours"),
    presets={"paper": {"fixed": paper_fixed(attack="blended", **DEFENSE_BUDGETS["sft"])}},  # secsweep.presets
    smoke={"fixed": {"train_size": 3000, "attack_epochs": 2, "epochs": 1},
           "grid": grid(lr_max1=[0.1, 0.3], clean_fraction=[0.1])},
)

if __name__ == "__main__":
    main(SWEEP)
