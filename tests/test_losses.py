import pytest
import torch
import torch.nn.functional as F

from sra_plugin.losses import alignment_loss, build_loss


def test_cosine_is_per_token_over_features_not_over_tokens():
    pred, target = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    per_token = build_loss("cosine")(pred, target)
    assert per_token.shape == (2, 5)
    torch.testing.assert_close(per_token, 1 - F.cosine_similarity(pred, target, dim=-1))
    # the reference code's dim=1 variant compares token vectors per channel: a different number
    assert not torch.allclose(per_token.mean(), (1 - F.cosine_similarity(pred, target)).mean())


def test_smooth_l1_uses_beta_005_and_means_over_all_elements():
    pred, target = torch.randn(2, 5, 8), torch.randn(2, 5, 8) * 0.03
    got = alignment_loss(build_loss("smooth_l1"), pred, target)
    torch.testing.assert_close(got, F.smooth_l1_loss(pred, target, beta=0.05))
    assert not torch.allclose(got, F.smooth_l1_loss(pred, target, beta=1.0))


def test_loss_is_float32_under_autocast():
    pred = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = alignment_loss(build_loss("mse"), pred, pred.float() + 1e-3)
    assert got.dtype == torch.float32


def test_unknown_loss_names_are_rejected():
    with pytest.raises(ValueError, match="loss='huber'"):
        build_loss("huber")
    with pytest.raises(TypeError, match="loss=3"):
        build_loss(3)
