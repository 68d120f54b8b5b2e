"""DE-FAKE (thesis ch. 5; docs/methods.md "DE-FAKE"): detector type x task x held-out generator on
the offline fake-image corpus, with the unseen-generator threshold swept inside every attribution
trial that holds a generator out.

    python sweeps/defake.py --smoke-test            # tiny digits corpus, 2 trials
    python sweeps/defake.py                         # offline default: Fashion-MNIST, DDPM / cGAN / cVAE fakes
    python sweeps/defake.py --preset paper --download --address auto --gpus-per-trial 0.5

The corpus (real Fashion-MNIST test images + fakes of a class-conditional DDPM, a conditional GAN
and a conditional VAE trained here, every image with its class-name prompt) is one cached stage
every trial shares; the three generators and the CLIP the hybrid detector embeds with are cached
stages below it. Grid: trainable in {defake_image (a CNN on pixels), defake_hybrid (CLIP image ‖
prompt embedding -> MLP)} x task in {detect, attribute} x held_out in {none, ddpm, cgan, vae}.

Threshold: an attribution trial with a held-out generator evaluates the rule "max softmax < t ->
unseen" at t = 0, 0.1, ..., 1.0 on validation and test (open_acc_t000 ... open_acc_t100, every
epoch), picks t on validation (`threshold`) and reports the test accuracy at it (`open_acc`).
One training serves every threshold, so t is a reported dimension, not a grid one (a grid over t
would retrain the same attributor eleven times). Every trial also reports its test accuracy under
FGSM, BIM, DI-FGSM (and HybridFool for the hybrid) at eps 0.001 / 0.005 / 0.01 (robustness=True).

Paper preset: the thesis's detectors — ResNet-18 from scratch (preact_resnet18), open_clip's
pretrained ViT-B/32 (`clip.pretrained=ViT-B-32:openai`, online) with a 1024 -> 512 -> 256 MLP — and
the largest offline corpus (5,000 per source). The thesis's corpus itself (Stable Diffusion, Latent
Diffusion, GLIDE, DALL-E 2 fakes of MSCOCO / Flickr30k captions, 40,000 pairs half real) is NOT
built here: it needs diffusers' text-to-image pipelines (`diffusers.StableDiffusionPipeline`,
~4 GB of weights from the Hugging Face Hub) and the caption files, which the user downloads
(MSCOCO captions_train2014.json); a corpus stage over them is future work (docs/methods.md
"DE-FAKE"). `--download` fetches the CLIP weights only.
"""

from secsweep.presets import PAPER_DEFAKE_CLIP, PAPER_DEFAKE_IMAGE_MODEL, PAPER_DEFAKE_PER_SOURCE
from secsweep.sweep import Sweep, grid, main, variants
from trainables.defake import SMOKE_CORPUS

DETECTORS = ["defake_image", "defake_hybrid"]
HELD_OUT = ["", "ddpm", "cgan", "vae"]

SWEEP = Sweep(
    name="defake",
    description=__doc__,
    fixed={"robustness": True},  # last epoch: FGSM / BIM / DI-FGSM (+ HybridFool) at eps 0.001, 0.005, 0.01
    grid=variants(
        grid(trainable=DETECTORS, task=["detect"], held_out=HELD_OUT),
        grid(trainable=DETECTORS, task=["attribute"], held_out=HELD_OUT),
    ),
    objectives={"val_acc": "max"},
    selection=("val_acc", "max"),
    columns=("trainable", "task", "held_out", "acc", "unseen_detect_acc", "open_acc", "threshold",
             "robust_acc_fgsm_e0010", "device_hours"),
    presets={
        "paper": {
            "fixed": {"robustness": True, "corpus": {"trainable": "defake_corpus", "per_source": PAPER_DEFAKE_PER_SOURCE}},
            "grid": variants(
                grid(trainable=["defake_image"], model=[PAPER_DEFAKE_IMAGE_MODEL], task=["detect", "attribute"],
                     held_out=HELD_OUT),
                grid(trainable=["defake_hybrid"], clip=[dict(PAPER_DEFAKE_CLIP)],
                     task=["detect", "attribute"], held_out=HELD_OUT),
            ),
        },
    },
    smoke={
        "fixed": {"corpus": SMOKE_CORPUS, "epochs": 2},
        "grid": [
            {"trainable": "defake_image", "task": "attribute", "held_out": "vae"},
            {"trainable": "defake_hybrid", "task": "detect", "held_out": "",
             "clip": {"trainable": "clip", "dataset": "digits", "image_size": 8, "vision_patch": 4, "epochs": 1,
                      "monitor_size": 200}},
        ],
    },
)

if __name__ == "__main__":
    main(SWEEP)
