"""Every defense against every attack in the standalone scenario (FTP §5.3-§5.4, thesis Fig. 3.5-3.8;
docs/methods.md §5, §5.11): ASR, clean accuracy, device-hours and DER per (defense, attack). Each
backdoored model is trained once (a cached stage) and shared by all its defenses.

    python sweeps/defense_comparison.py            # Fashion-MNIST, small CNN, CPU
    secsweep report defense_comparison             # table, scatter, cost and DER from MLflow
"""

from secsweep.presets import paper_fixed, paper_grid
from secsweep.sweep import Sweep, grid, main

ATTACKS = ["badnets", "blended", "lf", "inputaware", "wanet"]
DEFENSES = ["ft", "sft", "fp", "nad", "nc", "abl", "ac", "spectral"]

SWEEP = Sweep(
    name="defense_comparison",
    description=__doc__,
    # 10k images, 6 attack epochs: every backdoor implants (ASR >= 0.9 for BadNets/Blended) within ~20 min on 2 CPUs
    fixed={"dataset": "fashion_mnist", "model": "smallcnn", "train_size": 10000, "attack_epochs": 6, "epochs": 2},
    grid=grid(trainable=DEFENSES, attack=ATTACKS),
    columns=("trainable", "attack", "asr", "clean_acc", "device_hours", "der", "auc"),
    # FTP §4.4 recipe, each defense at its original budget (secsweep.presets; docs/paper_preset.md)
    presets={"paper": {"fixed": paper_fixed(), "grid": paper_grid(grid(trainable=DEFENSES, attack=ATTACKS))}},
    smoke={"fixed": {"train_size": 2000, "attack_epochs": 1, "epochs": 1},
           "grid": grid(trainable=["sft", "spectral"], attack=["badnets"])},
)

if __name__ == "__main__":
    main(SWEEP)
