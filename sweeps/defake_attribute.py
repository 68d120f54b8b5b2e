"""DE-FAKE attribution (thesis T§5.4; docs/methods.md "DE-FAKE"): which source made an image (real or
one of the generators), image-only vs hybrid attributor x held-out generator, with the
unseen-generator threshold swept inside every trial that holds one out.

    python sweeps/defake_attribute.py --smoke-test   # tiny digits corpus, 1 trial
    python sweeps/defake_attribute.py                # offline default: Fashion-MNIST, DDPM / cGAN / cVAE fakes
    python sweeps/defake_attribute.py --preset paper --download --set corpus.captions=/path/to/coco \
        --address auto --gpus-per-trial 0.5

Threshold: an attribution trial with a held-out generator evaluates the rule "max softmax < t ->
unseen" at t = 0, 0.1, ..., 1.0 on validation and test (open_acc_t000 ... open_acc_t100, every
epoch), picks t on validation (`threshold`) and reports the test accuracy at it (`open_acc`; the
thesis picks 0.9). One training serves every threshold, so t is a reported dimension, not a grid
one (a grid over t would retrain the same attributor eleven times). Corpus, detectors and paper
preset as in sweeps/defake_detect.py.
"""

from secsweep.presets import paper_defake_fixed, paper_defake_grid
from secsweep.sweep import Sweep, grid, main
from trainables.defake import (DETECTORS, DIGITS_CORPUS, HELD_OUT, SMOKE_CORPUS, SMOKE_HYBRID_CLIP,
                               digits_detectors, t2i)

SWEEP = Sweep(
    name="defake_attribute",
    description=__doc__,
    fixed={"task": "attribute"},
    grid=grid(trainable=DETECTORS, held_out=HELD_OUT),
    objectives={"val_acc": "max"},
    selection=("val_acc", "max"),
    columns=("trainable", "held_out", "acc", "open_acc", "threshold", "device_hours"),
    presets={
        # the tests' corpus and detector settings (trainables.defake.DIGITS_*): the README's small-scale table
        "digits": {"fixed": {"corpus": DIGITS_CORPUS, "task": "attribute"},
                   "grid": digits_detectors(held_out=HELD_OUT)},
        "paper": {"fixed": {**paper_defake_fixed(), "task": "attribute"},
                       "grid": paper_defake_grid(held_out=list(t2i.HELD_OUT))}},
    smoke={
        "fixed": {"corpus": SMOKE_CORPUS, "epochs": 2, "task": "attribute"},
        "grid": [{"trainable": "defake_hybrid", "held_out": "cgan", "clip": SMOKE_HYBRID_CLIP}],
    },
)

if __name__ == "__main__":
    main(SWEEP)
