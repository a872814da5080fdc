"""A reference U-ViT (Bao et al., "All are Worth Words", baofff/U-ViT ``libs/uvit.py`` and
``libs/uvit_t2i.py``), written here.

Same attribute names, forward signatures and conventions as upstream: ``patch_embed``, ``time_embed``,
``label_emb`` (class-conditional) or ``context_embed`` (text-to-image), ``pos_embed`` over
``extras + num_patches`` tokens, ``in_blocks`` / ``mid_block`` / ``out_blocks`` (each out block takes
the matching in block's output as a long skip through ``skip_linear``), ``norm``, ``decoder_pred``,
``final_layer``. Conditioning enters as tokens in front of the image tokens: ``extras`` of them
(time, label: 2; time, 77 CLIP tokens: 78). ``forward(x, timesteps, y=None)`` and, for text,
``forward(x, timesteps, context)``. Timesteps are embedded as given (upstream feeds DDPM steps
1..1000, or ``t * 999`` for continuous time). Classifier-free guidance drops labels in the dataset,
not in the model (the class-conditional model has ``num_classes + 1`` rows for the null label when
trained with CFG). ``use_checkpoint`` checkpoints each block's body inside the block, as upstream
(reentrant checkpointing, upstream's default).
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.models.vision_transformer import Mlp
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embeddings of (possibly fractional) timesteps, (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def unpatchify(x: torch.Tensor, channels: int = 3) -> torch.Tensor:
    patch_size = int((x.shape[2] // channels) ** 0.5)
    h = w = int(x.shape[1] ** 0.5)
    return einops.rearrange(x, "B (h w) (p1 p2 C) -> B C (h p1) (w p2)", h=h, w=w, p1=patch_size, p2=patch_size)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = einops.rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(einops.rearrange(x, "B H L D -> B L (H D)"))


class Block(nn.Module):
    """Pre-norm transformer block; out blocks first fuse the long skip with ``skip_linear``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, norm_layer: type = nn.LayerNorm, skip: bool = False,
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint:
            return torch.utils.checkpoint.checkpoint(self._forward, x, skip, use_reentrant=True)
        return self._forward(x, skip)

    def _forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _UViTBody(nn.Module):
    """What the class-conditional and the text-to-image U-ViT share."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, qkv_bias: bool, qk_scale: float | None, norm_layer: type, mlp_time_embed: bool,
                 use_checkpoint: bool, conv: bool, skip: bool, extras: int) -> None:
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.in_chans = in_chans
        self.extras = extras
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.time_embed = (
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
            if mlp_time_embed else nn.Identity()
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, extras + num_patches, embed_dim))
        kw = dict(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                  norm_layer=norm_layer, use_checkpoint=use_checkpoint)
        self.in_blocks = nn.ModuleList([Block(**kw) for _ in range(depth // 2)])
        self.mid_block = Block(**kw)
        self.out_blocks = nn.ModuleList([Block(skip=skip, **kw) for _ in range(depth // 2)])
        self.norm = norm_layer(embed_dim)
        self.patch_dim = patch_size**2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()

    def _init(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

        def init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.LayerNorm):
                nn.init.constant_(m.bias, 0)
                nn.init.constant_(m.weight, 1.0)

        self.apply(init)

    def _time_token(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.time_embed(timestep_embedding(timesteps, self.embed_dim)).unsqueeze(dim=1)

    def _run(self, x: torch.Tensor, num_patches: int) -> torch.Tensor:
        x = x + self.pos_embed
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        x = self.decoder_pred(self.norm(x))
        assert x.size(1) == self.extras + num_patches
        x = unpatchify(x[:, self.extras:, :], self.in_chans)
        return self.final_layer(x)


class UViT(_UViTBody):
    """Class-conditional (``num_classes > 0``) or unconditional U-ViT: ``forward(x, timesteps, y=None)``.

    Tokens: ``[label, time, patches...]`` when conditional (``extras = 2``), else ``[time, patches...]``.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, norm_layer: type = nn.LayerNorm, mlp_time_embed: bool = False,
                 num_classes: int = -1, use_checkpoint: bool = False, conv: bool = True, skip: bool = True) -> None:
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale,
                         norm_layer, mlp_time_embed, use_checkpoint, conv, skip, extras=2 if num_classes > 0 else 1)
        self.num_classes = num_classes
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes, embed_dim)
        self._init()

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(x)
        num_patches = x.shape[1]
        x = torch.cat((self._time_token(timesteps), x), dim=1)
        if y is not None:
            x = torch.cat((self.label_emb(y).unsqueeze(dim=1), x), dim=1)
        return self._run(x, num_patches)


class UViTT2I(_UViTBody):
    """Text-to-image U-ViT (upstream ``libs/uvit_t2i.py``): ``forward(x, timesteps, context)``.

    Tokens: ``[time, context (num_clip_token)..., patches...]``, ``extras = 1 + num_clip_token``.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, norm_layer: type = nn.LayerNorm, mlp_time_embed: bool = False,
                 use_checkpoint: bool = False, clip_dim: int = 768, num_clip_token: int = 77, conv: bool = True,
                 skip: bool = True) -> None:
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale,
                         norm_layer, mlp_time_embed, use_checkpoint, conv, skip, extras=1 + num_clip_token)
        self.context_embed = nn.Linear(clip_dim, embed_dim)
        self._init()

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        num_patches = x.shape[1]
        x = torch.cat((self._time_token(timesteps), self.context_embed(context), x), dim=1)
        return self._run(x, num_patches)
