"""The hybrid DE-FAKE detector and attributor (thesis T§5.3.2, T§5.4.2; docs/methods.md
"DE-FAKE"): a frozen CLIP embeds each image and its prompt; the concatenation
[E_i(x) ‖ E_t(prompt)] (L2-normalised embeddings) feeds a 2-layer MLP, 2E -> 512 -> 256 -> classes
with ReLU and dropout 0.5 (the thesis gives "2-layer MLP"; these widths and the dropout follow the
usual reading for ViT-B/32's 1024-d input).

The CLIP is an upstream "clip" encoder stage: offline, the small open_clip CLIP trained here on the
real training images and their class-name captions (`trainables/encoders/clip.py`); online,
`clip.pretrained=ViT-B-32:openai` loads open_clip's pretrained ViT-B/32 (the thesis's CLIP).
Prompts are the corpus's (natural prompts: the text each image was generated from, or a real
image's caption); a captioner for prompt-less images (BLIP online) is not built here.

Tasks, held-out generator and threshold rule: as the image-only detector (`detector.py`).
`robustness=True` adds the accuracies under FGSM, BIM and DI-FGSM through the CLIP image tower and
the head (the prompt embedding held fixed), and under HybridFool (one signed-gradient step that
pushes the image embedding away from its prompt's, cosine distance: T-Eq 5.4).
Training: Adam lr 1e-3, batch 32, 30 epochs (measured on the small corpora; the thesis does not state it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from secsweep import clip as clip_mod
from secsweep import refs
from secsweep.loop import fit
from secsweep.models import register_model
from secsweep.names import DEVICE_HOURS
from secsweep.refs import StageRef
from secsweep.registry import register
from secsweep.training import probabilities

from . import (ACC, VAL_ACC, DetectorConfig, evaluate_task, make_task, read_corpus, robustness, score_of,
               trained_positions)

METRICS = (ACC, VAL_ACC, DEVICE_HOURS)
ARCH = "defake_mlp"


@register_model(ARCH, image=False)
def defake_mlp(in_dim: int, num_classes: int, hidden: list | tuple = (512, 256), dropout: float = 0.5) -> nn.Module:
    """The hybrid head: Linear-ReLU-Dropout per hidden width, then a linear classifier."""
    layers: list[nn.Module] = []
    d = int(in_dim)
    for w in hidden:
        layers += [nn.Linear(d, int(w)), nn.ReLU(), nn.Dropout(float(dropout))]
        d = int(w)
    return nn.Sequential(*layers, nn.Linear(d, int(num_classes)))


def _default_clip() -> StageRef:
    # small and quick: the hybrid only needs embeddings that separate sources, not a strong zero-shot CLIP
    return StageRef("clip", {"train_size": 4000, "epochs": 3, "monitor_size": 500})


@dataclass(frozen=True)
class Config(DetectorConfig):
    clip: StageRef = field(default_factory=_default_clip)
    lr: float = 1e-3                 # Adam (3e-4 at batch 128 left the digits test corpus undertrained: 0.59 vs 0.67)
    batch_size: int = 32
    epochs: int = 30                 # over precomputed embeddings: cheap
    dropout: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        ref = refs.coerce("clip", self.clip)
        dataset = self.corpus.config().dataset
        if "dataset" not in ref.options and not ref.options.get("pretrained"):
            ref = ref.with_options(dataset=dataset)  # trained on the corpus's real training images
        object.__setattr__(self, "clip", ref)
        refs.check(self, "clip", kinds=("encoder",))
        from secsweep.config import require

        require(0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)")


class OnPixels(nn.Module):
    """The hybrid as a function of the pixels of a fixed set of images: logits of
    head([E_i(x) ‖ text[i]]) with the prompts' embeddings `text` (N, E) held constant — what the
    pixel attacks differentiate through (white-box, through the CLIP image tower)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, text: torch.Tensor):
        super().__init__()
        self.encoder, self.head = encoder, head
        self.register_buffer("text", text)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.encoder.encode_image(x, normalize=True)
        return self.head(torch.cat([u, self.text[: len(x)]], 1))


def embed(model, corpus, device) -> torch.Tensor:
    """(N, 2E) = [normalised image embedding ‖ normalised prompt embedding] of every corpus image."""
    u = clip_mod.encode_images(model, corpus.images, device)
    v = clip_mod.encode_texts(model, list(corpus.prompts), device)
    return torch.cat([u, v], 1)


@register("defake_hybrid", kind="fake_detector", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    corpus = read_corpus(ctx.stage(cfg.corpus))
    task = make_task(cfg, corpus)
    encoder, _ = ctx.load_model(cfg.clip, "encoder")
    feats = embed(encoder, corpus, ctx.device)
    train = trained_positions(corpus, task, "train")
    torch.manual_seed(cfg.seed)
    args = {"in_dim": int(feats.shape[1]), "num_classes": task.num_classes, "hidden": [512, 256], "dropout": cfg.dropout}
    head = defake_mlp(**args)

    def evaluate(m, device):
        return evaluate_task(lambda idx: probabilities(m, feats[idx], device), corpus, task)

    def attacked(m, device):  # the last epoch: FGSM / BIM / DI-FGSM and HybridFool on the test images
        from secsweep.ops.adversarial import hybrid_fool

        test = trained_positions(corpus, task, "test").unique()
        text = feats[test, feats.shape[1] // 2:].to(device)
        whole = OnPixels(encoder, getattr(m, "module", m), text).to(device)
        x = corpus.images[test].to(device)
        fool = lambda eps: hybrid_fool(x, lambda z: encoder.encode_image(z, normalize=True), text, eps)
        return robustness(whole, x, task.target[corpus.source[test]].to(device),
                          lambda p, t: score_of(task)(p.cpu(), t.cpu()), extra=fool)

    head = fit(head, (feats[train], task.target[corpus.source[train]]), ctx, epochs=cfg.epochs,
               batch_size=cfg.batch_size, seed=cfg.seed, opt="adam", lr=cfg.lr, weight_decay=0.0, evaluate=evaluate,
               final_evaluate=attacked if cfg.robustness else None)
    ctx.save_model("detector", head, ARCH, args, "detector")
