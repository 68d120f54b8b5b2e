"""The transfer-based scenario: a classifier backdoored on a source dataset gets a new head and is
fine-tuned on a target dataset, by conventional fine-tuning or SFT (FTP §5.2, thesis Fig. 3.3;
docs/methods.md §2.2, §5.10). ASR uses the original trigger against the class the undefended transferred
model predicts most on triggered inputs (reported as transfer_target).

Offline default: Fashion-MNIST -> sklearn digits (upsampled to 28x28). Paper: CIFAR-100 -> CIFAR-10.
"""

from secsweep.presets import DEFENSE_BUDGETS, paper_fixed
from secsweep.sweep import Sweep, grid, main

SWEEP = Sweep(
    name="transfer",
    description=__doc__,
    trainable="transfer",
    fixed={"dataset": "fashion_mnist", "target_dataset": "digits", "model": "smallcnn", "train_size": 20000,
           "attack_epochs": 3, "epochs": 3, "batch_size": 64},
    grid=grid(attack=["badnets", "blended"], method=["sft", "ft"]),
    columns=("attack", "method", "transfer_target", "asr", "clean_acc", "device_hours"),
    # FTP: CIFAR-100 backdoored with the §4.4 recipe, fine-tuned 100 epochs on CIFAR-10 (secsweep.presets)
    presets={"paper": {"fixed": paper_fixed(dataset="cifar100", target_dataset="cifar10", epochs=100,
                                            **DEFENSE_BUDGETS["transfer"])}},
    smoke={"fixed": {"train_size": 3000, "attack_epochs": 2, "epochs": 1},
           "grid": grid(attack=["badnets"], method=["sft"])},
)

if __name__ == "__main__":
    main(SWEEP)
