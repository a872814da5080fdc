"""Every diffusers family, one parametrized test each (timm's discipline), on tiny random models.

For each family: the adapter resolves with no registration; every block's tokens are the image
stream's values (the image part of what the next block, or the final norm, receives: located here
from the test's own constants, the text length and the image grid), shape ``(B, N_img, D)``; the
teacher runs blocks ``1..L_t`` once and nothing after; the SRA loss reaches the head and blocks
``1..L_s`` only; no fallback warning when the training forward ran first with the same objects; one
finite optimizer step. Then ``patchify``: the model's own unpatchify, fed ``patchify(model, x0)`` in
place of its final projection's image tokens, gives back ``x0``.

Also: the unknown-model suggestion on a made-up two-stream model, and the backbone table of docs/backbones.md
against the registry.
"""

from __future__ import annotations

import inspect
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import diffusers
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sra_plugin.adapters.diffusers as fam
from sra_plugin import LatentAlignment, SelfRepresentationAlignment, resolve_adapter
from sra_plugin.registry import ModelCall, registered_adapters, unknown_model_error
from tests._models import has_grad

B, T = 2, 5  # batch, text tokens
G = 16  # image tokens of an 8x8 latent with 2x2 patches


def randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


@dataclass
class Case:
    cls: str
    config: dict
    adapter: str
    depth: int
    x: tuple[int, ...]  # the model's input x, less the batch
    n: int  # image tokens
    cond: Callable[[torch.Generator], dict]
    image: Callable[[torch.Tensor], torch.Tensor]  # the image tokens of a block's (or the final norm's) input
    final: str = "norm_out"  # the module after the last block (its first input is the last block's stream)
    proj: str | None = "proj_out"  # the final projection (its output: the tokens unpatchify reads); None: no patchify
    t_scale: float = 1.0
    place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # tokens into proj's output
    sample: Callable[[Any], torch.Tensor] = lambda out: out.sample

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        model = getattr(diffusers, self.cls)(**self.config)
        with torch.no_grad():  # diffusers zero-initialises gates and output layers: give every block something to do
            for p in model.parameters():
                if p.dim() >= 1 and p.abs().sum() == 0:
                    p.normal_(std=0.05)
        return model


def whole(x: torch.Tensor) -> torch.Tensor:
    assert x.shape[1] == G, x.shape
    return x


def after(prefix: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[prefix tokens; image]`` (or the image alone)."""
    return lambda x: x if x.shape[1] == G else x[:, prefix:prefix + G]


def first(n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[image; anything]``: the first n."""
    return lambda x: x[:, :n]


LUMINA_CAPTION = (5, 3)  # caption lengths per sample (encoder_attention_mask sums)


def lumina_image(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == G:
        return x
    return torch.stack([x[i, c:c + G] for i, c in enumerate(LUMINA_CAPTION)])


def lumina_place(out: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    out = out.clone()
    for i, c in enumerate(LUMINA_CAPTION):
        out[i, c:c + G] = tokens[i]
    return out


def head_place(out: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([tokens, out[:, tokens.shape[1]:]], dim=1)


def ids(*axes: int) -> torch.Tensor:
    """Position ids of a (1, 4, 4) grid, ``len(axes)`` columns."""
    grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(G, 3)
    return torch.cat([grid, torch.zeros(G, len(axes) - 3)], 1) if len(axes) > 3 else grid


def text(dim: int = 16) -> Callable[[torch.Generator], dict]:
    return lambda g: dict(encoder_hidden_states=randn(B, T, dim, g=g))


def text_mask(dim: int = 16, **extra: Any) -> Callable[[torch.Generator], dict]:
    return lambda g: dict(encoder_hidden_states=randn(B, T, dim, g=g), encoder_attention_mask=torch.ones(B, T), **extra)


CASES: dict[str, Case] = {
    "sd3": Case("SD3Transformer2DModel", dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=8, out_channels=4,
                pos_embed_max_size=8), "diffusers-sd3", 3, (4, 8, 8), G,
                lambda g: dict(encoder_hidden_states=randn(B, T, 16, g=g), pooled_projections=randn(B, 8, g=g)), whole, t_scale=1000.0),
    "flux": Case("FluxTransformer2DModel", dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
                 num_attention_heads=4, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)),
                 "diffusers-flux", 4, (G, 4), G,
                 lambda g: dict(encoder_hidden_states=randn(B, T, 16, g=g), pooled_projections=randn(B, 8, g=g), img_ids=ids(0, 0, 0),
                                txt_ids=torch.zeros(T, 3)), whole),
    "flux2": Case("Flux2Transformer2DModel", dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4),
                  guidance_embeds=False), "diffusers-flux2", 3, (G, 4), G,
                  lambda g: dict(encoder_hidden_states=randn(B, T, 16, g=g), img_ids=ids(0, 0, 0, 0), txt_ids=torch.zeros(T, 4)), after(T)),
    "chroma": Case("ChromaTransformer2DModel", dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
                   approximator_hidden_dim=16, approximator_layers=1), "diffusers-chroma", 3, (G, 4), G,
                   lambda g: dict(encoder_hidden_states=randn(B, T, 16, g=g), img_ids=ids(0, 0, 0), txt_ids=torch.zeros(T, 3)), after(T)),
    "qwenimage": Case("QwenImageTransformer2DModel", dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                      num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6)), "diffusers-qwenimage", 2, (G, 16), G,
                      lambda g: dict(encoder_hidden_states=randn(B, T, 16, g=g), encoder_hidden_states_mask=torch.ones(B, T),
                                     img_shapes=[[(1, 4, 4)]] * B), whole),
    "auraflow": Case("AuraFlowTransformer2DModel", dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                     num_single_dit_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                     caption_projection_dim=32, out_channels=4, pos_embed_max_size=64), "diffusers-auraflow", 3, (4, 8, 8), G,
                     text(), after(8 + T)),
    "hidream": Case("HiDreamImageTransformer2DModel", dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=2,
                    attention_head_dim=8, num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2,
                    num_activated_experts=1, axes_dims_rope=(2, 2, 4), max_resolution=(8, 8), llama_layers=[0, 1, 2]),
                    "diffusers-hidream", 3, (4, 8, 8), G,
                    lambda g: dict(encoder_hidden_states_t5=randn(B, T, 8, g=g), encoder_hidden_states_llama3=randn(3, B, T, 4, g=g),
                                   pooled_embeds=randn(B, 8, g=g)), first(G), final="final_layer", proj="final_layer.linear"),
    "hunyuanimage": Case("HunyuanImageTransformer2DModel", dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                         num_layers=1, num_single_layers=2, num_refiner_layers=1, patch_size=(2, 2), text_embed_dim=16,
                         rope_axes_dim=(8, 8)), "diffusers-hunyuanimage", 3, (4, 8, 8), G, text_mask(), whole, t_scale=1000.0),
    "cogview4": Case("CogView4Transformer2DModel", dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                     num_attention_heads=2, text_embed_dim=16, time_embed_dim=16, condition_dim=4, pos_embed_max_size=8, sample_size=8,
                     rope_axes_dim=(8, 8)), "diffusers-cogview4", 2, (4, 8, 8), G,
                     lambda g: dict(encoder_hidden_states=randn(B, T, 16, g=g), original_size=torch.full((B, 2), 64.0),
                                    target_size=torch.full((B, 2), 64.0), crop_coords=torch.zeros(B, 2)), whole, t_scale=1000.0),
    "sana": Case("SanaTransformer2DModel", dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                 num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=16, sample_size=8,
                 patch_size=2), "diffusers-sana", 2, (4, 8, 8), G, text(), whole, t_scale=1000.0),
    "lumina2": Case("Lumina2Transformer2DModel", dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
                    num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 6, 6),
                    axes_lens=(32, 32, 32), cap_feat_dim=16), "diffusers-lumina2", 3, (4, 8, 8), G,
                    lambda g: dict(encoder_hidden_states=randn(B, T, 16, g=g),
                                   encoder_attention_mask=torch.arange(T)[None] < torch.tensor(LUMINA_CAPTION)[:, None]),
                    lumina_image, proj="norm_out", place=lumina_place),
    "zimage": Case("ZImageTransformer2DModel", dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                   n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32]),
                   "diffusers-zimage", 3, (4, 1, 8, 8), G,
                   lambda g: dict(cap_feats=[randn(T, 16, g=g), randn(T - 2, 16, g=g)]), first(G),
                   final="all_final_layer.2-1", proj="all_final_layer.2-1", place=head_place,
                   sample=lambda out: torch.stack(out.sample)),
    "pixart": Case("PixArtTransformer2DModel", dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
                   sample_size=8, patch_size=2, cross_attention_dim=32, caption_channels=16, use_additional_conditions=False),
                   "diffusers-pixart", 2, (4, 8, 8), G,
                   lambda g: dict(encoder_hidden_states=randn(B, T, 16, g=g), added_cond_kwargs={"resolution": None, "aspect_ratio": None}),
                   whole, t_scale=1000.0),
    "dit": Case("DiTTransformer2DModel", dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
                sample_size=8, patch_size=2, num_embeds_ada_norm=10), "diffusers-dit", 2, (4, 8, 8), G,
                lambda g: dict(class_labels=torch.randint(0, 10, (B,), generator=g)), whole, proj="proj_out_2", t_scale=1000.0),
    # video: 2 latent frames of 8x8
    "wan": Case("WanTransformer3DModel", dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32), "diffusers-wan", 2,
                (4, 2, 8, 8), 2 * G, text(), lambda x: x, t_scale=1000.0),
    "skyreels-v2": Case("SkyReelsV2Transformer3DModel", dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                        in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
                        "diffusers-skyreels-v2", 2, (4, 2, 8, 8), 2 * G, text(), lambda x: x, t_scale=1000.0),
    "hunyuanvideo": Case("HunyuanVideoTransformer3DModel", dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                         num_layers=1, num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=False,
                         text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)), "diffusers-hunyuanvideo", 3,
                         (4, 2, 8, 8), 2 * G, text_mask(pooled_projections=torch.ones(B, 8)), lambda x: x, t_scale=1000.0),
    "ltx": Case("LTXVideoTransformer3DModel", dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                attention_head_dim=16, cross_attention_dim=32, num_layers=2, caption_channels=16), "diffusers-ltx", 2, (2 * G, 8), 2 * G,
                lambda g: dict(encoder_hidden_states=randn(B, T, 16, g=g), encoder_attention_mask=torch.ones(B, T), num_frames=2,
                               height=4, width=4), lambda x: x, t_scale=1000.0),
    "cogvideox": Case("CogVideoXTransformer3DModel", dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                      time_embed_dim=16, text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
                      max_text_seq_length=T), "diffusers-cogvideox", 2, (2, 4, 8, 8), 2 * G, text(), lambda x: x,
                      final="norm_final", t_scale=1000.0),
    "mochi": Case("MochiTransformer3DModel", dict(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                  pooled_projection_dim=16, in_channels=4, out_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=T),
                  "diffusers-mochi", 2, (4, 2, 8, 8), 2 * G, text_mask(), lambda x: x, t_scale=1000.0),
}


def inputs(case: Case, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x0, noise = randn(B, *case.x, g=g), randn(B, *case.x, g=g)
    t = torch.rand(B, generator=g) * 0.6 + 0.3
    s = t - 0.2 * torch.rand(B, generator=g)
    return x0, 0.8 * x0 + t.view(-1, *[1] * len(case.x)) * noise, 0.8 * x0 + s.view(-1, *[1] * len(case.x)) * noise, \
        t * case.t_scale, s * case.t_scale, case.cond(g)


def call(case: Case, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> Any:
    adapter = resolve_adapter(model)
    return model(**{adapter.x_key: x, adapter.t_key: t}, **cond)


def submodule(model: nn.Module, path: str) -> nn.Module:
    return dict(model.named_modules())[path]


def stream_in(args: tuple, kwargs: dict) -> torch.Tensor:
    for key in ("hidden_states", "x"):
        if key in kwargs:
            return kwargs[key]
    return args[0]


@pytest.mark.parametrize("name", list(CASES))
def test_family(name: str) -> None:
    case = CASES[name]
    start = time.perf_counter()
    model = case.build()
    adapter = resolve_adapter(model)
    assert adapter.name == case.adapter
    blocks = adapter.blocks(model)
    assert len(blocks) == case.depth
    x0, x_t, x_s, t, s, cond = inputs(case)
    dim = adapter.dim(model, blocks[0])

    # Every block's tokens are the image stream: what the next block (or the final norm) gets of it.
    model.eval()
    outputs: dict[int, Any] = {}
    streams: dict[int, torch.Tensor] = {}
    calls: list[ModelCall] = []
    consumers = [*blocks[1:], submodule(model, case.final)]
    handles = [model.register_forward_pre_hook(lambda m, a, k: calls.append(ModelCall(a, k)) and None, with_kwargs=True)]
    def keep_output(k: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            outputs.setdefault(k, output)
        return hook

    def keep_input(k: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            streams.setdefault(k, stream_in(args, kwargs).clone())
        return hook

    for k, (block, nxt) in enumerate(zip(blocks, consumers)):
        handles.append(block.register_forward_hook(keep_output(k)))
        handles.append(nxt.register_forward_pre_hook(keep_input(k), with_kwargs=True))
    with torch.no_grad():
        call(case, model, x_t, t, cond)
    for h in handles:
        h.remove()
    assert len(calls) == 1 and len(outputs) == case.depth
    for k in range(case.depth):
        tokens = adapter.tokens(outputs[k], model, calls[0])
        expected = case.image(streams[k]).to(tokens.dtype)
        assert tokens.shape == (B, case.n, dim), f"block {k + 1}: {tuple(tokens.shape)}"
        assert torch.allclose(tokens, expected, atol=1e-5), f"block {k + 1}: not the image stream"

    # Training: the user's forward first, then sra with the same objects.
    student, teacher = 1, case.depth - (1 if case.depth > 2 else 0)
    sra = SelfRepresentationAlignment(model, student_layer=student, teacher_layer=teacher)
    model.train()
    opt = torch.optim.AdamW([*model.parameters(), *sra.head.parameters()], lr=1e-3)
    out = case.sample(call(case, model, x_t, t, cond))
    teacher_blocks = adapter.blocks(sra.teacher)
    counts = [0] * case.depth
    handles = [b.register_forward_hook(lambda m, a, o, i=i: counts.__setitem__(i, counts[i] + 1) and None) for i, b in enumerate(teacher_blocks)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = sra(model, x_t, x_s, t, s, **cond)
    for h in handles:
        h.remove()
    assert counts == [1] * teacher + [0] * (case.depth - teacher)
    assert sra.student_reruns == 0  # the training forward's capture was reused: no fallback, no warning
    assert not [w for w in caught if "SelfRepresentationAlignment" in str(w.message)]
    assert loss.shape == () and bool(torch.isfinite(loss)) and float(loss.detach()) > 0

    # The SRA loss reaches the head and blocks 1..L_s only.
    opt.zero_grad()
    loss.backward(retain_graph=True)
    assert has_grad(sra.head)
    for k, block in enumerate(blocks, start=1):
        assert has_grad(block) == (k <= student), f"block {k}"
    assert not has_grad(submodule(model, case.final)) and (case.proj is None or not has_grad(submodule(model, case.proj)))

    opt.zero_grad()
    (F.mse_loss(out.float(), torch.zeros_like(out.float())) + loss).backward()
    opt.step()
    sra.update_teacher()
    for module in (model, sra.head, sra.teacher):
        assert all(bool(torch.isfinite(p).all()) for p in module.parameters())
    sra.remove()
    assert time.perf_counter() - start < 10  # each tiny model runs in well under a second a pass


@pytest.mark.parametrize("name", list(CASES))
def test_patchify_inverts_the_models_unpatchify(name: str) -> None:
    """Fed ``patchify(model, x0)`` as its final projection's image tokens, the model returns ``x0``."""
    case = CASES[name]
    model = case.build().eval()
    adapter = resolve_adapter(model)
    x0, x_t, _, t, _, cond = inputs(case)
    target = adapter.patchify(model, x0)
    assert target.shape[:2] == (B, case.n)

    def replace(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        assert output.shape[-1] == target.shape[-1]
        return case.place(output, target) if case.place else target

    handle = submodule(model, case.proj).register_forward_hook(replace)
    with torch.no_grad():
        out = case.sample(call(case, model, x_t, t, cond))
    handle.remove()
    assert out.shape == x0.shape and torch.equal(out, x0)


def test_patchify_refuses_a_latent_of_another_layout() -> None:
    flux = CASES["flux"].build()
    with pytest.raises(ValueError, match=r"x0 of shape \(2, 4, 4, 4\) is not accepted for FluxTransformer2DModel.*\(B, N, 4\)"):
        resolve_adapter(flux).patchify(flux, torch.randn(2, 4, 4, 4))
    cog = CASES["cogvideox"].build()
    with pytest.raises(ValueError, match=r"use \(B, F, C, H, W\)"):
        resolve_adapter(cog).patchify(cog, torch.randn(2, 4, 8, 8))


def test_every_family_of_the_issue_is_served() -> None:
    served = {a.class_name for a in fam.FAMILIES}
    assert served == {CASES[name].cls for name in CASES}
    assert len(served) == 20


# ---------------------------------------------------------------- the unknown-model suggestion
class Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.attn(h, h, h)[0] + self.mlp(h)


class TwoStream(nn.Module):
    """Made up: a projection list defined first, a text refiner, two double blocks, one single block, one last block."""

    def __init__(self) -> None:
        super().__init__()
        self.caption_projection = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)) for _ in range(4)])
        self.context_refiner = nn.ModuleList([Block() for _ in range(2)])
        self.double_blocks = nn.ModuleList([Block() for _ in range(2)])
        self.single_blocks = nn.ModuleList([Block()])
        self.final_blocks = nn.ModuleList([Block()])
        self.out = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        for block in [*self.double_blocks, *self.single_blocks, *self.final_blocks]:
            x = block(x + t[:, None, None])
        return self.out(x)


def test_unknown_model_suggestion_lists_every_block_list_in_order() -> None:
    message = str(unknown_model_error(TwoStream()))
    assert "blocks=['double_blocks', 'single_blocks', 'final_blocks']" in message
    proposed = message.split("register_adapter(")[1]
    assert "caption_projection" not in proposed and "context_refiner" not in proposed
    assert "caption_projection" in message and "context_refiner" in message  # listed, as not proposed


@pytest.mark.parametrize("name", ["flux2", "hidream", "auraflow", "lumina2", "hunyuanvideo", "wan"])
def test_unknown_model_suggestion_on_diffusers_models_matches_the_adapter(name: str) -> None:
    """With no adapter, what the error proposes is exactly the adapter's block lists."""
    case = CASES[name]
    model = case.build()
    adapter = resolve_adapter(model)
    message = str(unknown_model_error(model))
    lists = list(adapter.block_lists)
    expected = f"blocks={lists[0]!r}" if len(lists) == 1 else f"blocks={lists!r}"
    assert expected in message.split("register_adapter(")[1], message


# ---------------------------------------------------------------- docs/backbones.md
def readme_rows() -> list[list[str]]:
    text = (Path(__file__).resolve().parent.parent / "docs" / "backbones.md").read_text()
    section = text.split("## Supported backbones")[1].split("\n## ")[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|") and not line.startswith("| ---") and not line.startswith("| backbone")]


def test_readme_backbone_table_matches_the_registry() -> None:
    rows = readme_rows()
    in_table = [name for row in rows for name in re.findall(r"`([\w-]+)`", row[1]) if name != "register_adapter"]
    assert sorted(set(in_table)) == sorted(a.name for a in registered_adapters()), "docs/backbones.md table vs registry"
    by_name = {a.name: a for a in fam.FAMILIES}
    for row in rows:
        names = [n for n in re.findall(r"`([\w-]+)`", row[1]) if n in by_name]
        if not names:
            continue
        adapter = by_name[names[0]]
        assert f"`{adapter.class_name}`" in row[0], row
        calls = re.findall(r"`(sra\(model, x_t, x_s, t, s[^`]*)`", row[2])
        assert calls, row
        params = inspect.signature(getattr(diffusers, adapter.class_name).forward).parameters
        for keyword in re.findall(r"(\w+)=", calls[0]):
            assert keyword in params and keyword not in (adapter.x_key, adapter.t_key), (adapter.name, keyword)


def test_zimage_batch_of_mixed_sizes_is_refused() -> None:
    case = CASES["zimage"]
    model = case.build()
    sra = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=2)
    x = [torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 4)]
    with pytest.raises(ValueError, match=r"x= holds images of 2 different sizes"):
        resolve_adapter(model).num_image_tokens(model, ModelCall((), dict(x=x)))
    sra.remove()


@pytest.mark.parametrize("name", list(CASES))
def test_latent_alignment_on_every_family(name: str) -> None:
    """SRA 2 on each family: the head's width comes from the patch embedder and matches patchify, the
    user's forward is reused, and the loss is the hand-computed one on patchify(x0)."""
    case = CASES[name]
    model = case.build().train()
    align = LatentAlignment(model, layer=1, head="linear", weight=1.0)
    x0, x_t, _, t, _, cond = inputs(case)
    target = align.adapter.patchify(model, x0)
    assert align.target_dim == target.shape[-1]
    kept = {}
    def keep(module: nn.Module, args: tuple, output: Any) -> None:
        kept.setdefault("out", output)

    handle = align.adapter.blocks(model)[0].register_forward_hook(keep)
    call(case, model, x_t, t, cond)
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = align(model, x_t, x0, t, **cond)
    tokens = align.adapter.tokens(kept["out"], model, ModelCall((), {align.adapter.x_key: x_t, align.adapter.t_key: t, **cond}))
    want = F.smooth_l1_loss(align.head(tokens).float(), target.float(), beta=0.05)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert align.student_reruns == 0
    loss.backward()
    assert has_grad(align.head)


def test_return_dict_false_is_the_same_forward_as_sras() -> None:
    """Training scripts call ``model(..., return_dict=False)[0]``; the capture must reuse that forward."""
    case = CASES["flux"]
    model = case.build().train()
    sra = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=2)
    _, x_t, x_s, t, s, cond = inputs(case)
    model(hidden_states=x_t, timestep=t, return_dict=False, **cond)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sra(model, x_t, x_s, t, s, **cond)
    assert sra.student_reruns == 0
