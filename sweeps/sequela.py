"""Backdoor sequela (FTP §6, thesis §3.5; docs/methods.md §6): membership inference on every defended
model, and re-injection of the same backdoor into every defended model and into a clean model at
poison ratios down to 0.001 (paper: 0.1, 0.01, 0.001, 0.0001; `--preset paper`).

Each defended model is a cached stage, computed once and attacked by every trial that needs it.
"""

from secsweep.presets import paper_fixed, paper_grid
from secsweep.sweep import Sweep, grid, main, variants

DEFENSES = ["none", "ft", "sft", "fp", "nad", "nc", "abl", "ac", "spectral"]  # none = the backdoored model

SWEEP = Sweep(
    name="sequela",
    description=__doc__,
    fixed={"attack": "badnets", "dataset": "fashion_mnist", "model": "smallcnn", "train_size": 10000,
           "attack_epochs": 3, "epochs": 2, "reinject_epochs": 10},
    grid=variants(
        grid(trainable=["mia"], defense=DEFENSES),
        grid(trainable=["reinjection"], defense=["clean", *DEFENSES], reinject_ratio=[0.1, 0.01, 0.001]),
    ),
    columns=("trainable", "defense", "reinject_ratio", "auc", "accuracy", "mentr_auc", "epochs_to_asr90", "asr",
             "clean_acc", "device_hours"),
    presets={"paper": {  # FTP §4.4 recipe; every defended model at its defense's budget (secsweep.presets)
        "fixed": paper_fixed(attack="badnets", reinject_epochs=25),
        "grid": paper_grid(variants(
            grid(trainable=["mia"], defense=DEFENSES),
            grid(trainable=["reinjection"], defense=["clean", *DEFENSES], reinject_ratio=[0.1, 0.01, 0.001, 0.0001]),
        ), attack="badnets"),
    }},
    smoke={"fixed": {"train_size": 3000, "attack_epochs": 2, "epochs": 1, "reinject_epochs": 2},
           "grid": variants(grid(trainable=["mia"], defense=["sft"]),
                            grid(trainable=["reinjection"], defense=["sft", "clean"], reinject_ratio=[0.1]))},
)

if __name__ == "__main__":
    main(SWEEP)
