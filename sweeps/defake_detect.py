"""DE-FAKE detection (thesis T§5.3; docs/methods.md "DE-FAKE"): real vs fake, image-only vs hybrid
detector x which generators it trains on x how many training images.

    python sweeps/defake_detect.py --smoke-test      # tiny digits corpus, 1 trial
    python sweeps/defake_detect.py                   # offline default: Fashion-MNIST, DDPM / cGAN / cVAE fakes
    python sweeps/defake_detect.py --preset paper --download --set corpus.captions=/path/to/coco \
        --address auto --gpus-per-trial 0.5

The corpus (real Fashion-MNIST test images + fakes of a class-conditional DDPM, a conditional GAN
and a conditional VAE trained here, every image with its class-name prompt) is one cached stage
every trial shares; the generators and the CLIP the hybrid detector embeds with are cached stages
below it. Grid: trainable in {defake_image (a CNN on pixels), defake_hybrid (CLIP image ‖ prompt
embedding -> MLP)} x held_out in {none, ddpm, cgan, vae} (the detector trains on the other
generators and `unseen_detect_acc` says how well it flags the one it never saw) x train_fraction
in {0.1, 0.25, 0.5, 1.0} of each source's training images (the training-set-size curve).

Paper preset: the thesis's detectors — ResNet-18 from scratch (preact_resnet18), open_clip's
pretrained ViT-B/32 (`clip.pretrained=ViT-B-32:openai`) with a 1024 -> 512 -> 256 MLP — on the
thesis's kind of corpus (`defake_t2i_corpus`, trainables/defake/t2i.py): 20,000 real MSCOCO images
the user downloads (images + annotations/captions_*.json; `corpus.captions` points at the folder)
and the fakes Stable Diffusion v1-4 and Latent Diffusion (CompVis/ldm-text2im-large-256, diffusers
pipelines, safetensors weights only) make from their captions, 256 px; held_out in {none,
stable-diffusion-v1-4, ldm-text2im-large-256}. `--download` fetches the pipelines and the CLIP
from the Hugging Face Hub (several GB); without it they must be in the local Hub cache. How to
get the captions: docs/methods.md "DE-FAKE", "Text-to-image corpus".
"""

from secsweep.presets import paper_defake_grid, paper_defake_fixed
from secsweep.sweep import Sweep, grid, main
from trainables.defake import (DETECTORS, DIGITS_CORPUS, HELD_OUT, SMOKE_CORPUS, SMOKE_HYBRID_CLIP,
                               digits_detectors, t2i)

TRAIN_FRACTIONS = [0.1, 0.25, 0.5, 1.0]

SWEEP = Sweep(
    name="defake_detect",
    description=__doc__,
    fixed={"task": "detect"},
    grid=grid(trainable=DETECTORS, held_out=HELD_OUT, train_fraction=TRAIN_FRACTIONS),
    objectives={"val_acc": "max"},
    selection=("val_acc", "max"),
    columns=("trainable", "held_out", "train_fraction", "acc", "unseen_detect_acc", "device_hours"),
    presets={
        # the tests' corpus and detector settings (trainables.defake.DIGITS_*): the README's small-scale table
        "digits": {"fixed": {"corpus": DIGITS_CORPUS, "task": "detect"},
                   "grid": digits_detectors(held_out=HELD_OUT, train_fraction=TRAIN_FRACTIONS)},
        "paper": {"fixed": {**paper_defake_fixed(), "task": "detect"},
                       "grid": paper_defake_grid(held_out=list(t2i.HELD_OUT), train_fraction=[1.0])}},
    smoke={
        "fixed": {"corpus": SMOKE_CORPUS, "epochs": 2, "task": "detect"},
        "grid": [{"trainable": "defake_image", "held_out": "vae", "train_fraction": 0.5}],
    },
)

if __name__ == "__main__":
    main(SWEEP)
