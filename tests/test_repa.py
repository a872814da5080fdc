"""REPA on the shared machinery: the loss against a hand computation with a randomly initialised timm
ViT (nothing downloaded), the encoder's grid resized to the model's, no gradient and no mode change on
the encoder, bad input, and the state (the encoder is not in it)."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from sra_plugin import REPA, LayerSync
from tests._models import flow_batch, tiny_dit


def vit(patch: int, reg_tokens: int = 2) -> nn.Module:
    torch.manual_seed(7)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=patch, embed_dim=24, depth=2, num_heads=2, num_classes=0, reg_tokens=reg_tokens)


def setup(patch: int = 8):
    model = tiny_dit(class_dropout_prob=0.0)  # DiT: t in DDPM steps, 8x8 latent, 2x2 patches: a 4x4 grid
    encoder = vit(patch)
    x_t, _, t, _, y, _ = flow_batch()
    t = (t * 999).long()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return model, encoder, x_t, t, y, images


def block_tokens(model, k, *inputs):
    out = []
    handle = model.blocks[k - 1].register_forward_hook(lambda m, a, o: out.append(o))
    model(*inputs)
    handle.remove()
    return out[0]


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def test_repa_equals_the_hand_computed_cosine_to_the_encoders_patch_tokens():
    model, encoder, x_t, t, y, images = setup(patch=8)  # 4x4 encoder grid: the model's
    repa = REPA(model, encoder, layer=3, projector_dim=16)
    tokens = block_tokens(model, 3, x_t, t, y)
    with torch.no_grad():
        target = encoder.eval().forward_features(images)[:, encoder.num_prefix_tokens:]  # class + 2 registers dropped
    encoder.train()
    assert target.shape == (4, 16, 24) and encoder.num_prefix_tokens == 3
    want = 0.5 * (1 - F.cosine_similarity(repa.head(tokens), target, dim=-1)).mean()
    model(x_t, t, y)
    loss = quiet(repa, model, x_t, t, y, images=images)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    assert repa.metrics["student_reruns"] == 0 and repa.target_dim == 24
    assert [type(m) for m in repa.head] == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]  # REPA's projector


def test_repa_resizes_the_encoders_grid_to_the_models_bilinearly():
    model, encoder, x_t, t, y, images = setup(patch=4)  # 8x8 encoder grid, 4x4 model grid
    repa = REPA(model, encoder, layer=2, projector_dim=16)
    with torch.no_grad():
        found = encoder.eval().forward_features(images)[:, 3:]  # (4, 64, 24)
    grid = found.transpose(1, 2).reshape(4, 24, 8, 8)
    target = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False, antialias=True).reshape(4, 24, 16).transpose(1, 2)
    tokens = block_tokens(model, 2, x_t, t, y)
    want = 0.5 * (1 - F.cosine_similarity(repa.head(tokens), target, dim=-1)).mean()
    model(x_t, t, y)
    torch.testing.assert_close(quiet(repa, model, x_t, t, y, images=images), want, rtol=1e-5, atol=1e-7)


def test_encoder_gets_no_gradient_runs_in_eval_mode_and_keeps_its_mode():
    model, encoder, x_t, t, y, images = setup()
    repa = REPA(model, encoder, layer=2, projector_dim=16)
    encoder.train()
    seen = []
    encoder.blocks[0].register_forward_hook(lambda m, a, o: seen.append((m.training, torch.is_grad_enabled())))
    model(x_t, t, y)
    quiet(repa, model, x_t, t, y, images=images).backward()
    assert seen == [(False, False)]
    assert encoder.training and all(m.training for m in encoder.modules())
    assert all(p.grad is None for p in encoder.parameters())
    assert any(p.grad is not None for p in repa.head.parameters()) and model.blocks[0].attn.qkv.weight.grad is not None
    assert model.blocks[2].attn.qkv.weight.grad is None  # blocks after the aligned one get nothing from REPA
    assert not any(k.startswith("encoder") or "blocks" in k for k in repa.state_dict())


def test_repa_resumes_exactly_and_shares_the_forward_with_layersync():
    model, encoder, x_t, t, y, images = setup()
    repa = REPA(model, encoder, layer=2, projector_dim=16)
    ls = LayerSync(model, 2, 4)
    opt = torch.optim.SGD(repa.parameters(), lr=0.5)
    model(x_t, t, y)
    (quiet(repa, model, x_t, t, y, images=images) + quiet(ls, model, x_t, t, y)).backward()
    opt.step()
    assert (repa.student_reruns, ls.student_reruns) == (0, 0)
    state = copy.deepcopy(repa.state_dict())
    model2 = copy.deepcopy(model)
    again = REPA(model2, copy.deepcopy(encoder), layer=2, projector_dim=16)
    again.load_state_dict(state)
    model(x_t, t, y), model2(x_t, t, y)
    torch.testing.assert_close(quiet(again, model2, x_t, t, y, images=images), quiet(repa, model, x_t, t, y, images=images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="layer: saved 2, here 3"):
        REPA(copy.deepcopy(model), encoder, layer=3, projector_dim=16).load_state_dict(state)


class PlainEncoder(nn.Module):
    """An encoder no adapter knows: 4x4 patches of a 16x16 image, one linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 10, 4, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, 16, 10)


def test_an_unknown_encoder_needs_a_reader_and_a_width():
    model, _, x_t, t, y, _ = setup()
    encoder = PlainEncoder()
    with pytest.raises(ValueError, match="encoder=PlainEncoder is not accepted: no registered adapter .* pass encoder_tokens="):
        REPA(model, encoder)
    with pytest.raises(ValueError, match="encoder_dim=None is not accepted for encoder=PlainEncoder"):
        REPA(model, encoder, encoder_tokens=lambda e, im: e(im))
    repa = REPA(model, encoder, layer=1, encoder_tokens=lambda e, im: e(im), encoder_dim=10, projector_dim=8)
    images = torch.randn(4, 3, 16, 16)
    model(x_t, t, y)
    loss = quiet(repa, model, x_t, t, y, images=images)
    assert loss.shape == () and bool(torch.isfinite(loss))


@pytest.mark.parametrize("images, error, words", [
    (None, TypeError, "images=NoneType is not accepted: REPA needs images="),
    (torch.randn(3, 3, 32, 32), ValueError, "images has shape (3, 3, 32, 32) but x_t (4, 4, 8, 8): give one image per sample"),
])
def test_bad_images_change_nothing(images, error, words):
    model, encoder, x_t, t, y, _ = setup()
    repa = REPA(model, encoder, layer=2, projector_dim=16)
    model(x_t, t, y)
    record = repa._capture.record
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        repa(model, x_t, t, y, images=images)
    assert repa._capture.record is record and repa.step == 0


def test_encoder_tokens_that_are_no_grid_are_refused():
    model, _, x_t, t, y, images = setup()
    repa = REPA(model, PlainEncoder(), layer=1, encoder_tokens=lambda e, im: torch.randn(4, 7, 10), encoder_dim=10, projector_dim=8)
    model(x_t, t, y)
    with pytest.raises(ValueError, match="7 tokens do not form a grid"):
        repa(model, x_t, t, y, images=images)


def test_the_model_or_a_non_module_is_not_an_encoder():
    model, _, *_ = setup()
    with pytest.raises(ValueError, match="encoder is the model itself"):
        REPA(model, model)
    with pytest.raises(TypeError, match="encoder=str is not accepted: use the frozen image encoder, an nn.Module"):
        REPA(model, "dinov2")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
