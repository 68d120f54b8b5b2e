"""Super-fine-tuning vs conventional fine-tuning against BadNets and Blended backdoors, swept over
LR_MAX1 x LR_MAX2 (FTP §3.2, §4.4, §5.3; docs/methods.md §5.2, §5.3, §5.11).

    python sweeps/sft_grid.py                       # offline default: Fashion-MNIST, small CNN, 2 CPUs
    python sweeps/sft_grid.py --preset paper --address auto --gpus-per-trial 0.25   # CIFAR-10, PreAct-ResNet18

Each backdoored model is trained once (a cached stage) and shared by all its defense trials.
"""

from secsweep.presets import PAPER_VICTIM, paper_fixed, paper_grid
from secsweep.sweep import Sweep, grid, main, variants

ATTACKS = ["badnets", "blended"]

# Each backdoored model's pre-training learning rate (SGD, 6 epochs, the offline default). Blended
# trains at the paper's (FTP §4.4: 0.001), so SFT's LR_MAX1 = 0.1 is, as in the paper, 100x the rate
# the backdoor was learnt at, and conventional FT at the pre-training rate is the small step the
# paper contrasts SFT with. BadNets' small patch (2x2 pixels here) does not take at 0.001 in 6
# epochs (ASR 0.25; 0.82 at 0.003), so it trains at 0.01. FT's "pre-training learning rate" is each
# victim's own attack_lr.
VICTIMS = {
    "badnets": {"attack_lr": 0.01},
    "blended": {"attack_lr": PAPER_VICTIM["attack_lr"]},  # 0.001
}


def per_victim(trials: list[dict]) -> list[dict]:
    """Each trial with its attack's pre-training learning rate (VICTIMS)."""
    return [{**VICTIMS[t["attack"]], **t} for t in trials]


SWEEP = Sweep(
    name="sft_grid",
    description=__doc__,
    # SFT's learning rates are the SFTSchedule defaults (FTP §4.4: LR_BASE 3e-4, LR_MAX1 0.1, LR_MAX2
    # 0.001) except where the grid varies them; phase 1 = 1 epoch of the 2, quarter-epoch ramps.
    fixed={"dataset": "fashion_mnist", "model": "smallcnn", "train_size": 20000, "attack_epochs": 6, "epochs": 2},
    grid=per_victim(variants(
        grid(trainable=["sft"], attack=ATTACKS, lr_max1=[0.05, 0.1, 0.2], lr_max2=[0.001, 0.01]),
        grid(trainable=["ft"], attack=ATTACKS),  # conventional fine-tuning at the pre-training learning rate
    )),
    columns=("trainable", "attack", "attack_lr", "lr_max1", "lr_max2", "asr", "clean_acc", "device_hours"),
    presets={
        # FTP §4.4: PreAct-ResNet18 on CIFAR-10, backdoor training SGD lr 0.001, batch 256, 200 epochs;
        # SFT LR_BASE 3e-4, LR_MAX1 0.1, LR_MAX2 0.001, phase 1 = 10 epochs, 500-step ramps (secsweep.presets).
        "paper": {
            "fixed": paper_fixed(),
            "grid": paper_grid(variants(
                grid(trainable=["sft"], attack=ATTACKS, lr_max1=[0.1, 0.2, 0.3], lr_max2=[0.001, 0.005]),
                grid(trainable=["ft"], attack=ATTACKS),
            )),
        },
    },
    # Blended at batch 32: the one backdoor that implants (val ASR ~0.97) on 3,000 images in 2 epochs
    smoke={
        "fixed": {"train_size": 3000, "attack_epochs": 2, "attack_batch_size": 32, "epochs": 1},
        "grid": variants(grid(trainable=["sft"], attack=["blended"], lr_max1=[0.1], lr_max2=[0.001]),
                         grid(trainable=["ft"], attack=["blended"])),
    },
)

if __name__ == "__main__":
    main(SWEEP)
