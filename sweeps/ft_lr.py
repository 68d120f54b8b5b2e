"""Conventional fine-tuning's learning rate: 1e-4 ... 0.1 (FTP §5.5, thesis Fig. 3.11; docs/methods.md
§5.2). The paper: the pre-training learning rate keeps ASR high for 100 epochs, 0.001 forgets the
trigger gradually, 0.1 removes it within an epoch but costs clean accuracy. lr 0 = the pre-training
(attack) learning rate.
"""

from secsweep.presets import paper_fixed
from secsweep.sweep import Sweep, grid, main

SWEEP = Sweep(
    name="ft_lr",
    description=__doc__,
    trainable="ft",
    fixed={"dataset": "fashion_mnist", "model": "smallcnn", "train_size": 20000, "attack_epochs": 3, "epochs": 3},
    grid=grid(attack=["badnets", "blended"], lr=[0.0, 1e-4, 1e-3, 1e-2, 0.1]),
    columns=("attack", "lr", "asr", "clean_acc", "device_hours"),
    presets={"paper": {"fixed": paper_fixed(epochs=100)}},  # FTP Fig. 8: 100 epochs of FT (secsweep.presets)
    smoke={"fixed": {"train_size": 3000, "attack_epochs": 2, "epochs": 1},
           "grid": grid(attack=["badnets"], lr=[1e-3, 0.1])},
)

if __name__ == "__main__":
    main(SWEEP)
