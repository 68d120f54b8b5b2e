"""EncoderMI: membership inference against a pre-trained encoder (Liu et al., "EncoderMI: Membership
Inference against Pre-trained Encoders in Contrastive Learning", CCS 2021; docs/methods.md, EncoderMI).

Question: was this image in the encoder's pre-training set? A contrastively trained encoder maps the
augmented views of its own training images closer together than views of unseen images. The
attacker queries the encoder with N augmented views of a sample, turns the N embeddings into their
N(N - 1)/2 pairwise cosine similarities (`secsweep.ops.encodermi.similarity_features`) and applies an
inference classifier trained on a *shadow* encoder whose members it knows.

Stages (`secsweep.refs.StageRef` fields, any encoder or encoder-attack trainable):
* `target`: the attacked encoder. Default: SimCLR (smallcnn) over-trained on a small member set,
  `train_size` 80 real MNIST digits (~70 members after the validation hold-out) at 14 px for 1,000
  epochs (`TARGET`; the platform's choice: a CPU-sized encoder that memorises its members; the
  talk's targets are ResNet-18 encoders pre-trained on CIFAR-10).
* `shadow`: the attacker's shadow encoder, pre-trained on its shadow member half. Default: the same
  algorithm and recipe on another seeded subset of the same training split (the paper's default
  shadow shares the target's algorithm; with --preset paper the shadow is SimCLR on STL-10).

Membership ground truth (exact, not re-derived): an encoder's members are its pre-training images,
`secsweep.ssl.load_splits(encoder_cfg, ctx).train` -- the very function the encoder trained on (its
seeded `train_size` subset of the dataset's training split, less the stratified validation
hold-out). Non-members are images of the same distribution the encoder never trained on: the
dataset's test split (the paper's non-members are test images too). The test split is cut by one
seeded permutation into disjoint parts: the shadow's non-members, the target's non-members and, for
the control below, the target's fake "members"; the two encoders' member draws are seeded
independently. Target and shadow members may share images when both encoders draw from the same
training split (at the default ~70 of 4,000 images each, ~1 image); that touches no ground truth.

Procedure (one report, epoch 1):
1. `n_samples` members and `n_samples` non-members per encoder (balanced);
2. `n_views` = 10 augmented views per sample (the talk's N; `secsweep.ops.ssl.augment` with a seeded
   generator and the SimCLR recipe `crop_min`/`jitter`: EncoderMI's attacker knows the pre-training
   augmentation, the default of every SSL trainable here), embeddings = the encoder's outputs
   (the backbone, no projection head), similarity features per sample;
3. vector-, set- and threshold-based classifiers (`secsweep.ops.encodermi.infer_membership`: sorted
   similarity vector into an MLP, DeepSets over the set of scores, threshold on the mean similarity
   chosen on the shadow data), trained on the shadow encoder's member/non-member features;
4. applied to the target's features, split into two balanced halves: `val_*` (what a sweep selects
   on) and the reported test metrics: accuracy (on a balanced set: the paper's metric) and ROC-AUC.

`members="unseen"` is the negative control: the target's "members" are test images it never saw, so
every classifier must be at chance (accuracy and AUC ~0.5); a method that leaks something else than
membership (a data-set difference, a bug in the ground truth) fails it.

Metrics: `<classifier>_acc`, `<classifier>_auc` and their `val_` versions for vector, set and
threshold; `member_similarity` / `nonmember_similarity` (the target's mean pairwise similarity of the
two groups, test half: the gap the threshold classifier exploits); `device_hours`. Output:
`membership` (the target's similarity features, membership labels and each classifier's scores).
Talk figures (CIFAR-10, ResNet-18 target, STL-10 shadow): accuracy 86.2 / 78.1 / 82.1 % for vector /
set / threshold; docs/methods.md gives what this scale measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from secsweep import refs, ssl
from secsweep.backdoor import load_split
from secsweep.config import one_of, require
from secsweep.names import ACCURACY, AUC, DEVICE_HOURS, EPOCH
from secsweep.ops import encodermi as mi_ops
from secsweep.ops import ssl as ssl_ops
from secsweep.refs import StageRef
from secsweep.registry import register

ENCODER_KINDS = ("encoder", "encoder_attack")
MEMBERS = ("train", "unseen")
# the default target (measured in docs/methods.md): SimCLR over-trained on ~70 members -- real MNIST
# at 14 x 14 pixels, 1,000 epochs of one step, temperature 0.1, mild views (crop >= 0.6 of the area,
# jitter 0.2), lr 0.003 -- so that it memorises them in ~1 min on one CPU thread; SSL recipes that do
# not over-fit (the defaults: 5 epochs on 10,000 images) leak nothing measurable
TARGET = {"dataset": "mnist", "image_size": 14, "train_size": 80, "epochs": 1000, "batch_size": 64,
          "lr": 0.003, "temperature": 0.1, "crop_min": 0.6, "jitter": 0.2, "monitor_size": 100, "seed": 0}
SHADOW = {**TARGET, "seed": 1}   # same recipe, another seeded member subset of the training split
MEMBER_SIMILARITY, NONMEMBER_SIMILARITY = "member_similarity", "nonmember_similarity"


def metric_names() -> tuple[str, ...]:
    per = [f"{p}{k}_{m}" for p in ("", "val_") for k in mi_ops.CLASSIFIERS for m in ("acc", "auc")]
    return (*per, MEMBER_SIMILARITY, NONMEMBER_SIMILARITY, DEVICE_HOURS)


METRICS = metric_names()


@dataclass(frozen=True)
class Config:
    target: StageRef = field(default_factory=lambda: StageRef("simclr", TARGET))   # the attacked encoder
    shadow: StageRef = field(default_factory=lambda: StageRef("simclr", SHADOW))   # the attacker's shadow encoder
    n_samples: int = 64           # members and as many non-members per encoder (balanced; platform choice)
    n_views: int = mi_ops.N_VIEWS  # augmented views per sample (talk: N = 10)
    crop_min: float = 0.0         # smallest crop area of the query views; 0 = the queried encoder's own
    jitter: float = -1.0          # colour-jitter strength of the query views; < 0 = the queried encoder's own
    members: str = "train"        # train: real members; unseen: negative control (the "members" were never seen)
    seed: int = 0                 # member draws, views, inference classifiers

    def __post_init__(self) -> None:
        refs.check(self, "target", kinds=ENCODER_KINDS)
        refs.check(self, "shadow", kinds=ENCODER_KINDS)
        require(self.n_samples >= 4, "n_samples", self.n_samples, "must be >= 4 (two per half and group)")
        require(self.n_views >= 2, "n_views", self.n_views, "must be >= 2 (pairwise similarities)")
        require(0.0 <= self.crop_min <= 1.0, "crop_min", self.crop_min, "must be in [0, 1] (0 = the encoder's own)")
        require(self.jitter <= 1.0, "jitter", self.jitter, "must be <= 1 (< 0 = the encoder's own)")
        one_of("members", self.members, MEMBERS)


@dataclass
class Queries:
    """One encoder's query images: members first, then non-members (equal numbers)."""

    images: torch.Tensor
    is_member: torch.Tensor


def _draw(n_pool: int, n: int, gen: torch.Generator, what: str, field_name: str = "n_samples") -> torch.Tensor:
    if n > n_pool:
        from secsweep.config import fail

        fail(field_name, n, f"must be <= the {n_pool} {what}")
    return torch.randperm(n_pool, generator=gen)[:n]


def queries(cfg: Config, ctx, ref: StageRef, *, role: str) -> Queries:
    """Balanced members / non-members of the encoder `ref` (role "target" or "shadow")."""
    ecfg = ref.config()
    gen = torch.Generator().manual_seed(cfg.seed * 1009 + (0 if role == "target" else 1))
    test = load_split(ecfg, ctx, "test")
    n = cfg.n_samples
    need = 3 * n if role == "target" and cfg.members == "unseen" else 2 * n
    # one permutation of the test split, cut into disjoint parts: [shadow non-members | target
    # non-members | control "members"], so no image is a non-member of both roles
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed * 7 + 3))
    if need > len(test):
        from secsweep.config import fail

        fail("n_samples", n, f"must be <= {len(test) // (need // n)}: the test split of "
                             f"{ecfg.dataset} ({len(test)} images) holds the non-members")
    if role == "shadow":
        non = order[:n]
    else:
        non = order[n : 2 * n]
    if role == "target" and cfg.members == "unseen":
        mem_images = test.images[order[2 * n : 3 * n]]
    else:
        train = ssl.load_splits(ecfg, ctx).train   # exactly the images the encoder pre-trained on
        mem_images = train.images[_draw(len(train), n, gen, f"pre-training images of {role}")]
    images = torch.cat([mem_images, test.images[non]])
    is_member = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
    return Queries(images, is_member)


def view_recipe(cfg: Config, encoder_cfg) -> tuple[float, float]:
    """(crop_min, jitter) of the query views: the config's, else the queried encoder's own recipe
    (EncoderMI's attacker knows the pre-training augmentation), else the SSL defaults."""
    crop = cfg.crop_min or getattr(encoder_cfg, "crop_min", ssl_ops.CROP_SCALE[0])
    jitter = cfg.jitter if cfg.jitter >= 0 else getattr(encoder_cfg, "jitter", ssl_ops.JITTER)
    return float(crop), float(jitter)


@torch.no_grad()
def view_embeddings(encoder, images: torch.Tensor, n_views: int, recipe: tuple[float, float], device,
                    gen: torch.Generator) -> torch.Tensor:
    """(N, n_views, D) encoder outputs of `n_views` seeded augmented views of every image."""
    encoder.eval()
    crop, jitter = recipe
    out = []
    for _ in range(n_views):
        views = ssl_ops.augment(images.to(device), gen, crop_scale=(crop, 1.0), jitter=jitter)
        out.append(ssl.features_of(encoder, views, device).float())
    return torch.stack(out, dim=1)


def features(cfg: Config, ctx, ref: StageRef, q: Queries, seed_offset: int) -> torch.Tensor:
    encoder, _ = ctx.load_model(ref)
    gen = torch.Generator().manual_seed(cfg.seed * 1009 + 17 + seed_offset)
    emb = view_embeddings(encoder, q.images, cfg.n_views, view_recipe(cfg, ref.config()), ctx.device, gen)
    return mi_ops.similarity_features(emb).cpu()


def halves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(val, test) positions into a [members | non-members] block of 2n rows: each half takes half
    of each group (seeded), so both halves are balanced."""
    g = torch.Generator().manual_seed(seed * 31 + 5)
    pm, pn = torch.randperm(n, generator=g), torch.randperm(n, generator=g) + n
    k = n // 2
    return torch.cat([pm[:k], pn[:k]]), torch.cat([pm[k:], pn[k:]])


@register("encodermi", kind="inference", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    torch.manual_seed(cfg.seed)
    ctx.stage(cfg.target)   # both encoders are upstream stages: not charged to device_hours
    ctx.stage(cfg.shadow)
    shadow_q = queries(cfg, ctx, cfg.shadow, role="shadow")
    target_q = queries(cfg, ctx, cfg.target, role="target")
    shadow_f = features(cfg, ctx, cfg.shadow, shadow_q, 0)
    target_f = features(cfg, ctx, cfg.target, target_q, 1)
    # one scalar mean and std of the shadow features rescale both (order-preserving: sorting and the
    # threshold classifier are unchanged): cosine similarities of ReLU features crowd into ~[0.95, 1],
    # where the MLP classifiers (Adam, lr 0.01) otherwise learn a constant
    mu, sd = shadow_f.mean(), shadow_f.std().clamp(min=1e-8)
    shadow_f, target_f = (shadow_f - mu) / sd, (target_f - mu) / sd
    val, test = halves(cfg.n_samples, cfg.seed)
    metrics: dict[str, float] = {EPOCH: 1}
    saved = {"features": target_f * sd + mu, "is_member": target_q.is_member}
    for kind in mi_ops.CLASSIFIERS:
        inf = mi_ops.infer_membership(kind, shadow_f, shadow_q.is_member, target_f, seed=cfg.seed)
        saved[f"{kind}_scores"] = inf.scores.cpu()
        for prefix, pos in (("val_", val), ("", test)):
            part = mi_ops.Inference(inf.scores[pos], inf.threshold)
            res = mi_ops.evaluate(part, target_q.is_member[pos])
            metrics[f"{prefix}{kind}_acc"] = float(res[ACCURACY])
            metrics[f"{prefix}{kind}_auc"] = float(res[AUC])
    mean_sim = (target_f[test] * sd + mu).mean(dim=1)
    member = target_q.is_member[test]
    metrics[MEMBER_SIMILARITY] = float(mean_sim[member].mean())
    metrics[NONMEMBER_SIMILARITY] = float(mean_sim[~member].mean())
    ctx.report(metrics)
    ctx.save_output("membership", saved)
