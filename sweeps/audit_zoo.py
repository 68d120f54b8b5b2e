"""Audits of public models (SecurityNet; docs/methods.md, "Audits of public models"): every model x
every audit — model stealing, membership inference, FGSM evasion and backdoor detection on clean
models (Neural Cleanse, STRIP, NEO: every flag a false positive).

    python sweeps/audit_zoo.py                      # offline: the packaged MNIST CNN + a trained population
    python sweeps/audit_zoo.py --smoke-test         # the packaged CNN x 4 audits, tiny settings (< 1 min of trials)
    python sweeps/audit_zoo.py --preset paper --download --gpus-per-trial 0.25   # CIFAR-10 / SVHN
    secsweep report audit_zoo                       # the database table, correlations, the FPR table

Models (the offline default):

* the registry classifiers whose data exists offline: `digit-recognizer-mnist-cnn` on the real MNIST
  digits (docs/zoo.md; the CIFAR-10 Keras CNN, the FER mini-Xception and EfficientNet-Lite0 need
  CIFAR-10, FER-2013 and ImageNet, which are not offline: the paper preset audits the CIFAR-10 one);
* a trained population on the same data, the `clean` model stage: the small CNN x training-set size
  {500, 1,000, 2,000, 4,000} (10 % of it held out) x epochs {2, 5, 10, 30}, so over-fitting
  (train - test accuracy) is controlled by size and epochs. A ResNet-18 (`preact_resnet18`) costs
  about 75 small-CNN steps per step on this CPU, and Neural Cleanse back-propagates through it ten
  times per class: it is in the paper preset, not offline.

Each trial is one audit of one model; a grid point names its trainable and its `model` stage
reference, so every model is trained (or loaded) once, cached, and shared by its four audits, and a
worker that runs several audits of a model loads its weights and data once (`secsweep.audit`).
`secsweep report audit_zoo` joins the audits per model (docs/methods.md).
"""

from secsweep.presets import PAPER_AUDIT_FIXED, PAPER_AUDIT_RECIPE
from secsweep.sweep import Sweep, main

AUDITS = ["audit_stealing", "audit_mia", "audit_evasion", "audit_backdoor_fpr"]
ZOO_OFFLINE = [{"trainable": "zoo", "name": "digit-recognizer-mnist-cnn", "dataset": "mnist"}]
# the population's recipe: secsweep.audit.DEFAULT_MODEL's (SGD lr 0.05, batch 64: 5 epochs reach
# train / test accuracy 0.968 / 0.945 on 3,600 MNIST digits)
RECIPE = {"trainable": "clean", "dataset": "mnist", "model": "smallcnn", "lr": 0.05, "batch_size": 64}
TRAIN_SIZES = [500, 1000, 2000, 4000]
EPOCHS = [2, 5, 10, 30]


def population(recipe: dict, archs, sizes, epochs) -> list[dict]:
    """`clean` model references: architecture x training-set size x epochs."""
    return [{**recipe, "model": a, "train_size": n, "epochs": e} for a in archs for n in sizes for e in epochs]


def audits_of(models: list[dict], audits=AUDITS) -> list[dict]:
    """One trial per (model, audit); the model-major order lets a worker reuse a loaded model."""
    return [{"trainable": a, "model": dict(m)} for m in models for a in audits]


OFFLINE_MODELS = [*ZOO_OFFLINE, *population(RECIPE, ["smallcnn"], TRAIN_SIZES, EPOCHS)]

# SecurityNet's settings (docs/methods.md, "Audits of public models"): benchmark models of CIFAR-10 and
# SVHN (--download); stealing with a ResNet-18 surrogate, 30 epochs, SGD 0.01 on half the training
# set; FGSM's black-box surrogate a ResNet-18; NC 50 epochs, STRIP and NEO on 2,000 test images.
PAPER_RECIPE = PAPER_AUDIT_RECIPE
PAPER_MODELS = [
    {"trainable": "zoo", "name": "cifar10-keras-cnn", "dataset": "cifar10"},
    *population({**PAPER_RECIPE, "dataset": "cifar10", "train_size": 0}, ["preact_resnet18", "smallcnn"],
                [5000, 25000, 0], [10, 50, 200]),
    *population({**PAPER_RECIPE, "dataset": "svhn", "train_size": 0}, ["preact_resnet18", "smallcnn"],
                [5000, 25000, 0], [10, 50, 200]),
]
PAPER_FIXED = PAPER_AUDIT_FIXED

# < 1 min of trials on 2 CPUs: the packaged CNN, every audit at toy sizes (FGSM at the default eps)
SMOKE_MODELS = [ZOO_OFFLINE[0]]  # the packaged CNN; the trained population is the same audits on `clean` stages
SMOKE_FIXED = {"max_samples": 200, "epochs": 1, "mlp_epochs": 5,
               "transfer_surrogate.train_size": 500, "transfer_surrogate.epochs": 1,
               "nc_epochs": 1, "nc_images": 64, "strip_images": 100, "neo_images": 10, "neo_regions": 50,
               "neo_confirm": 50}

SWEEP = Sweep(
    name="audit_zoo",
    description=__doc__,
    fixed={},
    grid=audits_of(OFFLINE_MODELS),
    # a grid of audits selects nothing; the target's test accuracy stands in for the kind's objective
    objectives={"test_acc": "max"},
    selection=("test_acc", "max"),
    # model.config.*: the model stage's resolved config as MLflow params name it (`secsweep report`)
    columns=("trainable", "model.config.name", "model.config.train_size", "model.config.epochs", "train_acc",
             "test_acc", "overfit_gap", "num_params", "agreement", "steal_acc", "mia_auc_correctness", "mia_auc_mentr", "mia_auc_mlp",
             "evasion_drop_white_0.03", "evasion_drop_black_0.03", "nc_flag", "strip_flag", "neo_flag",
             "nc_seconds", "strip_seconds", "neo_seconds", "device_hours"),
    presets={"paper": {"fixed": PAPER_FIXED, "grid": audits_of(PAPER_MODELS)}},
    smoke={"fixed": SMOKE_FIXED, "grid": audits_of(SMOKE_MODELS)},
)

if __name__ == "__main__":
    main(SWEEP)
