"""Every built-in adapter, one parametrized test (timm's discipline): depth, image-token shapes at the
student and teacher blocks, the teacher stopping after block L_t, reuse of the training forward's
capture, where the gradient goes, and one optimizer step that leaves everything finite.

The backbones are tiny (width 32, 8x8 inputs, 16 image tokens); diffusers models are built from
random configs (nothing is downloaded). Also here: diffusers Flux's older single blocks (one
``[text; image]`` tensor) against the current tuple form, and what the teacher sees on diffusers DiT.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from examples.models import MMDiT, SiT, UViT, UViTT2I
from examples.models.dit import DiT
from sra_plugin import SelfRepresentationAlignment, resolve_adapter
from sra_plugin.capture import run_until
from tests._models import TINY, has_grad, randomise_gates

B, N, D = 3, 16, 32  # batch, image tokens (8x8 input, patch 2), width


# ---------------------------------------------------------------- backbones not in examples/
class RepaSiT(SiT):
    """SiT as in the REPA / SRA code: forward returns ``(x, zs)`` (projected features of a block)."""

    def __init__(self, encoder_depth: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.encoder_depth = encoder_depth
        self.projectors = nn.ModuleList([nn.Linear(self.blocks[0].norm1.normalized_shape[0], 8)])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_logvar: bool = False):
        n = x.shape[0]
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        zs = []
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if i + 1 == self.encoder_depth:
                zs = [p(x.reshape(-1, x.shape[-1])).reshape(n, x.shape[1], -1) for p in self.projectors]
        return self.unpatchify(self.final_layer(x, c)), zs


class LightningDiTLike(DiT):
    """LightningDiT's forward: ``forward(x, t=None, y=None)``; ``use_checkpoint`` wraps every block in a
    reentrant checkpoint (``checkpoint(block, x, c, use_reentrant=True)``), as upstream."""

    def __init__(self, use_checkpoint: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=True) if self.use_checkpoint else block(x, c)
        x = self.unpatchify(self.final_layer(x, c))
        return x.chunk(2, dim=1)[0] if self.learn_sigma else x


class TimeViT(VisionTransformer):
    """A timm ViT as a denoiser: a time embedding added to every token, patches decoded linearly.
    Blocks run through ``checkpoint_seq`` under ``set_grad_checkpointing()``, as in timm's own forward."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.time_mlp = nn.Sequential(nn.Linear(16, self.embed_dim), nn.SiLU(), nn.Linear(self.embed_dim, self.embed_dim))
        self.decoder = nn.Linear(self.embed_dim, 2 * 2 * 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8) / 8)
        t_emb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
        x = self._pos_embed(self.patch_embed(x)) + self.time_mlp(t_emb)[:, None]
        x = checkpoint_seq(self.blocks, x) if self.grad_checkpointing else self.blocks(x)
        x = self.decoder(self.norm(x)[:, self.num_prefix_tokens:])
        return x.reshape(x.shape[0], 4, 4, 2, 2, 4).permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], 4, 8, 8)


class OldFluxSingleTransformerBlock(FluxSingleTransformerBlock):
    """diffusers < 0.35: a single block takes and returns one ``[text; image]`` tensor."""

    def forward(self, hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        _, out = super().forward(hidden_states, hidden_states[:, :0], temb, image_rotary_emb, joint_attention_kwargs)
        return out


class OldFlux(FluxTransformer2DModel):
    """``FluxTransformer2DModel`` with the pre-0.35 forward: text and image are concatenated before the
    single blocks and the image part is sliced off after them."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for block in self.single_transformer_blocks:
            block.__class__ = OldFluxSingleTransformerBlock

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                img_ids=None, txt_ids=None, guidance=None, joint_attention_kwargs=None, return_dict=True):
        hidden_states = self.x_embedder(hidden_states)
        temb = self.time_text_embed(timestep.to(hidden_states.dtype) * 1000, pooled_projections)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        rotary = self.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb, image_rotary_emb=rotary
            )
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        for block in self.single_transformer_blocks:
            hidden_states = block(hidden_states=hidden_states, temb=temb, image_rotary_emb=rotary)
        hidden_states = hidden_states[:, encoder_hidden_states.shape[1]:]
        return Transformer2DModelOutput(sample=self.proj_out(self.norm_out(hidden_states, temb)))


# ---------------------------------------------------------------- cases
@dataclass
class Case:
    """A backbone at test size and how a user's training loop calls it."""

    build: Callable[..., nn.Module]
    adapter: str
    depth: int
    student: int
    teacher: int
    times: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]  # t, s in the model's convention
    cond: Callable[[torch.Generator], tuple[tuple, dict]] = lambda g: ((), {})
    shape: tuple[int, ...] = (4, 8, 8)  # the model's input x
    keywords: bool = False  # diffusers: model(hidden_states=x, timestep=t, **kwargs)
    no_time: bool = False  # a plain timm ViT: model(x)
    build_kwargs: dict = field(default_factory=dict)

    def call(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        if self.keywords:
            return model(hidden_states=x, timestep=t, **kwargs).sample
        out = model(x, *args, **kwargs) if self.no_time else model(x, t, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def ddpm(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(300, 1000, (B,), generator=g)
    return t, t - torch.randint(0, 200, (B,), generator=g)


def unit(scale: float) -> Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    def times(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.rand(B, generator=g) * 0.7 + 0.3
        return t * scale, (t - 0.2 * torch.rand(B, generator=g)) * scale
    return times


def labels(g: torch.Generator) -> tuple[tuple, dict]:
    return (torch.randint(0, 10, (B,), generator=g),), {}


def seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return fn()
    return build


def random_diffusers(model: nn.Module) -> nn.Module:
    # diffusers zero-initialises some output and gate layers; give every block something to do.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1 and p.abs().sum() == 0:
                p.normal_(std=0.05)
    return model


FLUX = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=3, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))


def flux_cond(g: torch.Generator) -> tuple[tuple, dict]:
    return (), dict(encoder_hidden_states=torch.randn(B, 5, 16, generator=g), pooled_projections=torch.randn(B, 8, generator=g),
                    img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(N, 3),
                    txt_ids=torch.zeros(5, 3))


CASES = {
    "dit": Case(seeded(lambda: randomise_gates(DiT(**TINY))), "dit", 6, 2, 4, ddpm, labels),
    "sit": Case(seeded(lambda: randomise_gates(SiT(**TINY))), "dit", 6, 2, 4, unit(1.0), labels),
    "sit-repa": Case(seeded(lambda: randomise_gates(RepaSiT(**TINY))), "dit", 6, 2, 4, unit(1.0), labels),
    "lightningdit": Case(seeded(lambda: randomise_gates(LightningDiTLike(**{**TINY, "learn_sigma": False}))), "dit", 6, 2, 4, unit(1.0), labels),
    "uvit": Case(seeded(lambda: UViT(img_size=8, patch_size=2, in_chans=4, embed_dim=D, depth=4, num_heads=2, num_classes=11)),
                 "uvit", 5, 2, 4, ddpm, lambda g: ((torch.randint(0, 11, (B,), generator=g),), {})),
    "uvit-t2i": Case(seeded(lambda: UViTT2I(img_size=8, patch_size=2, in_chans=4, embed_dim=D, depth=4, num_heads=2, clip_dim=16, num_clip_token=5)),
                     "uvit", 5, 2, 4, ddpm, lambda g: ((torch.randn(B, 5, 16, generator=g),), {})),
    "mmdit": Case(seeded(lambda: randomise_gates(MMDiT(input_size=8, patch_size=2, in_channels=4, depth=4, head_dim=8, adm_in_channels=6,
                                                       context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 16, "out_features": D}},
                                                       register_length=2))),
                  "mmdit", 4, 2, 3, unit(1000.0),
                  lambda g: ((), dict(y=torch.randn(B, 6, generator=g), context=torch.randn(B, 5, 16, generator=g)))),
    "diffusers-sd3": Case(seeded(lambda: random_diffusers(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=16,
        caption_projection_dim=D, pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8))),
        "diffusers-sd3", 4, 2, 3, unit(1000.0),
        lambda g: ((), dict(encoder_hidden_states=torch.randn(B, 5, 16, generator=g), pooled_projections=torch.randn(B, 8, generator=g))),
        keywords=True),
    "diffusers-flux": Case(seeded(lambda: random_diffusers(FluxTransformer2DModel(**FLUX))), "diffusers-flux", 5, 3, 4, unit(1.0), flux_cond,
                           shape=(N, 4), keywords=True),
    "diffusers-flux-old": Case(seeded(lambda: random_diffusers(OldFlux(**FLUX))), "diffusers-flux", 5, 3, 4, unit(1.0), flux_cond,
                               shape=(N, 4), keywords=True),
    "diffusers-dit": Case(seeded(lambda: random_diffusers(DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=4, sample_size=8, patch_size=2,
        num_embeds_ada_norm=10))),
        "diffusers-dit", 4, 2, 3, ddpm, lambda g: ((), dict(class_labels=torch.randint(0, 10, (B,), generator=g))), keywords=True),
    "diffusers-pixart": Case(seeded(lambda: random_diffusers(PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=4, sample_size=8, patch_size=2,
        cross_attention_dim=D, caption_channels=16, use_additional_conditions=False))),
        "diffusers-pixart", 4, 2, 3, ddpm,
        lambda g: ((), dict(encoder_hidden_states=torch.randn(B, 5, 16, generator=g), added_cond_kwargs={"resolution": None, "aspect_ratio": None})),
        keywords=True),
    "timm-vit": Case(seeded(lambda: TimeViT(img_size=8, patch_size=2, in_chans=4, embed_dim=D, depth=5, num_heads=2, num_classes=0,
                                            reg_tokens=1, global_pool="")),
                     "timm-vit", 5, 2, 4, unit(1000.0)),
    "timm-vit-plain": Case(seeded(lambda: VisionTransformer(img_size=8, patch_size=2, in_chans=4, embed_dim=D, depth=5, num_heads=2,
                                                            num_classes=0, global_pool="")),
                           "timm-vit", 5, 2, 4, unit(1000.0), no_time=True),
}


def inputs(case: Case, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *case.shape, generator=g)
    noise = torch.randn(B, *case.shape, generator=g)
    t, s = case.times(g)
    args, kwargs = case.cond(g)
    return x0 + 0.8 * noise, x0 + 0.5 * noise, x0, t, s, args, kwargs


def count_calls(blocks: list[nn.Module]) -> tuple[list[int], list]:
    counts = [0] * len(blocks)
    handles = []
    for i, block in enumerate(blocks):
        def hook(module, args, output, i=i):
            counts[i] += 1
        handles.append(block.register_forward_hook(hook))
    return counts, handles


@pytest.mark.parametrize("name", list(CASES))
def test_adapter(name: str) -> None:
    case = CASES[name]
    model = case.build()
    adapter = resolve_adapter(model)
    assert adapter.name == case.adapter
    blocks = adapter.blocks(model)
    assert len(blocks) == case.depth
    x_t, x_s, x0, t, s, args, kwargs = inputs(case)

    sra = SelfRepresentationAlignment(model, student_layer=case.student, teacher_layer=case.teacher, head="mlp")
    assert (sra.depth, sra.student_layer, sra.teacher_layer) == (case.depth, case.student, case.teacher)
    for k in (case.student, case.teacher, case.depth):
        assert adapter.dim(model, blocks[k - 1]) == D
        with torch.no_grad():
            tokens = run_until(model, blocks[k - 1], adapter, x_t, t, args, kwargs)
        assert tokens.shape == (B, N, D), f"block {k}"

    # The training forward feeds the student; sra(...) runs only the teacher, up to block L_t.
    model.train()
    opt = torch.optim.AdamW([*model.parameters(), *sra.head.parameters()], lr=1e-3)
    pred = case.call(model, x_t, t, args, kwargs)
    student_calls, h1 = count_calls(blocks)
    teacher_calls, h2 = count_calls(adapter.blocks(sra.teacher))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = sra(model, x_t, x_s, t, s, *args, **kwargs)
    for h in h1 + h2:
        h.remove()
    assert not [w for w in caught if "SelfRepresentationAlignment" in str(w.message)]
    assert student_calls == [0] * case.depth
    assert teacher_calls == [1] * case.teacher + [0] * (case.depth - case.teacher)
    assert loss.shape == () and bool(torch.isfinite(loss)) and float(loss.detach()) > 0

    # The SRA loss alone reaches the head and blocks 1..L_s, and no later block.
    opt.zero_grad()
    loss.backward(retain_graph=True)
    assert has_grad(sra.head)
    for k, block in enumerate(blocks, start=1):
        assert has_grad(block) == (k <= case.student), f"block {k}"
    assert all(p.grad is None for p in sra.teacher.parameters())

    # One full step: finite everywhere, and the teacher follows.
    opt.zero_grad()
    target = x0 if pred.shape == x0.shape else torch.zeros_like(pred)
    total = F.mse_loss(pred, target) + loss
    total.backward()
    opt.step()
    before = [p.clone() for p in sra.teacher.parameters()]
    sra.update_teacher()
    for module in (model, sra.head, sra.teacher):
        assert all(bool(torch.isfinite(p).all()) for p in module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, sra.teacher.parameters()))
    pred = case.call(model, x_t, t, args, kwargs)
    assert bool(torch.isfinite(sra(model, x_t, x_s, t, s, *args, **kwargs)))
    sra.remove()


def test_flux_old_single_blocks_give_the_same_image_tokens() -> None:
    """The older single-tensor ``[text; image]`` single blocks and the current tuple form give the same
    image tokens at every block, through the student capture and through the teacher pass."""
    new, old = CASES["diffusers-flux"].build(), CASES["diffusers-flux-old"].build()
    old.load_state_dict(new.state_dict())
    case = CASES["diffusers-flux"]
    x_t, _, _, t, _, args, kwargs = inputs(case)
    for model in (new, old):
        model.eval()
    with torch.no_grad():
        assert torch.allclose(case.call(new, x_t, t, args, kwargs), case.call(old, x_t, t, args, kwargs), atol=1e-5)
        for k in range(1, 6):
            a = [run_until(m, resolve_adapter(m).blocks(m)[k - 1], resolve_adapter(m), x_t, t, args, kwargs) for m in (new, old)]
            assert torch.allclose(a[0], a[1], atol=1e-5), f"block {k}"
    # The training forward of the old form captures the right slice too (image count seen on x_embedder).
    tokens = {}
    for model in (new, old):
        model.train()
        with SelfRepresentationAlignment(model, student_layer=4, teacher_layer=5) as sra:
            case.call(model, x_t, t, args, kwargs)
            tokens[model] = sra._capture.record.tokens
    assert tokens[old].shape == (B, N, D)
    assert torch.allclose(tokens[new], tokens[old], atol=1e-5)


def test_diffusers_dit_teacher_sees_the_labels_as_passed() -> None:
    """What the adapter docstring says: in training, every block of diffusers' DiT drops labels on its own
    (p = 0.1 each), so blocks disagree; the teacher (eval mode) gets the labels as passed, in every block."""
    case = CASES["diffusers-dit"]
    model = case.build()
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    handles = []
    for side, m in (("student", model), ("teacher", sra.teacher)):
        for block in m.transformer_blocks:
            table = block.norm1.emb.class_embedder.embedding_table
            handles.append(table.register_forward_pre_hook(lambda mod, a, side=side: seen[side].append(a[0].clone())))
    y = torch.arange(64) % 10
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    torch.manual_seed(5)
    model.train()
    model(hidden_states=x, timestep=t, class_labels=y)
    sra(model, x, x, t, t, class_labels=y)
    for h in handles:
        h.remove()
    student, teacher = seen["student"], seen["teacher"]
    assert len(student) == 5  # 4 blocks, then block 0's embedder again for the final layer
    assert all(bool((s == y).any()) and bool((s == 10).any()) for s in student)  # dropped to the null id 10
    assert len({tuple(s.tolist()) for s in student}) > 1  # each block drops its own labels
    assert len(teacher) == 4 and all(torch.equal(s, y) for s in teacher)


def test_diffusers_rejects_positional_conditioning_and_duplicates() -> None:
    case = CASES["diffusers-sd3"]
    model = case.build()
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=3)
    x_t, x_s, _, t, s, _, kwargs = inputs(case)
    model.train()
    case.call(model, x_t, t, (), kwargs)
    with pytest.raises(TypeError, match="by keyword"):
        sra(model, x_t, x_s, t, s, kwargs["encoder_hidden_states"], pooled_projections=kwargs["pooled_projections"])
    case.call(model, x_t, t, (), kwargs)
    with pytest.raises(TypeError, match="timestep="):
        sra(model, x_t, x_s, t, s, timestep=t, **kwargs)
