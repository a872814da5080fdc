"""LatentAlignment (SRA 2) against a hand computation, and its guarantees: no block runs inside
``align(...)``, gradient scope, per-sample weights, weight 0, bad input, state, hooks."""

from __future__ import annotations

import copy
import io
import warnings

import einops
import pytest
import torch
import torch.nn.functional as F

from sra_plugin import LatentAlignment, LinearPath
from tests._models import tiny_sit
from tests.test_alignment import tokens_by_hand


def data(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 4, 8, 8, generator=g)
    noise = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.rand(n, generator=g) * 0.8 + 0.2
    y = torch.randint(0, 10, (n,), generator=g)
    x_t = LinearPath()(x0, noise, t)
    return x_t, x0, t, y


def count_block_calls(model):
    calls = [0] * len(model.blocks)
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(model.blocks)]
    return calls, handles


def test_loss_equals_hand_computation_with_a_fixed_linear_head():
    model = tiny_sit(class_dropout_prob=0.0)
    head = torch.nn.Linear(32, 16)
    torch.manual_seed(5)
    torch.nn.init.normal_(head.weight, std=0.2)
    torch.nn.init.normal_(head.bias, std=0.2)
    align = LatentAlignment(model, layer=3, head=head, loss="smooth_l1", weight=0.7)
    x_t, x0, t, y = data()
    model(x_t, t, y)
    got = align(model, x_t, x0, t, y)
    with torch.no_grad():
        tokens = tokens_by_hand(model, x_t, t, y, 3)
        # DiT/SiT unpatchify reads each token as (p, q, C): the target is x0 cut the same way.
        target = einops.rearrange(x0, "b c (h p) (w q) -> b (h w) (p q c)", p=2, q=2)
        want = 0.7 * F.smooth_l1_loss(head(tokens), target, beta=0.05)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    assert align.metrics["student_reruns"] == 0
    assert align.target_dim == 16 and align.layer == 3


def test_target_is_inverted_by_the_models_own_unpatchify():
    model = tiny_sit(learn_sigma=False)
    align = LatentAlignment(model)
    _, x0, _, _ = data()
    assert torch.equal(model.unpatchify(align.target(x0)), x0)


def test_no_block_runs_during_align_and_no_teacher_exists():
    model = tiny_sit()
    align = LatentAlignment(model, layer=2)
    x_t, x0, t, y = data()
    model(x_t, t, y)
    calls, handles = count_block_calls(model)
    align(model, x_t, x0, t, y)
    for h in handles:
        h.remove()
    assert calls == [0] * len(model.blocks)
    held = sum(p.numel() for p in align.parameters()) + sum(b.numel() for b in align.buffers())
    assert held == sum(p.numel() for p in align.head.parameters())  # the head and nothing else


def test_gradients_reach_only_blocks_up_to_the_layer_and_the_head():
    model = tiny_sit()
    align = LatentAlignment(model, layer=2)
    x_t, x0, t, y = data()
    model(x_t, t, y)
    align(model, x_t, x0, t, y).backward()
    for i, block in enumerate(model.blocks, start=1):
        grads = [p.grad for p in block.parameters()]
        if i <= 2:
            assert any(g is not None and g.abs().sum() > 0 for g in grads), i
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads), i
    assert all(p.grad is not None for p in align.head.parameters())
    assert model.final_layer.linear.weight.grad is None


def test_sample_weight_equals_per_sample_calls_combined_by_hand():
    model = tiny_sit(class_dropout_prob=0.0)
    align = LatentAlignment(model, weight=0.5)
    x_t, x0, t, y = data()
    w = torch.tensor([0.0, 1.0, 2.0, 0.5])
    model(x_t, t, y)
    got = align(model, x_t, x0, t, y, sample_weight=w)
    singles = []
    for b in range(4):
        sl = slice(b, b + 1)
        model(x_t[sl], t[sl], y[sl])
        singles.append(align(model, x_t[sl], x0[sl], t[sl], y[sl]))
    torch.testing.assert_close(got, sum(w[b] * singles[b] for b in range(4)) / 4, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weight", [lambda step: 0.2 if step < 5 else 0.0, torch.tensor(0.0)], ids=["schedule at 0", "0-dim tensor"])
def test_weight_zero_runs_nothing_and_keeps_the_head_in_the_graph(weight):
    model = tiny_sit()
    align = LatentAlignment(model, weight=weight)
    x_t, x0, t, y = data()
    align.step = 5
    model(x_t, t, y)
    calls, handles = count_block_calls(model)
    loss = align(model, x_t, x0, t, y)
    for h in handles:
        h.remove()
    assert calls == [0] * len(model.blocks)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in align.head.parameters())


def test_schedule_weight_follows_the_call_count():
    model = tiny_sit()
    align = LatentAlignment(model, weight=lambda step: 0.1 * (step + 1))
    x_t, x0, t, y = data()
    for expected in (0.1, 0.2, 0.3):
        model(x_t, t, y)
        align(model, x_t, x0, t, y)
        assert align.metrics["weight"] == pytest.approx(expected)


def test_without_the_users_forward_it_reruns_the_student_and_warns_once():
    model = tiny_sit(class_dropout_prob=0.0)
    align = LatentAlignment(model, layer=2)
    x_t, x0, t, y = data()
    model(x_t, t, y)
    reused = align(model, x_t, x0, t, y)
    with pytest.warns(RuntimeWarning, match="LatentAlignment found no student features"):
        rerun = align(model, x_t, x0, t, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        align(model, x_t, x0, t, y)
    torch.testing.assert_close(rerun, reused)
    assert align.metrics["student_reruns"] == 2


def test_a_forward_on_another_time_is_not_reused():
    model = tiny_sit(class_dropout_prob=0.0)
    align = LatentAlignment(model, layer=2)
    x_t, x0, t, y = data()
    model(x_t, t, y)
    want = align(model, x_t, x0, t, y)
    model(x_t, t * 0.5, y)
    with pytest.warns(RuntimeWarning, match="different 't'"):
        got = align(model, x_t, x0, t, y)
    torch.testing.assert_close(got, want)


def test_head_on_the_models_dtype_and_bf16_loss_is_float32():
    model = tiny_sit().to(torch.bfloat16)
    align = LatentAlignment(model)
    assert all(p.dtype == torch.bfloat16 for p in align.head.parameters())
    x_t, x0, t, y = data()
    x_t, x0 = x_t.bfloat16(), x0.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the reference SiT embeds time in float32
        model(x_t, t, y)
        loss = align(model, x_t, x0, t, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda a, m, x_t, x0, t, y: a(m, x_t, x0[:, :2], t, y), "x0 has shape"),
        (lambda a, m, x_t, x0, t, y: a(m, x_t, x0.numpy(), t, y), "x0 must be a torch.Tensor"),
        (lambda a, m, x_t, x0, t, y: a(tiny_sit(), x_t, x0, t, y), "is not the model"),
        (lambda a, m, x_t, x0, t, y: a(m, x_t, x0, t[:3], y), "t has batch size 3"),
        (lambda a, m, x_t, x0, t, y: a(m, x_t, x0, t, y, sample_weight=torch.ones(3)), "sample_weight"),
    ],
)
def test_bad_input_is_refused_before_anything_changes(call, match):
    model = tiny_sit()
    align = LatentAlignment(model)
    before = copy.deepcopy(align.state_dict())
    x_t, x0, t, y = data()
    model(x_t, t, y)
    with pytest.raises((ValueError, TypeError), match=match):
        call(align, model, x_t, x0, t, y)
    after = align.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))
    assert align.step == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(layer=0), "layer=0"),
    (dict(target_dim=0), "target_dim=0"),
    (dict(weight=-1.0), "weight=-1.0"),
    (dict(loss="huber"), "loss='huber'"),
    (dict(head="conv"), "head='conv'"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LatentAlignment(tiny_sit(), **kwargs)


def test_state_dict_round_trip_and_a_different_layer_is_refused():
    model = tiny_sit()
    align = LatentAlignment(model, layer=2)
    x_t, x0, t, y = data()
    model(x_t, t, y)
    align(model, x_t, x0, t, y)
    buffer = io.BytesIO()
    torch.save(align.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    fresh = LatentAlignment(model, layer=2)
    fresh.load_state_dict(state)
    assert fresh.step == align.step == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.head.parameters(), align.head.parameters()))
    other = LatentAlignment(model, layer=3)
    with pytest.raises(ValueError, match="layer: saved 2, here 3"):
        other.load_state_dict(state)


def test_remove_and_dropping_the_object_leave_no_hooks():
    model = tiny_sit()
    hooked = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    align = LatentAlignment(model)
    assert hooked() > 0
    align.remove()
    assert hooked() == 0
    align = LatentAlignment(model)
    del align
    import gc

    gc.collect()
    assert hooked() == 0


def test_compiled_model_feeds_the_capture_and_matches_eager():
    torch._dynamo.reset()
    eager = tiny_sit(class_dropout_prob=0.0)
    compiled = copy.deepcopy(eager)
    torch.manual_seed(0)
    want_align = LatentAlignment(eager, layer=2)
    torch.manual_seed(0)
    got_align = LatentAlignment(compiled, layer=2)
    compiled.compile(backend="eager")  # after LatentAlignment, as for SRA
    x_t, x0, t, y = data()
    eager(x_t, t, y)
    want = want_align(eager, x_t, x0, t, y)
    for _ in range(2):
        compiled(x_t, t, y)
        got = got_align(compiled, x_t, x0, t, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_align.student_reruns == 0
