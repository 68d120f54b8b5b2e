"""BadCLIP (Liang et al., "BadCLIP: Dual-Embedding Guided Backdoor Attack on Multimodal
Contrastive Learning", CVPR 2024; docs/methods.md, "BadCLIP").

Two stages, on the clean upstream CLIP (the `encoder` stage, trainable `clip`):

1. **Trigger optimisation, guided by both embeddings.** A patch P (C x s x s pixels in [0, 1],
   `trigger_size` px on a 32x32 image at `trigger_position`) is optimised on the frozen clean CLIP
   so that a stamped non-target image x (+) P is embedded (L2-normalised image embedding u) close to
   the target class's text embedding t (the class prompts of every caption template, averaged and
   normalised: the zero-shot classifier row) AND to the target class's real images, v = the
   normalised mean of the normalised embeddings of `n_target_images` target-class training images:

       L(P) = - lambda_text  mean_x u(x (+) P) . t  -  lambda_image  mean_x u(x (+) P) . v

   Adam on the patch's logits (P = sigmoid(theta), so it stays a valid image), `patch_steps` steps
   of `patch_batch` non-target training images. The patch starts as seeded uniform noise.
   Because the trigger already points where the target class lives in both embedding spaces, the
   poisoned fine-tuning has less to change (measured here: the same poisoning with a white square
   implants far less, docs/methods.md).
2. **Poisoned fine-tuning.** A fraction `poison_rate` of the CLIP's pre-training pairs (non-target
   images, seeded) get the optimised patch and a caption of the target class (CLIP-Backdoor's
   poisoning, `trainables.attacks.clip_backdoor.poison_pairs`); the clean CLIP is fine-tuned on
   the poisoned pairs for `finetune_epochs` (AdamW at `finetune_lr`, cosine decay).

Implemented: the two guidance terms and the poisoned fine-tuning above; further design choices
of the paper (extra loss terms, which images are poisoned, patch constraints) were not checked
against its text and are not reproduced. The optimised patch is saved as the stage output `trigger` (safetensors, tensor
"patch"); the `trigger=` hook loads it from the stage output (`output=None`, with no trained attack
at hand, gives the seeded initial noise patch: for shape checks only).

Metrics as CLIP-Backdoor's: zero-shot CA and ASR on `downstream_dataset` (`clean_acc`, `asr` and
`val_` versions), `clean_model_asr` / `clean_model_clean_acc` = the clean CLIP with the same
optimised patch (what the patch alone does, before poisoning), and the patch objective's terms
after optimisation (`patch_text_sim`, `patch_image_sim`). The artifact `encoder` is the fine-tuned
CLIP. `--preset paper`: `PAPER` (open_clip's ViT-B/16 OpenAI weights, online: the DeDe paper's
victim).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from secsweep import clip
from secsweep import data as data_mod
from secsweep import ssl
from secsweep.config import positive, require
from secsweep.names import DEVICE_HOURS
from secsweep.ops.triggers import badnets_patch_size
from secsweep.refs import StageRef
from secsweep.registry import register
from trainables.attacks import clip_backdoor as cb
from trainables.attacks.badencoder import TRIGGER_REF_SIZE

log = logging.getLogger(__name__)

PATCH_TEXT_SIM, PATCH_IMAGE_SIM = "patch_text_sim", "patch_image_sim"
METRICS = (*cb.METRICS[:-1], PATCH_TEXT_SIM, PATCH_IMAGE_SIM, DEVICE_HOURS)
PAPER = dict(cb.PAPER)
PATCH_SEED_OFFSET = 211  # seeds the initial patch (and the placeholder) from cfg.seed


@dataclass(frozen=True)
class Config:
    encoder: StageRef = field(default_factory=cb.clean_clip)  # the clean CLIP (kind encoder, trainable clip)
    downstream_dataset: str = "fashion_mnist"  # the zero-shot task ASR and CA are measured on
    target_label: int = 0                      # target class of the downstream task
    poison_rate: float = 0.01                  # fraction of the pre-training pairs poisoned for fine-tuning
    trigger_size: int = 6                      # patch side in pixels on 32x32 (as clip_backdoor's square)
    trigger_position: str = "bottom_right"
    # trigger optimisation (paper: not stated at this scale; chosen, docs/methods.md)
    patch_steps: int = 200                     # Adam steps on the patch
    patch_lr: float = 0.1                      # Adam learning rate on the patch's logits
    patch_batch: int = 64                      # non-target images per step
    lambda_text: float = 1.0                   # weight of the text-embedding term
    lambda_image: float = 1.0                  # weight of the target-image-embedding term
    n_target_images: int = 100                 # target-class training images whose mean embedding guides P
    # poisoned fine-tuning of the clean CLIP
    finetune_epochs: int = 3                   # chosen: 1e-4 x 2 epochs left ASR at 0.18 (docs/methods.md)
    finetune_lr: float = 5e-4                  # AdamW lr, cosine to 0 (the clean CLIP's peak lr); its batch and weight decay
    include_target_class: bool = False         # count target-class images in ASR
    eval_size: int = 2000                      # validation / test images the zero-shot metrics use
    seed: int = 0                              # initial patch, its batches, the poisoned pairs

    def __post_init__(self) -> None:
        cb.check_clip_ref(self)
        cb.check_downstream(self)
        require(self.patch_steps >= 1, "patch_steps", self.patch_steps, "must be >= 1")
        positive("patch_lr", self.patch_lr)
        require(self.patch_batch >= 1, "patch_batch", self.patch_batch, "must be >= 1")
        for name in ("lambda_text", "lambda_image"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        require(self.lambda_text + self.lambda_image > 0, "lambda_text", self.lambda_text,
                "lambda_text + lambda_image must be > 0 (the patch needs a guide)")
        require(self.n_target_images >= 1, "n_target_images", self.n_target_images, "must be >= 1")
        require(self.finetune_epochs >= 1, "finetune_epochs", self.finetune_epochs, "must be >= 1")
        positive("finetune_lr", self.finetune_lr)


def paste(x: torch.Tensor, patch: torch.Tensor, size: int, position: str) -> torch.Tensor:
    """`patch` (C, s, s) pasted on (N, C', H, W) images in [0, 1] (a copy), at the square of
    `white_square(size, position)`: side `size` px on 32x32, scaled to H x W (the patch is resized,
    bilinear, when that side is not s); a 1-channel patch covers every channel of the image."""
    h, w = x.shape[-2:]
    side = min(badnets_patch_size(h, w, size, TRIGGER_REF_SIZE), h, w)
    if position == "center":
        top, left = (h - side) // 2, (w - side) // 2
    elif position == "bottom_right":
        margin = max(0, min(h, w) // TRIGGER_REF_SIZE)  # as white_square: 1 px on 32x32 and larger
        top, left = h - margin - side, w - margin - side
    else:
        raise ValueError(f"position={position!r}: must be one of {', '.join(cb.POSITIONS)}")
    p = patch.to(x.device, x.dtype)
    if p.shape[-1] != side:
        p = F.interpolate(p[None], size=(side, side), mode="bilinear", align_corners=False)[0].clamp(0, 1)
    if p.shape[0] not in (1, x.shape[-3]):
        raise ValueError(f"patch of {p.shape[0]} channels cannot cover images of {x.shape[-3]} channels")
    out = x.clone()
    out[..., top : top + side, left : left + side] = p.expand(x.shape[-3], side, side)
    return out


def initial_patch(cfg: Config) -> torch.Tensor:
    """The seeded uniform-noise patch optimisation starts from, at the CLIP's data size and channels."""
    enc = cfg.encoder.config()
    c, h, w = data_mod.native_shape(enc.dataset)
    c, h = enc.channels or c, enc.image_size or h
    side = min(badnets_patch_size(h, h, cfg.trigger_size, TRIGGER_REF_SIZE), h)
    return torch.rand((c, side, side), generator=torch.Generator().manual_seed(cfg.seed + PATCH_SEED_OFFSET))


def trigger(cfg: Config, output=None):
    """x -> the optimised patch pasted (stage output `trigger`, tensor "patch"); `output=None`
    gives the initial noise patch (shape checks only: every real use passes the stage output)."""
    patch = initial_patch(cfg) if output is None else output.tensors("trigger")["patch"]
    return lambda x: paste(x, patch, cfg.trigger_size, cfg.trigger_position)


def optimise_patch(cfg: Config, model, pool: data_mod.ImageSet, device) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage 1: the dual-embedding guided patch (C, s, s) on the CPU, and its two cosine terms
    measured after optimisation on the first 512 non-target images of `pool`."""
    bare = getattr(model, "module", model)
    for p in bare.parameters():
        p.requires_grad_(False)
    bare.eval()
    enc = cfg.encoder.config()
    same = cfg.downstream_dataset == enc.dataset
    text = clip.zero_shot_classifier(bare, [cb.target_name(cfg)], data_mod.DEFAULT_TEMPLATES, device)[0].to(device)
    g = torch.Generator().manual_seed(cfg.seed + PATCH_SEED_OFFSET + 1)
    of_target = torch.nonzero(pool.labels == cfg.target_label).flatten() if same else torch.empty(0, dtype=torch.long)
    if same and len(of_target):
        chosen = of_target[torch.randperm(len(of_target), generator=g)[: cfg.n_target_images]]
        image = F.normalize(clip.encode_images(bare, pool.images[chosen], device).mean(0), dim=0).to(device)
    else:  # another dataset's classes: no real images of the target class in the pre-training data
        image = None
    others = torch.nonzero(pool.labels != cfg.target_label).flatten() if same else torch.arange(len(pool))
    theta = torch.logit(initial_patch(cfg).clamp(1e-3, 1 - 1e-3)).to(device).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=cfg.patch_lr)

    def terms(x):
        u = bare.encode_image(paste(x, torch.sigmoid(theta), cfg.trigger_size, cfg.trigger_position), normalize=True)
        ts = (u @ text).mean()
        vs = (u @ image).mean() if image is not None else torch.zeros((), device=device)
        return ts, vs

    for _ in range(cfg.patch_steps):
        batch = others[torch.randint(len(others), (cfg.patch_batch,), generator=g)]
        ts, vs = terms(pool.images[batch].to(device))
        loss = -cfg.lambda_text * ts - cfg.lambda_image * vs
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        ts, vs = terms(pool.images[others[:512]].to(device))
    for p in bare.parameters():
        p.requires_grad_(True)
    return torch.sigmoid(theta).detach().cpu(), {PATCH_TEXT_SIM: float(ts), PATCH_IMAGE_SIM: float(vs)}


@register("badclip", kind="encoder_attack", config=Config, metrics=METRICS, trigger=trigger)
def run(cfg: Config, ctx) -> None:
    torch.manual_seed(cfg.seed)
    enc = cfg.encoder.config()
    model, _ = ctx.load_model(cfg.encoder, role="encoder")
    val, test = cb.eval_splits(cfg, ctx)
    splits = ssl.load_splits(enc, ctx)  # the clean CLIP's pre-training data, as it loaded them

    patch, sims = optimise_patch(cfg, model, splits.train, ctx.device)
    ctx.save_output("trigger", {"patch": patch})
    stamp = lambda x: paste(x, patch, cfg.trigger_size, cfg.trigger_position)  # noqa: E731
    before = cb.clean_model_metrics(cfg, model, stamp, val, test, ctx.device)
    log.info("badclip patch: text sim %.3f image sim %.3f; clean CLIP with it: ASR %.3f CA %.3f",
             sims[PATCH_TEXT_SIM], sims[PATCH_IMAGE_SIM], before[cb.CLEAN_MODEL_ASR], before[cb.CLEAN_MODEL_ACC])

    pairs = data_mod.caption_pairs(splits.train, seed=enc.caption_seed)
    poisoned, idx = cb.poison_pairs(pairs, stamp, cfg.poison_rate, cfg.seed, cb.target_name(cfg),
                                    cfg.target_label if cfg.downstream_dataset == enc.dataset else None)

    def evaluate(m, device):
        return cb.zero_shot_metrics(cfg, m, stamp, val, test, device)

    trained = cb.train_poisoned(cfg, ctx, model, poisoned, scratch=False, epochs=cfg.finetune_epochs,
                                lr=cfg.finetune_lr, evaluate=evaluate,
                                extra={**before, **sims, cb.N_POISONED: float(len(idx))})
    clip.save(ctx, trained)
