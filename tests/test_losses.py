import pytest
import torch
import torch.nn.functional as F

from sra_plugin.losses import alignment_loss, build_loss, per_sample


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
    """A custom loss built on a matmul (which autocast runs in bf16) computes in float32: exact to float32
    rounding against a float64 reference, where bf16 would be off by about 1e-3 relative."""
    seen = []

    def matmul_mse(pred, target):
        diff = pred - target
        per_token = (diff.unsqueeze(-2) @ diff.unsqueeze(-1)).reshape(diff.shape[:-1]) / diff.shape[-1]
        seen.append(per_token.dtype)
        return per_token

    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 5, 64, generator=g).to(torch.bfloat16)
    target = torch.randn(2, 5, 64, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = alignment_loss(matmul_mse, pred, target)
    assert seen == [torch.float32] and got.dtype == torch.float32
    want = (pred.double() - target.double()).pow(2).mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_unknown_loss_names_are_rejected():
    with pytest.raises(ValueError, match="loss='huber'"):
        build_loss("huber")
    with pytest.raises(TypeError, match="loss=3"):
        build_loss(3)


def official_cosine(a, b):
    """The official SRA code's cosine loss: torch's default dim=1 on (B, T, D)."""
    return (1 - F.cosine_similarity(a, b)).mean()


def test_cosine_tokens_is_the_official_definition_per_channel_over_tokens():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 7, 5), torch.randn(3, 7, 5)
    values = build_loss("cosine_tokens")(pred, target)
    assert values.shape == (3, 5)  # one value per sample and channel
    got = alignment_loss(build_loss("cosine_tokens"), pred, target)
    torch.testing.assert_close(got, official_cosine(pred, target))
    # column d of sample b: channel d's values over the 7 tokens
    column = 1 - F.cosine_similarity(pred[1, :, 2], target[1, :, 2], dim=0)
    torch.testing.assert_close(values[1, 2], column)
    per_token = alignment_loss(build_loss("cosine"), pred, target)
    assert not torch.allclose(got, per_token, atol=1e-3)


def test_cosine_tokens_ignores_channel_scales_and_cosine_ignores_token_scales():
    torch.manual_seed(1)
    pred = torch.randn(2, 6, 4)
    channel_scale = torch.rand(1, 1, 4) + 0.5  # scaling each channel: cosine over tokens does not see it
    token_scale = torch.rand(1, 6, 1) + 0.5  # scaling each token: cosine over features does not see it
    tokens, per_token = build_loss("cosine_tokens"), build_loss("cosine")
    assert alignment_loss(tokens, pred, pred * channel_scale) < 1e-6
    assert alignment_loss(per_token, pred, pred * channel_scale) > 1e-3
    assert alignment_loss(per_token, pred, pred * token_scale) < 1e-6
    assert alignment_loss(tokens, pred, pred * token_scale) > 1e-3


@pytest.mark.parametrize("name, shape", [("smooth_l1", (2, 5)), ("cosine", (2, 5)), ("cosine_tokens", (2, 8)), ("mse", (2, 5))])
def test_per_sample_is_the_mean_over_every_non_batch_axis(name, shape):
    torch.manual_seed(2)
    pred, target = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    fn = build_loss(name)
    values = fn(pred, target)
    assert values.shape == shape
    got = per_sample(fn, pred, target)
    assert got.shape == (2,)
    torch.testing.assert_close(got, torch.stack([values[0].mean(), values[1].mean()]))
    torch.testing.assert_close(alignment_loss(fn, pred, target), got.mean())


def test_per_sample_accepts_any_b_leading_shape_and_runs_in_float32():
    pred, target = torch.randn(3, 4, 2, dtype=torch.bfloat16), torch.randn(3, 4, 2, dtype=torch.bfloat16)
    seen = []
    per_sample_values = lambda p, q: seen.append(p.dtype) or (p - q).pow(2).sum((1, 2))  # (B,)
    per_element = lambda p, q: (p - q).pow(2)  # (B, N, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = per_sample(per_sample_values, pred, target)
        b = per_sample(per_element, pred, target)
    assert seen == [torch.float32] and a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a / 8, b)


@pytest.mark.parametrize(
    "fn, words",
    [
        (lambda p, q: (p - q).pow(2).mean(), ["returned ()", "(3, ...)"]),
        (lambda p, q: (p - q).pow(2).mean(0), ["returned (4, 2)", "(3, ...)"]),
        (lambda p, q: 1.0, ["returned float", "(3, ...)"]),
    ],
)
def test_per_sample_rejects_a_loss_not_shaped_batch_first(fn, words):
    with pytest.raises(ValueError) as info:
        per_sample(fn, torch.randn(3, 4, 2), torch.randn(3, 4, 2))
    for word in words:
        assert word in str(info.value)


def test_sample_weight_with_cosine_tokens_equals_per_sample_calls_combined_by_hand():
    from sra_plugin import SelfRepresentationAlignment
    from tests._models import flow_batch, tiny_sit

    model = tiny_sit(class_dropout_prob=0.0)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, loss="cosine_tokens", weight=0.5)
    with torch.no_grad():  # a teacher that differs from the student
        for p in sra.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x_t, x_s, t, s, y, _ = flow_batch(n=4)
    w = torch.tensor([0.0, 1.0, 2.5, 0.5])

    model(x_t, t, y)
    got = sra(model, x_t, x_s, t, s, y, sample_weight=w)

    singles = []
    for b in range(4):
        one = slice(b, b + 1)
        model(x_t[one], t[one], y[one])
        sra(model, x_t[one], x_s[one], t[one], s[one], y[one])
        singles.append(sra.metrics["align_loss"])
    want = 0.5 * sum(w_b * l_b for w_b, l_b in zip(w.tolist(), singles)) / 4
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-7)
    assert len(set(round(v, 6) for v in singles)) == 4  # the samples really differ
    unweighted = 0.5 * sum(singles) / 4
    assert abs(got.item() - unweighted) > 1e-4  # the weights matter
