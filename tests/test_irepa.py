"""iREPA: a convolutional projector on the model's token grid and z-scored encoder tokens, against a hand
computation of the official formula; on every family REPA runs on (image grids) or refused (packed tokens,
video); bad arguments refused."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

from sra_plugin import IREPA, resolve_adapter
from sra_plugin.registry import ModelCall
from tests._models import flow_batch
from tests.test_family_backbones import CASES
from tests.test_misuse_finetune import pretrained_sit
from tests.test_misuse_iv import WideViT, block_output


def vit(img: int, patch: int, dim: int = 24) -> torch.nn.Module:
    torch.manual_seed(7)
    return timm.models.vision_transformer.VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=1,
                                                            num_heads=2, num_classes=0)


def zscored(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-6)  # unbiased std, over the tokens


def conv_on_grid(irepa: IREPA, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, n, d = tokens.shape
    image = tokens.transpose(1, 2).reshape(b, d, h, w)
    out = F.conv2d(image, irepa.head.conv.weight, irepa.head.conv.bias, padding=1)
    return out.reshape(b, -1, n).transpose(1, 2)


def test_irepa_is_the_official_formula_on_a_square_grid():
    model = pretrained_sit().train()
    encoder = vit(32, 8)  # a 4x4 grid, as the tiny SiT's
    irepa = IREPA(model, encoder, layer=2)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    x_t, _, t, _, y, _ = flow_batch()
    model(x_t, t, y)
    loss = irepa(model, x_t, t, y, images=images)
    tokens = block_output(model, 2, x_t, t, y)
    with torch.no_grad():
        target = zscored(encoder.eval().forward_features(images)[:, encoder.num_prefix_tokens:])
    want = 1.0 * (1 - F.cosine_similarity(conv_on_grid(irepa, tokens, 4, 4), target, dim=-1)).mean()
    torch.testing.assert_close(loss, want)
    assert irepa.head.conv.kernel_size == (3, 3) and irepa.metrics["student_reruns"] == 0
    loss.backward()
    assert irepa.head.conv.weight.grad is not None and model.blocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in encoder.parameters())


def test_irepa_on_a_non_square_grid_resizes_then_z_scores():
    torch.manual_seed(0)
    model = WideViT(img_size=(16, 64), patch_size=4, in_chans=4, embed_dim=32, depth=3, num_heads=2, num_classes=0,
                    class_token=False, global_pool="")  # a 4x16 grid
    encoder = vit(32, 4)  # an 8x8 grid
    irepa = IREPA(model, encoder, layer=2)
    x_t, images = torch.randn(2, 4, 16, 64), torch.randn(2, 3, 32, 32)
    model(x_t, 0.5)
    loss = irepa(model, x_t, 0.5, images=images)
    with torch.no_grad():
        grid = encoder.eval().forward_features(images)[:, encoder.num_prefix_tokens:].transpose(1, 2).reshape(2, 24, 8, 8)
        resized = F.interpolate(grid, size=(4, 16), mode="bilinear", align_corners=False, antialias=True)
        target = zscored(resized.reshape(2, 24, 64).transpose(1, 2))
    tokens = block_output(model, 2, x_t, 0.5)
    want = (1 - F.cosine_similarity(conv_on_grid(irepa, tokens, 4, 16), target, dim=-1)).mean()
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("bad, error, words", [
    (dict(kernel_size=2), ValueError, "kernel_size=2"),
    (dict(kernel_size=0), ValueError, "kernel_size=0"),
    (dict(head="mlp"), TypeError, "head="),
])
def test_irepa_bad_arguments_are_refused_naming_them(bad, error, words):
    with pytest.raises(error, match=words):
        IREPA(pretrained_sit(), vit(32, 8), **bad)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_irepa_on_every_family_right_or_refused(name: str) -> None:
    """Image families with a (B, C, H, W) input: the hand computation; packed-token and video inputs (no
    image grid to lay the tokens on): a ValueError naming x_t."""
    build, key = CASES[name]
    model, x_t, t, args, kwargs, train_forward = build(key)
    adapter = resolve_adapter(model)
    torch.manual_seed(3)
    encoder = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, embed_dim=8, depth=1, num_heads=2, num_classes=0)
    images = torch.randn(x_t.shape[0], 3, 16, 16, generator=torch.Generator().manual_seed(4))
    irepa = IREPA(model, encoder, layer=1)
    calls, outputs = [], {}
    handles = [model.register_forward_pre_hook(lambda m, a, k: calls.append(ModelCall(a, k)), with_kwargs=True),
               adapter.blocks(model)[0].register_forward_hook(lambda m, a, o: outputs.setdefault(1, o))]
    train_forward()
    for h in handles:
        h.remove()
    if x_t.dim() != 4:
        with pytest.raises(ValueError, match="x_t of shape"):
            irepa(model, x_t, t, *args, images=images, **kwargs)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = irepa(model, x_t, t, *args, images=images, **kwargs)
    tokens = adapter.tokens(outputs[1], model, calls[0]).float()
    h = round((tokens.shape[1] * x_t.shape[-2] / x_t.shape[-1]) ** 0.5)
    with torch.no_grad():
        target = zscored(encoder.eval().forward_features(images)[:, encoder.num_prefix_tokens:])
    assert target.shape[1] == tokens.shape[1] == 16  # every image family here has a 4x4 grid (resizing: above)
    want = (1 - F.cosine_similarity(conv_on_grid(irepa, tokens, h, tokens.shape[1] // h), target, dim=-1)).mean()
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-6)
