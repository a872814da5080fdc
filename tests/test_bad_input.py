"""Bad input: every mistake is a ValueError/TypeError naming the argument and the value, raised
before anything changes (no hook attached, teacher, head, step and the pending capture untouched);
opt-in ``check_finite`` names the side and the block."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from sra_plugin import SelfRepresentationAlignment
from tests._models import flow_batch, tiny_sit

DEPTH = 6


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- construction
BAD_ARGS = [
    # (keyword, value, exception, words the message must contain)
    ("student_layer", 0, ValueError, ["student_layer=0", f"1..{DEPTH}"]),
    ("student_layer", DEPTH + 1, ValueError, [f"student_layer={DEPTH + 1}", f"1..{DEPTH}"]),
    ("student_layer", -(DEPTH + 1), ValueError, [f"student_layer={-(DEPTH + 1)}", f"-{DEPTH}..-1"]),
    ("student_layer", 1.5, ValueError, ["student_layer=1.5", "(0, 1)"]),
    ("student_layer", 1.0, ValueError, ["student_layer=1.0", "(0, 1)"]),
    ("student_layer", 0.0, ValueError, ["student_layer=0.0", "(0, 1)"]),
    ("student_layer", -0.3, ValueError, ["student_layer=-0.3", "(0, 1)"]),
    ("student_layer", math.nan, ValueError, ["student_layer=nan", "(0, 1)"]),
    ("student_layer", "3", TypeError, ["student_layer='3'", "an int"]),
    ("student_layer", True, TypeError, ["student_layer=True", "an int"]),
    ("student_layer", None, TypeError, ["student_layer=None", "an int"]),
    ("teacher_layer", 7, ValueError, ["teacher_layer=7", f"1..{DEPTH}"]),
    ("teacher_layer", 2.0, ValueError, ["teacher_layer=2.0", "(0, 1)"]),
    ("loss", "huber", ValueError, ["loss='huber'", "'smooth_l1'", "'cosine'"]),
    ("loss", 3, TypeError, ["loss=3", "'smooth_l1'"]),
    ("head", "transformer", ValueError, ["head='transformer'", "'mlp'", "'linear'", "'identity'"]),
    ("head", 3, ValueError, ["head=3", "'mlp'"]),
    ("ema_decay", 1.5, ValueError, ["ema_decay=1.5", "[0, 1]"]),
    ("ema_decay", -0.1, ValueError, ["ema_decay=-0.1", "[0, 1]"]),
    ("ema_decay", math.nan, ValueError, ["ema_decay=nan", "[0, 1]"]),
    ("ema_decay", "0.99", ValueError, ["ema_decay='0.99'", "[0, 1]"]),
    ("ema_decay", True, ValueError, ["ema_decay=True", "[0, 1]"]),
    ("weight", -0.2, ValueError, ["weight=-0.2", ">= 0"]),
    ("weight", math.inf, ValueError, ["weight=inf", ">= 0"]),
    ("weight", math.nan, ValueError, ["weight=nan", ">= 0"]),
    ("weight", "0.2", ValueError, ["weight='0.2'", ">= 0"]),
    ("weight", True, ValueError, ["weight=True", ">= 0"]),
    ("teacher", "ema2", ValueError, ["teacher='ema2'", "'ema'"]),
    ("teacher", 0.9999, TypeError, ["teacher=float", "'ema'"]),
    ("adapter", "no-such-adapter", ValueError, ["adapter='no-such-adapter'", "dit"]),
    ("adapter", 5, TypeError, ["adapter=5", "registered name"]),
]


@pytest.mark.parametrize("keyword,value,error,words", BAD_ARGS, ids=[f"{k}={v!r}" for k, v, *_ in BAD_ARGS])
def test_bad_argument_is_named_and_nothing_is_attached(keyword, value, error, words):
    model = tiny_sit(depth=DEPTH)
    before, params, mode = hook_count(model), snapshot(model), model.training
    with pytest.raises(error) as info:
        SelfRepresentationAlignment(model, **{keyword: value})
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert hook_count(model) == before
    assert same(snapshot(model), params) and model.training == mode


def test_teacher_block_before_student_block():
    model = tiny_sit(depth=DEPTH)
    with pytest.raises(ValueError, match=r"teacher_layer=2 \(block 2\) comes before student_layer=4 \(block 4\)"):
        SelfRepresentationAlignment(model, student_layer=4, teacher_layer=2)
    with pytest.raises(ValueError, match=r"teacher_layer=0.2 \(block 1\) comes before student_layer=-1 \(block 6\)"):
        SelfRepresentationAlignment(model, student_layer=-1, teacher_layer=0.2)
    assert hook_count(model) == 0
    # The same block on both sides is allowed (the teacher still sees x_s through the EMA).
    with SelfRepresentationAlignment(model, student_layer=3, teacher_layer=3) as sra:
        assert (sra.student_layer, sra.teacher_layer) == (3, 3)


@pytest.mark.parametrize(
    "other,words",
    [
        (dict(depth=DEPTH + 1), ["teacher=SiT", "unexpected", "blocks.6"]),
        (dict(hidden_size=64), ["teacher=SiT", "has shape", "in the teacher"]),
        (dict(num_classes=7), ["teacher=SiT", "y_embedder.embedding_table.weight"]),
    ],
    ids=["deeper", "wider", "other-classes"],
)
def test_teacher_of_another_structure(other, words):
    model = tiny_sit(depth=DEPTH)
    wrong = tiny_sit(**{"depth": DEPTH, **other})
    with pytest.raises(ValueError) as info:
        SelfRepresentationAlignment(model, teacher=wrong)
    for word in words:
        assert word in str(info.value)
    assert hook_count(model) == 0 and hook_count(wrong) == 0
    with pytest.raises(ValueError, match="teacher is the model itself"):
        SelfRepresentationAlignment(model, teacher=model)
    assert hook_count(model) == 0


def test_model_that_is_not_a_module_or_unknown():
    with pytest.raises(TypeError, match="model=function is not accepted: use an nn.Module"):
        SelfRepresentationAlignment(lambda x: x)
    stack = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="model=Sequential matches no registered adapter"):
        SelfRepresentationAlignment(stack)
    assert hook_count(stack) == 0


# ---------------------------------------------------------------- call time
def _bad_calls(model, x_t, x_s, t, s, y):
    other = tiny_sit(seed=5, depth=DEPTH)
    return [
        ("x_t shape", (model, x_t[..., :4], x_s, t, s, y), ValueError, ["x_t has shape (4, 4, 8, 4)", "(4, 4, 8, 8)"]),
        ("x_s shape", (model, x_t, x_s[:2], t, s, y), ValueError, ["x_s (2, 4, 8, 8)", "must match"]),
        ("t batch", (model, x_t, x_s, t[:3], s, y), ValueError, ["t has batch size 3", "x_t has 4"]),
        ("s batch", (model, x_t, x_s, t, s.repeat(2), y), ValueError, ["s has batch size 8", "x_t has 4"]),
        ("x_t list", (model, x_t.tolist(), x_s, t, s, y), TypeError, ["x_t must be a torch.Tensor", "list"]),
        ("x_s array", (model, x_t, x_s.numpy(), t, s, y), TypeError, ["x_s must be a torch.Tensor", "ndarray"]),
        ("t list", (model, x_t, x_s, t.tolist(), s, y), TypeError, ["t must be a tensor or a number", "list"]),
        ("s None", (model, x_t, x_s, t, None, y), TypeError, ["s must be a tensor or a number", "NoneType"]),
        ("x_s dtype", (model, x_t, x_s.double(), t, s, y), ValueError, ["x_s has dtype torch.float64", "torch.float32"]),
        ("other model", (other, x_t, x_s, t, s, y), ValueError, ["model=SiT is not the model"]),
        ("not a model", (x_t, x_t, x_s, t, s, y), ValueError, ["model=Tensor is not the model"]),
    ]


def test_bad_call_changes_nothing():
    """A bad call raises before the pending capture, the head, the teacher or ``step`` change:
    the following good call still uses the features of the user's forward (no warning)."""
    model = tiny_sit(depth=DEPTH)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, ema_decay=0.5)
    x_t, x_s, t, s, y, _ = flow_batch()
    calls = _bad_calls(model, x_t, x_s, t, s, y)
    model(x_t, t, y)
    hooks, state, record = hook_count(model), snapshot(sra), sra._capture.record
    assert record is not None
    for name, args, error, words in calls:
        with pytest.raises(error) as info:
            sra(*args)
        for word in words:
            assert word in str(info.value), f"{name}: {word!r} not in {str(info.value)!r}"
        assert sra._capture.record is record, name
        assert hook_count(model) == hooks and same(snapshot(sra), state) and sra.step == 0, name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback pass would warn: the capture must still be there
        loss = sra(model, x_t, x_s, t, s, y)
    assert torch.isfinite(loss) and loss.requires_grad


def test_bad_weight_schedule_at_call_time_changes_nothing():
    model = tiny_sit(depth=DEPTH)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, weight=lambda step: 0.2 - 0.1 * step)
    x_t, x_s, t, s, y, _ = flow_batch()
    sra.step = 3
    model(x_t, t, y)
    record, state = sra._capture.record, snapshot(sra)
    with pytest.raises(ValueError, match=r"weight\(3\)=-0.1\d* is not accepted: use a finite number >= 0"):
        sra(model, x_t, x_s, t, s, y)
    assert sra._capture.record is record and same(snapshot(sra), state) and sra.step == 3


# ---------------------------------------------------------------- check_finite
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_check_finite_names_side_and_block(side):
    model = tiny_sit(depth=DEPTH)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=5, check_finite=True)
    x_t, x_s, t, s, y, _ = flow_batch()
    bad = (x_t if side == "student" else x_s).clone()
    bad[1, :, 3, 3] = math.nan
    if side == "student":
        x_t = bad
    else:
        x_s = bad
    model(x_t, t, y)
    block = 2 if side == "student" else 5
    with pytest.raises(FloatingPointError, match=rf"non-finite {side} features at block {block}"):
        sra(model, x_t, x_s, t, s, y)
    assert sra.metrics == {}  # nothing of the failed step was recorded


def test_check_finite_is_off_by_default():
    model = tiny_sit(depth=DEPTH)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=5)
    x_t, x_s, t, s, y, _ = flow_batch()
    x_s = x_s.clone()
    x_s[0, 0, 0, 0] = math.inf
    model(x_t, t, y)
    loss = sra(model, x_t, x_s, t, s, y)  # no sync, no raise: the user sees a non-finite loss
    assert not torch.isfinite(loss)
