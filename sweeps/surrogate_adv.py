"""Adversarial examples from the stolen surrogate (docs/methods.md, "Model stealing"; T-Tab 4.4):
FGSM, BIM, PGD and DI-FGSM crafted on a Cont-Steal surrogate (with a linear head trained on the
downstream task, as the target's) and sent to the target, against the same attacks crafted on a
springboard encoder trained on other data. Each trial reports, per attack, the transfer rate (the
share of correctly classified test images the target misclassifies after the attack) from the
surrogate and from the springboard, and the white-box rate on the surrogate.

    python sweeps/surrogate_adv.py                    # offline default: 4 eps, 2 CPUs
    python sweeps/surrogate_adv.py --set surrogate=encoder_steal   # a conventionally stolen surrogate
    python sweeps/surrogate_adv.py --preset paper --download --gpus-per-trial 0.5

Offline default: the target is the stealing sweeps' SimCLR (6,000 Fashion-MNIST images, 3 epochs),
the surrogate a Cont-Steal of it with 2,000 Fashion-MNIST queries for 6 epochs (MNIST queries hardly
move the small surrogate), the springboard SimCLR on 4,000 MNIST digits for 3 epochs; heads on 2,000
Fashion-MNIST images, attacks on 1,000 test images, eps in pixel units of [0, 1].
"""

from secsweep.presets import PAPER_SSL
from secsweep.sweep import Sweep, grid, main
from trainables.stealing.cont_steal import PAPER_STEAL

EPS = [0.02, 0.05, 0.1, 0.2]
ATTACKS = ("fgsm", "bim", "pgd", "di_fgsm")

SWEEP = Sweep(
    name="surrogate_adv",
    description=__doc__,
    trainable="adv_transfer",
    fixed={},
    grid=grid(eps=EPS),
    objectives={"val_transfer": "max"},
    selection=("val_transfer", "max"),
    columns=("eps", "transfer", "springboard_transfer", *(f"transfer_{a}" for a in ATTACKS),
             *(f"springboard_transfer_{a}" for a in ATTACKS), "target_acc", "surrogate_acc", "springboard_acc",
             "device_hours"),
    presets={
        # a Cont-Steal ResNet-18 of the CIFAR-10 SimCLR (STL-10 queries); the springboard: the same
        # SimCLR recipe on SVHN (data neither the target nor the attacker used); eps 2..16 / 255
        "paper": {"fixed": {"surrogate": {"trainable": "cont_steal", **PAPER_STEAL},
                            "springboard": {"trainable": "simclr", **PAPER_SSL, "dataset": "svhn"},
                            "probe_train_size": 0, "probe_test_size": 0},
                  "grid": grid(eps=[2 / 255, 4 / 255, 8 / 255, 16 / 255])},
    },
    # < 1 min: 1-epoch SimCLRs on 1,000 images, a 1-epoch Cont-Steal on 500, 300 attacked images
    smoke={"fixed": {"surrogate": {"trainable": "cont_steal", "surrogate_dataset": "fashion_mnist",
                                   "surrogate_size": 500, "epochs": 1, "probe_train_size": 500, "probe_test_size": 300,
                                   "target": {"trainable": "simclr", "train_size": 1000, "epochs": 1,
                                              "monitor_size": 300}},
                     "springboard": {"trainable": "simclr", "dataset": "mnist", "train_size": 1000, "epochs": 1,
                                     "monitor_size": 300},
                     "steps": 3, "probe_train_size": 500, "probe_test_size": 300},
           "grid": grid(eps=[0.1])},
)

if __name__ == "__main__":
    main(SWEEP)
