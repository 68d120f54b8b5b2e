"""Activation Clustering, AC (Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by
Activation Clustering", arXiv 1811.03728 / SafeAI@AAAI 2019), a baseline defense of the FTP paper
run through BackdoorBench (docs/methods.md §5.8).

The defender holds the poisoned training set and the backdoored model (standalone scenario,
docs/methods.md §5.1). Per label: take the activations of the samples labelled so, reduce them to
`n_components` dimensions, split them with 2-means, and flag the smaller cluster when it holds at
most `size_threshold` of the label (relative-size analysis;
`secsweep.ops.detection.activation_clustering`). The flagged samples are removed and a fresh model
is retrained from scratch on the rest ("retrain without the flagged cluster", Chen et al. §4).

FTP states no hyperparameter (docs/methods.md §5.8) ("BackdoorBench defaults implied"). Defaults and sources:

* `n_components` = 10 and `reduce` = "ica": Chen et al. reduce the activations to 10 dimensions
  with ICA (BackdoorBench's `nb_dims: 10`). "pca" is offered because ICA whitens every component to
  unit variance, which makes the 2-means split unreliable on small labels (~100-200 samples, as on
  digits); BackdoorBench's own AC calls its clustering with PCA.
* `size_threshold` = 0.35: the relative-size rule of the authors' reference implementation (IBM
  Adversarial Robustness Toolbox, ActivationDefence); Chen et al. give no single number.
* `representation` = "penultimate": Chen et al. cluster the activations of the last hidden layer,
  i.e. the pooled vector `model.features(x)` (BackdoorBench hooks `avgpool`). "last_block" is the
  unpooled output of the last stage (see trainables/defenses/spectral.py). On digits/smallcnn with
  BadNets at poison ratio 0.03, PCA on last_block is the reliable configuration (AUC 0.91-0.98 over
  three seeds), while ICA gives 0.36-0.77 on the penultimate layer and 0.6-0.9 on last_block
  (tests/test_defenses_data.py).
* `seed` of FastICA and the k-means++ seeding: the trial's `seed`.
* Retraining: from scratch with the victim's recipe (attack_lr, attack_momentum,
  attack_weight_decay, attack_batch_size, constant learning rate) for `epochs` epochs, as for
  Spectral Signatures; DefenseConfig's batch_size, momentum and weight_decay are not used.

Detection quality against the ground-truth poison mask (metrics only, never used by the defense):
`auc` of the per-sample score 1 - (relative size of the sample's cluster within its label), and
`tpr`/`fpr`/`num_removed` of the flagged set; every report carries them with asr_before and
clean_acc_before. All-to-one poisoning of a fraction r of the data over K labels makes the target
label r / (r + (1 - r) / K) poisoned (0.53 at r = 0.1, K = 10): once the poison is the larger
cluster, the relative-size rule flags the clean part instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from secsweep.backdoor import DefenseConfig, load_victim, report_before
from secsweep.config import one_of, require
from secsweep.context import Context
from secsweep.names import ASR, AUC, CLEAN_ACC, DEVICE_HOURS, FPR, TPR
from secsweep.ops.detection import activation_clustering
from secsweep.registry import register
from secsweep.filtering import (NUM_REMOVED, REPRESENTATIONS, detection_metrics,
                                          per_label_representations, retrain_without)

REDUCTIONS = ("ica", "pca")


@dataclass(frozen=True)
class Config(DefenseConfig):
    n_components: int = 10               # dimensions after reduction (Chen et al.: 10)
    reduce: str = "ica"                  # ica (Chen et al.) or pca (BackdoorBench's call)
    size_threshold: float = 0.35         # flag the smaller cluster if <= this fraction of its label (ART: 0.35)
    representation: str = "penultimate"  # penultimate (last hidden layer, Chen et al.) or last_block (unpooled)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.n_components >= 1, "n_components", self.n_components, "must be >= 1")
        one_of("reduce", self.reduce, REDUCTIONS)
        require(0.0 < self.size_threshold <= 0.5, "size_threshold", self.size_threshold, "must be in (0, 0.5]")
        one_of("representation", self.representation, REPRESENTATIONS)


@register("ac", kind="defense", config=Config, metrics=(ASR, CLEAN_ACC, DEVICE_HOURS, AUC, TPR, FPR, NUM_REMOVED))
def run(cfg: Config, ctx: Context) -> None:
    victim = load_victim(cfg, ctx)
    pset = victim.poisoned_train_set(ctx)
    scores = torch.zeros(len(pset.labels))
    flagged = torch.zeros(len(pset.labels), dtype=torch.bool)
    for idx, reps in per_label_representations(victim.model, pset.images, pset.labels, ctx.device, cfg.representation):
        label_scores, label_flagged = activation_clustering(
            reps, pset.labels[idx], n_components=cfg.n_components, seed=cfg.seed,
            size_threshold=cfg.size_threshold, reduce=cfg.reduce)
        scores[idx], flagged[idx] = label_scores.float().cpu(), label_flagged.cpu()
    detection = {**detection_metrics(scores, flagged, pset.poisoned), NUM_REMOVED: float(flagged.sum())}
    base = report_before(victim, ctx, **detection)
    retrain_without(cfg, ctx, victim, pset, ~flagged, {**base, **detection})
