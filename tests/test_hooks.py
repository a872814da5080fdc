"""Hook hygiene: deep copies never feed or disturb the capture, remove() leaves nothing behind, two
SRA objects on one model are independent, eval / no_grad forwards are not captured, features of
another input are never used, the fallback pass warns once."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

from sra_plugin import SelfRepresentationAlignment
from tests._models import flow_batch, no_warning, tiny_sit


def hooks_of(model: nn.Module) -> dict[str, tuple]:
    """Every module's hook dictionaries, by module name (ids of the registered callables)."""
    return {
        name: tuple(
            tuple(getattr(m, attr).keys())
            for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                         "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
        )
        for name, m in model.named_modules()
    }


def block_tokens(model: nn.Module, k: int, x, t, y) -> torch.Tensor:
    """Block k's output (1-based) of a plain forward, read by a throwaway hook."""
    out = []
    handle = model.blocks[k - 1].register_forward_hook(lambda m, a, o: out.append(o))
    try:
        model(x, t, y)
    finally:
        handle.remove()
    return out[0]


def expected_loss(sra: SelfRepresentationAlignment, model, x_t, x_s, t, s, y) -> torch.Tensor:
    """The loss from hand-read student tokens of (x_t, t) and teacher tokens of (x_s, s)."""
    student = block_tokens(model, sra.student_layer, x_t, t, y)
    with torch.no_grad():
        sra.teacher.eval()
        target = block_tokens(sra.teacher, sra.teacher_layer, x_s, s, y)
    pred = sra.head(student)
    return sra.current_weight() * nn.functional.smooth_l1_loss(pred, target, beta=0.05)


def test_deepcopy_after_sra_never_feeds_or_disturbs_the_capture():
    model = tiny_sit(class_dropout_prob=0.0)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    ema = copy.deepcopy(model)  # how users make their EMA, here after sra exists: it inherits our hooks
    assert any(len(m._forward_hooks) for m in ema.modules())
    x_t, x_s, t, s, y, _ = flow_batch()
    other = torch.randn_like(x_t)

    # The copy's training forward on x_t must not count as the student's forward.
    ema(x_t, t, y)
    assert sra._capture.record is None
    with pytest.warns(RuntimeWarning, match="found no student features"):
        sra(model, x_t, x_s, t, s, y)

    # The copy's forward between the student's forward and sra(...) must not replace the features.
    model(x_t, t, y)
    kept = sra._capture.record.tokens
    ema(other, t, y)
    ema.eval()
    with torch.no_grad():
        ema(other, t, y)
    assert sra._capture.record.tokens is kept
    loss = no_warning(sra, model, x_t, x_s, t, s, y)
    torch.testing.assert_close(loss, expected_loss(sra, model, x_t, x_s, t, s, y), rtol=1e-5, atol=1e-7)


def test_owned_teacher_carries_no_hooks():
    model = tiny_sit(class_dropout_prob=0.0)
    before = hooks_of(model)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    assert all(ids == ((),) * 7 for ids in hooks_of(sra.teacher).values())
    assert hooks_of(model) != before
    sra.remove()
    assert hooks_of(model) == before


def test_remove_and_context_manager_leave_nothing_behind():
    model = tiny_sit(class_dropout_prob=0.0)
    model.blocks[0].register_forward_hook(lambda m, a, o: None)  # the user's own hook stays
    before = hooks_of(model)
    forward_before = {name: m.forward for name, m in model.named_modules()}
    x_t, x_s, t, s, y, _ = flow_batch()
    with SelfRepresentationAlignment(model, student_layer=2, teacher_layer=5) as sra:
        model(x_t, t, y)
        sra(model, x_t, x_s, t, s, y).backward()
        assert hooks_of(model) != before
    assert hooks_of(model) == before
    assert {name: m.forward for name, m in model.named_modules()} == forward_before  # no wrapped forward
    assert type(model).forward is type(tiny_sit(class_dropout_prob=0.0)).forward
    # Removed: a training forward is no longer captured, and removing twice is harmless.
    model(x_t, t, y)
    assert sra._capture.record is None
    sra.remove()
    assert hooks_of(model) == before


def test_two_layer_pairs_on_one_model_are_independent():
    model = tiny_sit(class_dropout_prob=0.0)
    first = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    second = SelfRepresentationAlignment(model, student_layer=3, teacher_layer=6, loss="smooth_l1", weight=0.5)
    x_t, x_s, t, s, y, _ = flow_batch()
    model(x_t, t, y)  # one forward feeds both
    a = no_warning(first, model, x_t, x_s, t, s, y)
    b = no_warning(second, model, x_t, x_s, t, s, y)
    torch.testing.assert_close(a, expected_loss(first, model, x_t, x_s, t, s, y), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b, expected_loss(second, model, x_t, x_s, t, s, y), rtol=1e-5, atol=1e-7)
    # Removing one leaves the other working.
    first.remove()
    model(x_t, t, y)
    assert first._capture.record is None and second._capture.record is not None
    no_warning(second, model, x_t, x_s, t, s, y)


@pytest.mark.parametrize("how", ["eval", "no_grad", "inference_mode"])
def test_sampling_forwards_are_not_captured_and_hold_nothing(how):
    model = tiny_sit(class_dropout_prob=0.0)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    x_t, x_s, t, s, y, _ = flow_batch()
    probe = torch.randn_like(x_t)
    tokens_seen = []
    handle = model.blocks[1].register_forward_hook(lambda m, a, o: tokens_seen.append(weakref.ref(o)))
    if how == "eval":
        model.eval()
        out = model(probe, t, y)
        model.train()
    elif how == "no_grad":
        with torch.no_grad():
            out = model(probe, t, y)
    else:
        with torch.inference_mode():
            out = model(probe, t, y)
    del out
    handle.remove()
    gc.collect()
    assert sra._capture.record is None
    assert tokens_seen and tokens_seen[0]() is None  # the block's output is not kept alive by SRA
    # Sampling between the training forward and sra(...) does not drop or replace the capture.
    model(x_t, t, y)
    kept = sra._capture.record.tokens
    with torch.no_grad():
        model(probe, t, y)
    assert sra._capture.record.tokens is kept
    no_warning(sra, model, x_t, x_s, t, s, y)
    assert sra._capture.record is None  # handed over and forgotten: no graph kept past the step


def test_features_of_another_input_are_never_used():
    model = tiny_sit(class_dropout_prob=0.0)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    x_t, x_s, t, s, y, _ = flow_batch()
    for other in (torch.randn_like(x_t), x_t[:2], x_t + 1e-3):
        model(other, t[: len(other)], y[: len(other)])
        sra._warned.clear()
        with pytest.warns(RuntimeWarning, match="found no student features from a training forward on this x_t"):
            loss = sra(model, x_t, x_s, t, s, y)
        torch.testing.assert_close(loss, expected_loss(sra, model, x_t, x_s, t, s, y), rtol=1e-5, atol=1e-7)
    # An equal copy of x_t (same values, new tensor) is the same input.
    model(x_t.clone(), t, y)
    no_warning(sra, model, x_t, x_s, t, s, y)


def test_fallback_pass_warns_once_and_stops_early():
    model = tiny_sit(class_dropout_prob=0.0)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    x_t, x_s, t, s, y, _ = flow_batch()
    ran = []
    model.blocks[2].register_forward_hook(lambda m, a, o: ran.append(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            loss = sra(model, x_t, x_s, t, s, y)
    assert [w.category for w in caught] == [RuntimeWarning]
    assert "block 2" in str(caught[0].message)
    assert ran == []  # the student pass stopped after block 2 (block 3 never ran on the student)
    assert loss.requires_grad
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None and model.blocks[2].attn.qkv.weight.grad is None


def test_gradient_checkpointing_recompute_is_ignored():
    """Non-reentrant checkpointing re-runs blocks during backward: those calls must not touch the capture."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    model = tiny_sit(class_dropout_prob=0.0)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    x_t, x_s, t, s, y, _ = flow_batch()
    in_backward = []
    model.blocks[1].register_forward_hook(lambda m, a, o: in_backward.append(torch._C._current_graph_task_id() != -1))

    def forward(x, t, y):  # DiT's forward with every block checkpointed
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, model.training)
        for block in model.blocks:
            with set_checkpoint_early_stop(False):  # the recompute runs whole blocks, hooks included
                h = checkpoint(block, h, c, use_reentrant=False)
        return model.unpatchify(model.final_layer(h, c))

    model.forward = forward
    # A backward between the forward and sra(...) (e.g. another loss first) keeps the forward's features.
    out = model(x_t, t, y)
    kept = sra._capture.record.tokens
    out.square().mean().backward(retain_graph=True)
    assert in_backward == [False, True]  # block 2 did run again during backward
    assert sra._capture.record.tokens is kept
    loss = no_warning(sra, model, x_t, x_s, t, s, y)
    # After sra(...) took the features, the recompute in backward leaves nothing behind.
    (loss + out.square().mean()).backward()
    assert in_backward[-1] is True and sra._capture.record is None
