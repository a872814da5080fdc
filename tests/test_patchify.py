"""Adapter.patchify: the clean latent in the model's own token order, exactly inverted by the
model's own unpatchify; patchify_latent against einops; the error for an adapter without one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import einops
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from examples.models import MMDiT, SiT, UViT, UViTT2I
from examples.models import uvit as uvit_module
from examples.models.dit import DiT
from sra_plugin import resolve_adapter
from sra_plugin.registry import DeclaredAdapter, patchify_latent
from tests._models import TINY, randomise_gates

B = 2


@dataclass
class Case:
    build: Callable[[], nn.Module]
    adapter: str
    shape: tuple[int, int, int]  # the latent (C, H, W)
    embedder: Callable[[nn.Module], nn.Module]  # the patch embedder: (B, C, H, W) -> (B, N, D) before positions
    unpatchify: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # the model's own (model, tokens, x0) -> latent
    call: Callable[[nn.Module, torch.Tensor], object]  # one forward in the model's convention


def seeded(fn):
    def build():
        torch.manual_seed(0)
        return fn()
    return build


def dit_call(model, x):
    return model(x, torch.tensor([10, 500]), torch.tensor([1, 2]))


MMDIT = dict(input_size=8, patch_size=2, in_channels=4, depth=2, head_dim=8, pos_embed_max_size=8, register_length=2)

CASES = {
    "dit": Case(seeded(lambda: randomise_gates(DiT(**{**TINY, "learn_sigma": False}))), "dit", (4, 8, 8),
                lambda m: m.x_embedder, lambda m, tok, x0: m.unpatchify(tok), dit_call),
    "sit": Case(seeded(lambda: randomise_gates(SiT(**TINY))), "dit", (4, 8, 8),
                lambda m: m.x_embedder, lambda m, tok, x0: m.unpatchify(tok), lambda m, x: m(x, torch.rand(B), torch.tensor([1, 2]))),
    "sit-p4": Case(seeded(lambda: randomise_gates(SiT(**{**TINY, "patch_size": 4}))), "dit", (4, 8, 8),
                   lambda m: m.x_embedder, lambda m, tok, x0: m.unpatchify(tok), lambda m, x: m(x, torch.rand(B), torch.tensor([1, 2]))),
    "uvit": Case(seeded(lambda: UViT(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=2, num_heads=2, num_classes=11)),
                 "uvit", (4, 8, 8), lambda m: m.patch_embed, lambda m, tok, x0: uvit_module.unpatchify(tok, m.in_chans),
                 lambda m, x: m(x, torch.tensor([10, 500]), torch.tensor([1, 2]))),
    "uvit-t2i": Case(seeded(lambda: UViTT2I(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2, clip_dim=16, num_clip_token=5)),
                     "uvit", (3, 8, 8), lambda m: m.patch_embed, lambda m, tok, x0: uvit_module.unpatchify(tok, m.in_chans),
                     lambda m, x: m(x, torch.tensor([10, 500]), torch.randn(B, 5, 16))),
    # not square: MMDiT unpatchifies to the input's own (H, W)
    "mmdit": Case(seeded(lambda: randomise_gates(MMDiT(**MMDIT))), "mmdit", (4, 8, 6),
                  lambda m: m.x_embedder, lambda m, tok, x0: m.unpatchify(tok, x0.shape[-2:]), lambda m, x: m(x, torch.tensor([100.0, 900.0]))),
    # timm has no unpatchify: the layout is defined as DiT's, "b (h w) (p q c) -> b c (h p) (w q)"
    "timm-vit": Case(seeded(lambda: VisionTransformer(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=2, num_heads=2,
                                                      num_classes=0, global_pool="", reg_tokens=1)),
                     "timm-vit", (4, 8, 8), lambda m: m.patch_embed,
                     lambda m, tok, x0: einops.rearrange(tok, "b (h w) (p q c) -> b c (h p) (w q)", h=4, p=2, q=2), lambda m, x: m(x)),
}


def latent(case: Case, seed: int = 3) -> torch.Tensor:
    return torch.randn(B, *case.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CASES)
def test_model_unpatchify_inverts_patchify_exactly(name):
    case = CASES[name]
    model = case.build()
    adapter = resolve_adapter(model)
    assert adapter.name == case.adapter
    x0 = latent(case)
    tokens = adapter.patchify(model, x0)
    c, h, w = case.shape
    p, q = model_patch(case, model)
    assert tokens.shape == (B, (h // p) * (w // q), c * p * q)
    assert torch.equal(case.unpatchify(model, tokens, x0), x0)


def model_patch(case: Case, model: nn.Module) -> tuple[int, int]:
    return tuple(case.embedder(model).proj.kernel_size)


@pytest.mark.parametrize("name", CASES)
def test_token_i_is_the_patch_the_models_token_i_embeds(name):
    """The patch embedding is a linear map of each patch: applied to patchify's token i (weights
    reordered to (p, q, C)) it gives the embedder's token i, so input and target orders agree."""
    case = CASES[name]
    model = case.build()
    x0 = latent(case)
    tokens = resolve_adapter(model).patchify(model, x0)
    proj = case.embedder(model).proj
    weight = proj.weight.permute(0, 2, 3, 1).reshape(proj.out_channels, -1)
    with torch.no_grad():
        want = case.embedder(model)(x0)
        torch.testing.assert_close(tokens @ weight.T + proj.bias, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_token_count_equals_the_blocks_image_tokens(name):
    case = CASES[name]
    model = case.build().eval()
    adapter = resolve_adapter(model)
    seen = []
    handle = adapter.blocks(model)[0].register_forward_hook(lambda module, args, out: seen.append(adapter.tokens(out, model)))
    x0 = latent(case)
    with torch.no_grad():
        case.call(model, x0)
    handle.remove()
    assert seen and seen[0].shape[:2] == adapter.patchify(model, x0).shape[:2]


def test_learn_sigma_does_not_change_the_target():
    """DiT with learn_sigma predicts 2C values per pixel; the target is x0's C, in the same order."""
    torch.manual_seed(0)
    sigma, plain = DiT(**TINY), DiT(**{**TINY, "learn_sigma": False})
    x0 = torch.randn(B, 4, 8, 8)
    adapter = resolve_adapter(sigma)
    torch.testing.assert_close(adapter.patchify(sigma, x0), adapter.patchify(plain, x0), rtol=0, atol=0)


def test_patch_size_from_the_conv_kernel_without_a_patch_size_attribute():
    from sra_plugin.adapters._patches import patch_size_of

    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(4, 8, kernel_size=(2, 4), stride=(2, 4))

    assert patch_size_of(Embed(), "x") == (2, 4)
    bare = nn.Module()
    with pytest.raises(ValueError, match="adapter 'x' cannot tell the patch size of Module"):
        patch_size_of(bare, "x")


@pytest.mark.parametrize(
    "x0, words",
    [
        (torch.randn(B, 3, 8, 8), ["x0 has 3 channels", "takes 4"]),
        (torch.randn(B, 4, 64), ["x0 of shape (2, 4, 64)", "(B, C, H, W)"]),
        (torch.randn(B, 4, 8, 7), ["x0 of shape (2, 4, 8, 7)", "not divisible"]),
    ],
)
def test_builtin_patchify_rejects_a_latent_that_does_not_fit(x0, words):
    model = CASES["sit"].build()
    with pytest.raises(ValueError) as info:
        resolve_adapter(model).patchify(model, x0)
    for word in words:
        assert word in str(info.value)


def test_adapter_without_patchify_says_how_to_declare_one():
    model = CASES["sit"].build()
    bare = DeclaredAdapter("bare-net", matches=SiT, blocks="blocks")
    with pytest.raises(ValueError) as info:
        bare.patchify(model, torch.randn(B, 4, 8, 8))
    message = str(info.value)
    assert "'bare-net'" in message and "has no patchify" in message and "register_adapter(..., patchify=" in message
    declared = DeclaredAdapter("net", matches=SiT, blocks="blocks", patchify=lambda m, x: patchify_latent(x, 2))
    assert declared.patchify(model, torch.randn(B, 4, 8, 8)).shape == (B, 16, 16)


# ------------------------------------------------------------------ patchify_latent against einops
def test_patchify_latent_image_matches_einops_both_orders():
    x = torch.randn(2, 3, 6, 8)
    torch.testing.assert_close(patchify_latent(x, (2, 4)), einops.rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=2, q=4), rtol=0, atol=0)
    torch.testing.assert_close(patchify_latent(x, 2, channels_last=False),
                               einops.rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2), rtol=0, atol=0)


def test_patchify_latent_video_matches_einops_both_orders():
    x = torch.randn(2, 3, 4, 6, 8)  # (B, C, F, H, W)
    torch.testing.assert_close(
        patchify_latent(x, (1, 2, 2)),
        einops.rearrange(x, "b c (f r) (h p) (w q) -> b (f h w) (r p q c)", r=1, p=2, q=2), rtol=0, atol=0)
    torch.testing.assert_close(
        patchify_latent(x, (2, 3, 4), channels_last=False),
        einops.rearrange(x, "b c (f r) (h p) (w q) -> b (f h w) (c r p q)", r=2, p=3, q=4), rtol=0, atol=0)
    torch.testing.assert_close(
        patchify_latent(x, 2), einops.rearrange(x, "b c (f r) (h p) (w q) -> b (f h w) (r p q c)", r=2, p=2, q=2), rtol=0, atol=0)
