"""DE-FAKE robustness (thesis T§5.5, T-Tab 5.4; docs/methods.md "DE-FAKE"): the detectors' and
attributors' test accuracy under FGSM, BIM and DI-FGSM (and HybridFool for the hybrid, the gradient
of the CLIP image-text distance) at eps 0.001 / 0.005 / 0.01, image-only vs hybrid x detect vs
attribute.

    python sweeps/defake_robustness.py --smoke-test  # tiny digits corpus, 1 trial
    python sweeps/defake_robustness.py               # offline default: Fashion-MNIST, DDPM / cGAN / cVAE fakes
    python sweeps/defake_robustness.py --preset paper --download --set corpus.captions=/path/to/coco \
        --address auto --gpus-per-trial 0.5

Every trial trains its model and, on the last epoch, attacks it white-box on the test images
(robust_acc_<attack>_e<eps x 1000>, e.g. robust_acc_fgsm_e0010 at eps 0.01, and robust_acc_clean).
Corpus, detectors and paper preset as in sweeps/defake_detect.py.
"""

from secsweep.presets import paper_defake_fixed, paper_defake_grid
from secsweep.sweep import Sweep, grid, main
from trainables.defake import DETECTORS, DIGITS_CORPUS, SMOKE_CORPUS, SMOKE_HYBRID_CLIP, digits_detectors

TASKS = ["detect", "attribute"]

SWEEP = Sweep(
    name="defake_robustness",
    description=__doc__,
    fixed={"robustness": True},
    grid=grid(trainable=DETECTORS, task=TASKS),
    objectives={"val_acc": "max"},
    selection=("val_acc", "max"),
    columns=("trainable", "task", "acc", "robust_acc_fgsm_e0010", "robust_acc_bim_e0010",
             "robust_acc_di_fgsm_e0010", "robust_acc_hybridfool_e0010", "device_hours"),
    presets={
        # the tests' corpus and detector settings (trainables.defake.DIGITS_*): the README's small-scale table
        "digits": {"fixed": {"corpus": DIGITS_CORPUS, "robustness": True},
                   "grid": digits_detectors(task=TASKS)},
        "paper": {"fixed": {**paper_defake_fixed(), "robustness": True},
                       "grid": paper_defake_grid(task=TASKS)}},
    smoke={
        "fixed": {"corpus": SMOKE_CORPUS, "epochs": 2, "robustness": True},
        "grid": [{"trainable": "defake_hybrid", "task": "detect", "clip": SMOKE_HYBRID_CLIP}],
    },
)

if __name__ == "__main__":
    main(SWEEP)
