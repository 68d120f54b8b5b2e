"""Optuna search over super-fine-tuning's learning rates and clean-data fraction, as a two-objective
problem: validation attack success rate minimised, validation clean accuracy maximised (NSGA-II through Ray Tune's
OptunaSearch). The results table marks the Pareto front. `--asha` adds ASHA early stopping on validation DER (which a collapsed model cannot win).

    python sweeps/sft_search.py                  # 12 trials, BadNets on Fashion-MNIST, 2 CPUs
    python sweeps/sft_search.py --num-samples 64 --preset paper --address auto --gpus-per-trial 0.5
"""

from ray import tune

from secsweep.presets import DEFENSE_BUDGETS, paper_fixed
from secsweep.sweep import Sweep, main

SWEEP = Sweep(
    name="sft_search",
    description=__doc__,
    trainable="sft",
    fixed={"attack": "badnets", "dataset": "fashion_mnist", "model": "smallcnn", "train_size": 20000,
           "attack_epochs": 3, "epochs": 2},
    # ranges keep LR_BASE <= LR_MAX2 < LR_MAX1 at every corner (checked before launch)
    space={
        "lr_base": tune.loguniform(1e-4, 1e-3),      # FTP: 3e-4
        "lr_max1": tune.loguniform(0.03, 0.3),       # FTP: 0.1 (0.3 with 10 % data)
        "lr_max2": tune.loguniform(1e-3, 0.02),      # FTP: 0.001
        "clean_fraction": tune.uniform(0.1, 1.0),    # FTP ablation: 0.1 .. 1.0
    },
    objectives={"val_asr": "min", "val_clean_acc": "max"},  # selected on validation; tables report test
    num_samples=12,
    columns=("lr_base", "lr_max1", "lr_max2", "clean_fraction", "asr", "clean_acc", "device_hours"),
    presets={
        "paper": {
            "fixed": paper_fixed(attack="badnets", **DEFENSE_BUDGETS["sft"]),  # secsweep.presets
            "num_samples": 64,
        },
    },
    # Blended at batch 32: the one backdoor that implants (val ASR ~0.97) on 3,000 images in 2 epochs
    smoke={"fixed": {"attack": "blended", "train_size": 3000, "attack_epochs": 2, "attack_batch_size": 32, "epochs": 1},
           "num_samples": 2},
)

if __name__ == "__main__":
    main(SWEEP)
