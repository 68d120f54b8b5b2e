"""DeDe's reconstruction model and loss (docs/methods.md, "DeDe"): pure tensor code.

An MAE-style patch encoder P and decoder D reconstruct an image x from the frozen victim encoder's
global embedding E(x) and the few patches a random mask leaves visible:

    m      = a random patch mask that keeps floor(L * (1 - r)) of the L patches visible (r: mask ratio)
    x_hat  = D(P([W E(x); patches of x kept by m]))     W: a linear projection (no bias) of E(x) to the
                                                        model width, in the place of ViT's class token
    L(x)   = mean over the hidden patches of (x_hat - x)^2          (per sample: the score)

Training minimises the mean of L(x) at the training mask ratio r_train; detection scores a sample by
L(x) at the higher test ratio r_test (more of x hidden: the reconstruction leans on E(x), which a
backdoor has hijacked for triggered inputs). Building blocks: timm's ViT `Block` (pre-norm
multi-head self-attention + MLP), learned position embeddings, a shared mask token.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

__all__ = ["DeDeModel", "patchify", "unpatchify", "random_keep", "masked_mse", "keep_count"]


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, C * patch * patch), patches in row-major order."""
    n, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"patch_size={patch}: must divide the image size {h}x{w}")
    x = x.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(p: torch.Tensor, patch: int, channels: int, size: int) -> torch.Tensor:
    """The inverse of `patchify` for square images of side `size`."""
    n, _, _ = p.shape
    g = size // patch
    x = p.reshape(n, g, g, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, channels, size, size)


def keep_count(num_patches: int, mask_ratio: float) -> int:
    """Visible patches at `mask_ratio`: floor(L * (1 - r)) (0 = the embedding alone)."""
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio={mask_ratio}: must be in [0, 1]")
    return int(num_patches * (1.0 - mask_ratio) + 1e-9)


def random_keep(n: int, num_patches: int, keep: int, generator: torch.Generator | None = None,
                device: torch.device | None = None) -> torch.Tensor:
    """(n, keep) indices of the visible patches of each sample, drawn uniformly without replacement."""
    where = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(n, num_patches, generator=generator, device=where)
    idx = noise.argsort(dim=1)[:, :keep]
    return idx.to(device) if device is not None else idx


def masked_mse(pred: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over the hidden patches: pred/target (N, L, D), hidden (N, L)
    bool (True = masked). A sample with nothing hidden scores 0."""
    err = ((pred - target) ** 2).mean(dim=2)
    h = hidden.to(err.dtype)
    return (err * h).sum(dim=1) / h.sum(dim=1).clamp(min=1.0)


class DeDeModel(nn.Module):
    """The patch encoder and decoder conditioned on a victim embedding of dimension `embed_dim`.

    `forward(x, z, keep)`: images (N, C, S, S) in [0, 1], victim embeddings (N, embed_dim), visible
    patch indices (N, K) -> reconstructed patches (N, L, C * p * p)."""

    def __init__(self, *, channels: int, image_size: int, patch_size: int, embed_dim: int, width: int = 192,
                 heads: int = 3, encoder_depth: int = 6, decoder_depth: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch_size={patch_size}: must divide image_size={image_size}")
        if width % heads:
            raise ValueError(f"width={width}: must be divisible by heads={heads}")
        self.channels, self.image_size, self.patch_size = channels, image_size, patch_size
        self.num_patches = (image_size // patch_size) ** 2
        patch_dim = channels * patch_size * patch_size
        self.patch_embed = nn.Linear(patch_dim, width)
        self.embed_proj = nn.Linear(embed_dim, width, bias=False)  # E(x) in the place of the class token
        self.pos = nn.Parameter(torch.zeros(1, self.num_patches + 1, width))
        self.encoder = nn.Sequential(*(Block(width, heads, mlp_ratio, qkv_bias=True) for _ in range(encoder_depth)))
        self.encoder_norm = nn.LayerNorm(width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_pos = nn.Parameter(torch.zeros(1, self.num_patches + 1, width))
        self.decoder = nn.Sequential(*(Block(width, heads, mlp_ratio, qkv_bias=True) for _ in range(decoder_depth)))
        self.decoder_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_dim)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x: torch.Tensor, z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        patches = patchify(x, self.patch_size)
        tokens = self.patch_embed(patches) + self.pos[:, 1:]
        width = tokens.shape[-1]
        visible = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, width))
        cls = (self.embed_proj(z.to(tokens.dtype)) + self.pos[0, 0]).unsqueeze(1)
        h = self.encoder_norm(self.encoder(torch.cat([cls, visible], dim=1)))
        # the decoder sees every position: the encoded visible patches where they were, mask tokens elsewhere
        full = self.mask_token.expand(n, self.num_patches, width).clone()
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, width), h[:, 1:])
        seq = torch.cat([h[:, :1], full], dim=1) + self.decoder_pos
        out = self.head(self.decoder_norm(self.decoder(seq)))
        return out[:, 1:]

    def loss(self, x: torch.Tensor, z: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None,
             target: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample masked MSE of one random mask at `mask_ratio` (N,); `target` (default x) is
        the image to reconstruct (the CTRL case trains some embeddings towards another image)."""
        keep = random_keep(x.shape[0], self.num_patches, keep_count(self.num_patches, mask_ratio), generator,
                           x.device)
        pred = self(x, z, keep)
        hidden = torch.ones(x.shape[0], self.num_patches, dtype=torch.bool, device=x.device)
        hidden.scatter_(1, keep, False)
        tgt = patchify(x if target is None else target, self.patch_size)
        return masked_mse(pred, tgt, hidden)
