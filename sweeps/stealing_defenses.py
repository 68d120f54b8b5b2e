"""The owner's output defenses against Cont-Steal (docs/methods.md, "Model stealing"; T-Fig 4.23):
Gaussian noise of level sigma 0 .. 10 on every answer, top-k (keep the k largest embedding entries),
rounding to d digits. Each trial reports the target's utility (`target_acc`: a linear head trained
and tested on the defended embeddings a legitimate user receives) against the stolen surrogate's
(`steal_acc`) and their agreement; a defense is good when the first stays and the second falls.

    python sweeps/stealing_defenses.py                  # offline default: 13 trials, 2 CPUs
    python sweeps/stealing_defenses.py --set trainable=encoder_steal   # against conventional stealing
    python sweeps/stealing_defenses.py --preset paper --download --gpus-per-trial 0.5

Offline default as sweeps/cont_steal.py (SimCLR on Fashion-MNIST, MNIST surrogate data, tau 0.5,
6 epochs). Noise sigma is in the embedding's own units (the small CNN's post-ReLU pooled features
are of order 0.1 - 1 per entry; the thesis's ResNet-18 embeddings are of a similar order).
"""

from secsweep.presets import PAPER_SSL  # noqa: F401  (the paper target's recipe, through PAPER_STEAL)
from secsweep.sweep import Sweep, grid, main, variants
from trainables.stealing.cont_steal import PAPER_STEAL

NOISE = [0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0]      # T-Fig 4.23's noise levels span 0 .. 10
TOP_K = [1, 4, 16]                               # of the default target's 64 embedding entries
DIGITS = [0, 1, 2]


SWEEP = Sweep(
    name="stealing_defenses",
    description=__doc__,
    trainable="cont_steal",
    fixed={"surrogate_dataset": "mnist", "surrogate_size": 2000, "epochs": 6, "temperature": 0.5},
    grid=variants(grid(noise_sigma=NOISE), grid(top_k=TOP_K), grid(round_digits=DIGITS)),
    objectives={"val_target_acc": "max", "val_steal_acc": "min"},  # the owner's view
    selection=("val_target_acc", "max"),
    columns=("trainable", "noise_sigma", "top_k", "round_digits", "target_acc", "steal_acc", "agreement",
             "device_hours"),
    presets={"paper": {"fixed": PAPER_STEAL}},
    smoke={"fixed": {"target": {"trainable": "simclr", "train_size": 1000, "epochs": 1, "monitor_size": 300},
                     "surrogate_size": 500, "epochs": 1, "probe_train_size": 500, "probe_test_size": 300},
           "grid": grid(noise_sigma=[0.0, 10.0])},
)

if __name__ == "__main__":
    main(SWEEP)
