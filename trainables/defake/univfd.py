"""UnivFD (Ojha, Li and Lee, "Towards Universal Fake Image Detectors that Generalize Across
Generative Models", CVPR 2023; docs/methods.md "DE-FAKE"): real vs fake (or which source) by a
linear probe on a frozen CLIP's image embedding — no prompt, no hidden layer, no fine-tuning. The
modern peer the thesis's detectors are compared with: its point is that a feature space never
trained to tell real from fake generalises to unseen generators better than a detector trained
end to end.

It is the hybrid detector (`hybrid.py`) with `use_prompt=False` and `hidden=()`: the same CLIP
stage, corpus, tasks, held-out generator, unseen threshold and attacks (FGSM / BIM / DI-FGSM through
the CLIP image tower; HybridFool needs a prompt and does not apply). The paper's CLIP is open_clip's
ViT-L/14 with OpenAI's weights (`clip.pretrained=ViT-L-14:openai`, online; `--preset paper`);
offline the small CLIP trained here. Its probe trains with Adam on precomputed embeddings (UnivFD:
Adam lr 1e-4, batch 256, BCE; here the hybrid's recipe, lr 1e-3, batch 32, 30 epochs, which fits a
linear layer on a few hundred embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from secsweep.names import DEVICE_HOURS
from secsweep.refs import StageRef
from secsweep.registry import register

from . import ACC, VAL_ACC
from .hybrid import Config as HybridConfig
from .hybrid import _default_clip, run_clip_detector

METRICS = (ACC, VAL_ACC, DEVICE_HOURS)


@dataclass(frozen=True)
class Config(HybridConfig):
    clip: StageRef = field(default_factory=_default_clip)
    use_prompt: bool = False
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0             # a linear probe: nothing to drop


@register("defake_univfd", kind="fake_detector", config=Config, metrics=METRICS)
def run(cfg: Config, ctx) -> None:
    run_clip_detector(cfg, ctx)
