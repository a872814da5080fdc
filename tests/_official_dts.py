"""Test-only restatement of the official SRA-DTS step (the SRA authors' ``SiT-SRA_DTS_AS``: ``model.py``,
``loss.py`` ``SRALoss.__call__`` on the ``teacher_mask`` + ``teacher_t="sra"`` branch, ``train.py``), written
here in the upstream's naming to check ``SRADTS`` against, not copied.

What it keeps from the official code, because these are what ``SRADTS`` must reproduce:
- one forward over all T tokens of a batch made of the groups' inputs (``x`` is ``(G*B, C, H, W)``: each
  group's full noisy sample), whose patch tokens are mixed per position by the group ids after the
  patch embedding and positions;
- per-token time ``(B, T)`` embedded token by token, per-token adaLN modulation (``c`` is ``(B, T, D)``);
- attention separated in every block by a boolean ``(B, T, T)`` mask, blocked scores set to the dtype's
  lowest value before the softmax;
- the label embedder drops labels for CFG once per sample in training mode and returns ``(embeddings, labels)``;
- the alignment head ``ap_head`` (Linear(D, 2D) -> SiLU -> Linear(2D, D)) inside the model, applied to block
  ``ad``'s output in training mode only; the teacher (eval mode) returns that block's raw output;
- the losses: ``mean_flat((out_tokens - gt_tokens) ** 2)`` and ``1 - F.cosine_similarity(xr, xr_t)``
  (default ``dim=1`` on ``(B, T, D)``), the alignment averaged and weighted by the caller.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Mlp
from torch import Tensor, nn

from examples.models.dit import get_2d_sincos_pos_embed


def modulate_per_token(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class GroupSeparatedAttention(nn.Module):
    """Multi-head self-attention in which ``separation_mask[b, i, j]`` False forbids token i to see token j."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: Tensor, separation_mask: Tensor | None = None) -> Tensor:
        n, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if separation_mask is not None:
            scores = scores.masked_fill(~separation_mask[:, None], torch.finfo(scores.dtype).min)
        weights = self.attn_drop(scores.softmax(dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(n, tokens, dim)
        return self.proj_drop(self.proj(out))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def positional_embedding(t: Tensor, dim: int, max_period: int = 10000) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.positional_embedding(t, self.frequency_embedding_size).to(t.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: Tensor) -> Tensor:
        drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: Tensor, train: bool) -> tuple[Tensor, Tensor]:
        if train and self.dropout_prob > 0:
            labels = self.token_drop(labels)
        return self.embedding_table(labels), labels


class SiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = GroupSeparatedAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, separation_mask: Tensor | None = None) -> Tensor:
        b, tokens, dim = c.shape
        mod = self.adaLN_modulation(c.reshape(-1, dim)).reshape(b, tokens, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate_per_token(self.norm1(x), shift_msa, scale_msa), separation_mask=separation_mask)
        return x + gate_mlp * self.mlp(modulate_per_token(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        b, tokens, dim = c.shape
        shift, scale = self.adaLN_modulation(c.reshape(-1, dim)).reshape(b, tokens, -1).chunk(2, dim=-1)
        return self.linear(modulate_per_token(self.norm_final(x), shift, scale))


class SimpleHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_dim, in_dim + out_dim)
        self.linear2 = nn.Linear(in_dim + out_dim, out_dim)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.act(self.linear1(x)))


class OfficialSiT(nn.Module):
    """The official SRA-DTS SiT with ``attention_separation=True`` and ``use_alignment_head=True``."""

    def __init__(self, input_size: int = 8, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 32,
                 depth: int = 6, num_heads: int = 2, class_dropout_prob: float = 0.1, num_classes: int = 10) -> None:
        super().__init__()
        self.in_channels = self.out_channels = in_channels
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([SiTBlock(hidden_size, num_heads) for _ in range(depth)])
        self.ap_head = SimpleHead(hidden_size, hidden_size)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        grid = int(self.x_embedder.num_patches ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(hidden_size, grid)).float()[None])

    def patchify(self, imgs: Tensor) -> Tensor:
        p = self.x_embedder.patch_size[0]
        n, c, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: Tensor) -> Tensor:
        c, p = self.out_channels, self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
        return x.reshape(x.shape[0], c, h * p, w * p)

    @staticmethod
    def mix_group_tokens(tokens: Tensor, group_ids: Tensor) -> Tensor:
        """``tokens`` (G, B, T, D): token n of sample b from group ``group_ids[b, n]``."""
        g, b, n, d = tokens.shape
        index = group_ids[:, :, None, None].expand(b, n, 1, d)
        return tokens.permute(1, 2, 0, 3).gather(2, index).squeeze(2)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, ad: int, mask: Tensor, gt: Tensor | None = None,
                return_token: bool = False):
        """Mixed mode only: ``x`` and ``gt`` are ``(G*B, ...)``, ``t`` is ``(B, T)``, ``mask`` the group ids ``(B, T)``."""
        x = self.x_embedder(x) + self.pos_embed
        b = mask.shape[0]
        groups = x.shape[0] // b
        x = self.mix_group_tokens(x.reshape(groups, b, x.shape[1], x.shape[2]), mask)
        separation_mask = mask[:, :, None] == mask[:, None, :]
        gt_token = None
        if gt is not None:
            gt_token = self.mix_group_tokens(self.patchify(gt).reshape(groups, b, x.shape[1], -1), mask)
        _, tokens, dim = x.shape
        t_embed = self.t_embedder(t.reshape(-1)).reshape(b, tokens, -1)
        y_embed, _ = self.y_embedder(y, self.training)
        c = t_embed + y_embed[:, None].expand(-1, tokens, -1)
        xr = None
        for i, block in enumerate(self.blocks):
            x = block(x, c, separation_mask=separation_mask)
            if i + 1 == ad:
                xr = self.ap_head(x) if self.training else x
        x = self.final_layer(x, c)
        if return_token:
            return x, xr, gt_token
        return self.unpatchify(x), xr


def mix_group_scalars(values: list[Tensor], group_ids: Tensor) -> Tensor:
    """Per-token time ``(B, T)``: group g's value ``values[g]`` (``(B,)``) at the tokens of group g."""
    mixed = values[0][:, None].expand_as(group_ids).clone()
    for g in range(1, len(values)):
        mixed = torch.where(group_ids == g, values[g][:, None], mixed)
    return mixed


def official_step(model: OfficialSiT, teacher: OfficialSiT, images: Tensor, noises: Tensor, labels: Tensor,
                  group_ids: Tensor, t: Tensor, s: Tensor, block_out_s: int, block_out_t: int,
                  teacher_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The official step on given groups ``(B, T)``, times ``t`` and teacher times ``s`` ``(B, 2)``:
    ``(denoising loss per sample (B,), alignment loss (B, D))``; the caller weights the mean of the second.
    ``teacher_labels``: what the teacher sees (the official code passes ``labels``, undropped)."""
    shape = (-1,) + (1,) * (images.dim() - 1)
    inputs, targets = [], []
    for g in range(2):
        tg = t[:, g].reshape(shape)
        inputs.append((1 - tg) * images + tg * noises)   # alpha_t * x0 + sigma_t * eps, linear path
        targets.append(-1 * images + 1 * noises)          # d_alpha_t * x0 + d_sigma_t * eps
    out, xr, gt_token = model(torch.cat(inputs), mix_group_scalars([t[:, 0], t[:, 1]], group_ids), labels,
                              ad=block_out_s, mask=group_ids, gt=torch.cat(targets), return_token=True)
    denoising = ((out - gt_token) ** 2).mean(dim=list(range(1, out.dim())))
    teacher_inputs = []
    for g in range(2):
        sg = s[:, g].reshape(shape)
        teacher_inputs.append((1 - sg) * images + sg * noises)
    with torch.no_grad():
        xr_t = teacher(torch.cat(teacher_inputs), mix_group_scalars([s[:, 0], s[:, 1]], group_ids),
                       labels if teacher_labels is None else teacher_labels, ad=block_out_t, mask=group_ids)[1]
    return denoising, 1 - F.cosine_similarity(xr, xr_t)
