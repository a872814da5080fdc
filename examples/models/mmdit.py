"""A reference MMDiT in the style of the Stable Diffusion 3 reference code (Stability-AI ``mmditx.py``),
written here.

Same names, structure and conventions as upstream: ``x_embedder`` (patches), ``t_embedder``,
``y_embedder`` (a ``VectorEmbedder`` for pooled vectors, present when ``adm_in_channels`` is set),
``context_embedder`` (``nn.Identity`` or a ``Linear`` from ``context_embedder_config``), optional
``register`` tokens that are prepended to the **context** stream, ``joint_blocks`` of ``JointBlock``
(a ``context_block`` and an ``x_block``, ``DismantledBlock`` each, mixed by ``block_mixing``), each
returning ``(context, x)``; the last block's context block is ``pre_only`` and returns context
``None``. ``forward(x, t, y=None, context=None)`` with ``t = sigma * 1000`` (rectified flow,
``x_t = (1 - sigma) x0 + sigma noise``). Upstream fixes ``hidden_size = 64 * depth`` and
``num_heads = depth``; ``head_dim`` (default 64) keeps that rule and lets tests build tiny models.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch import nn

from .dit import FinalLayer, get_2d_sincos_pos_embed
from .dit import TimestepEmbedder as _DiTTimestepEmbedder


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    if shift is None:
        shift = torch.zeros_like(scale)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, _, dim = q.shape
    q, k, v = (z.view(b, -1, heads, dim // heads).transpose(1, 2) for z in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, -1, dim)


class TimestepEmbedder(_DiTTimestepEmbedder):
    """DiT's timestep embedder; SD3's forward also takes the compute dtype."""

    def forward(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(dtype) if dtype is not None else t_freq)


class VectorEmbedder(nn.Module):
    """A pooled conditioning vector (e.g. pooled text embeddings) -> hidden size."""

    def __init__(self, input_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, pre_only: bool = False,
                 qk_norm: str | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        self.pre_only = pre_only
        if qk_norm == "ln":
            self.ln_q = nn.LayerNorm(self.head_dim, elementwise_affine=True, eps=1e-6)
            self.ln_k = nn.LayerNorm(self.head_dim, elementwise_affine=True, eps=1e-6)
        elif qk_norm is None:
            self.ln_q = nn.Identity()
            self.ln_k = nn.Identity()
        else:
            raise ValueError(f"qk_norm={qk_norm!r} is not accepted: use None or 'ln'")

    def pre_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        q = self.ln_q(q).reshape(b, n, -1)
        k = self.ln_k(k).reshape(b, n, -1)
        return q, k, v.reshape(b, n, -1)

    def post_attention(self, x: torch.Tensor) -> torch.Tensor:
        assert not self.pre_only
        return self.proj(x)


class DismantledBlock(nn.Module):
    """A DiT block with adaLN, split around attention so that two streams can attend jointly."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 pre_only: bool = False, qk_norm: str | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads=num_heads, qkv_bias=qkv_bias, pre_only=pre_only, qk_norm=qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            hidden = int(hidden_size * mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (2 if pre_only else 6) * hidden_size))
        self.pre_only = pre_only

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        if self.pre_only:
            shift_msa, scale_msa = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa)), None
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        qkv = self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa))
        return qkv, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)

    def post_attention(self, attn: torch.Tensor, x: torch.Tensor, gate_msa: torch.Tensor, shift_mlp: torch.Tensor,
                       scale_mlp: torch.Tensor, gate_mlp: torch.Tensor) -> torch.Tensor:
        assert not self.pre_only
        x = x + gate_msa.unsqueeze(1) * self.attn.post_attention(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        (q, k, v), intermediates = self.pre_attention(x, c)
        return self.post_attention(attention(q, k, v, self.attn.num_heads), *intermediates)


def block_mixing(context: torch.Tensor, x: torch.Tensor, context_block: DismantledBlock, x_block: DismantledBlock,
                 c: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Joint attention over ``[context; x]``, then each stream's own MLP. Returns ``(context, x)``."""
    assert context is not None, "block_mixing called with None context"
    context_qkv, context_intermediates = context_block.pre_attention(context, c)
    x_qkv, x_intermediates = x_block.pre_attention(x, c)
    q, k, v = (torch.cat((context_qkv[i], x_qkv[i]), dim=1) for i in range(3))
    attn = attention(q, k, v, x_block.attn.num_heads)
    n_context = context_qkv[0].shape[1]
    context_attn, x_attn = attn[:, :n_context], attn[:, n_context:]
    context = None if context_block.pre_only else context_block.post_attention(context_attn, *context_intermediates)
    return context, x_block.post_attention(x_attn, *x_intermediates)


class JointBlock(nn.Module):
    """One MMDiT layer: ``forward(context, x, c=...) -> (context, x)``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 pre_only: bool = False, qk_norm: str | None = None) -> None:
        super().__init__()
        self.context_block = DismantledBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, pre_only=pre_only, qk_norm=qk_norm)
        self.x_block = DismantledBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, pre_only=False, qk_norm=qk_norm)

    def forward(self, *args, **kwargs):
        return block_mixing(*args, context_block=self.context_block, x_block=self.x_block, **kwargs)


class MMDiT(nn.Module):
    """Multimodal diffusion transformer: ``forward(x, t, y=None, context=None)`` with ``t = sigma * 1000``."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        depth: int = 28,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = False,
        adm_in_channels: int | None = None,
        context_embedder_config: dict | None = None,
        register_length: int = 0,
        out_channels: int | None = None,
        pos_embed_max_size: int | None = None,
        qk_norm: str | None = None,
        qkv_bias: bool = True,
        head_dim: int = 64,
    ) -> None:
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = out_channels if out_channels is not None else (in_channels * 2 if learn_sigma else in_channels)
        self.patch_size = patch_size
        hidden_size = head_dim * depth  # upstream: 64 * depth
        num_heads = depth
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.pos_embed_max_size = pos_embed_max_size or input_size // patch_size

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True,
                                     strict_img_size=pos_embed_max_size is None)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if adm_in_channels is not None:
            self.y_embedder = VectorEmbedder(adm_in_channels, hidden_size)
        self.context_embedder: nn.Module = nn.Identity()
        if context_embedder_config is not None and context_embedder_config["target"] == "torch.nn.Linear":
            self.context_embedder = nn.Linear(**context_embedder_config["params"])
        self.register_length = register_length
        if register_length > 0:
            self.register = nn.Parameter(torch.randn(1, register_length, hidden_size))
        grid = self.pos_embed_max_size
        self.register_buffer("pos_embed", torch.from_numpy(get_2d_sincos_pos_embed(hidden_size, grid)).float().unsqueeze(0))
        self.joint_blocks = nn.ModuleList([
            JointBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, pre_only=i == depth - 1, qk_norm=qk_norm)
            for i in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        for block in self.joint_blocks:
            for half in (block.context_block, block.x_block):
                nn.init.constant_(half.adaLN_modulation[-1].weight, 0)
                nn.init.constant_(half.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def cropped_pos_embed(self, hw: tuple[int, int]) -> torch.Tensor:
        p = self.patch_size
        h, w = hw[0] // p, hw[1] // p
        size = self.pos_embed_max_size
        if h > size or w > size:
            raise ValueError(f"input of {hw[0]}x{hw[1]} needs a {h}x{w} patch grid, more than pos_embed_max_size={size}")
        top, left = (size - h) // 2, (size - w) // 2
        grid = self.pos_embed.reshape(1, size, size, -1)[:, top: top + h, left: left + w, :]
        return grid.reshape(1, h * w, -1)

    def unpatchify(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        c, p = self.out_channels, self.patch_size
        h, w = hw[0] // p, hw[1] // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward_core_with_concat(self, x: torch.Tensor, c_mod: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.register_length > 0:
            registers = self.register.expand(x.shape[0], -1, -1)
            context = registers if context is None else torch.cat((registers, context), 1)
        for block in self.joint_blocks:
            context, x = block(context, x, c=c_mod)
        return self.final_layer(x, c_mod)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        hw = x.shape[-2:]
        x = self.x_embedder(x) + self.cropped_pos_embed(hw)
        c = self.t_embedder(t, dtype=x.dtype)
        if y is not None:
            c = c + self.y_embedder(y)
        if context is not None:
            context = self.context_embedder(context)
        x = self.forward_core_with_concat(x, c, context)
        return self.unpatchify(x, hw)
