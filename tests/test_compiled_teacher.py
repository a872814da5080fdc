"""The owned teacher's pass runs compiled when the model is compiled (or compile_teacher= says so):
same loss as eager, compiled once (no recompiles from the stopping hook or the EMA update), and
nothing compiled is left on the teacher's modules between passes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from sra_plugin import SelfRepresentationAlignment
from tests._models import flow_batch, tiny_sit


def steps(model, sra, n=4, call=None):
    opt = torch.optim.SGD([*model.parameters(), *sra.parameters()], lr=1e-2)
    losses = []
    for i in range(n):
        x_t, x_s, t, s, y, _ = flow_batch(seed=i)
        target = model if call is None else call
        target(x_t, t, y)
        loss = sra(target, x_t, x_s, t, s, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sra.update_teacher()
        losses.append(loss.detach())
    return losses


def frames() -> int:
    return sum(counters["frames"].values()) if "frames" in counters else 0


@pytest.mark.slow
@pytest.mark.parametrize("how", ["switch", "model.compile()", "torch.compile(model)"])
def test_teacher_blocks_run_compiled_with_the_eager_loss_and_compile_once(how, monkeypatch):
    torch._dynamo.reset()
    counters.clear()
    eager_model = tiny_sit(class_dropout_prob=0.0)
    model = copy.deepcopy(eager_model)
    torch.manual_seed(0)
    want = steps(eager_model, SelfRepresentationAlignment(eager_model, 2, 5, compile_teacher=False))

    torch.manual_seed(0)  # the same head
    if how == "switch":
        sra = SelfRepresentationAlignment(model, 2, 5, compile_teacher={"backend": "eager"})
        call = model
    else:
        sra = SelfRepresentationAlignment(model, 2, 5)  # compile_teacher=None: follow the model
        if how == "model.compile()":
            model.compile(backend="eager")
            call = model
        else:
            call = torch.compile(model, backend="eager")
        # the teacher is compiled with torch.compile's defaults (inductor); the eager backend keeps this test fast
        real = torch.compile
        monkeypatch.setattr(torch, "compile", lambda fn, **options: real(fn, backend="eager"))
    compiled_calls = []
    got = steps(model, sra, call=call)
    assert sra._compiled_blocks is not None and len(sra._compiled_blocks) == 4  # blocks 1..4; block 5 ends the pass
    for fn in sra._compiled_blocks:
        compiled_calls.append(fn)
    assert frames() > 0  # dynamo traced something
    counters.clear()
    got += steps(model, sra, n=2, call=call)
    torch.testing.assert_close(torch.stack(got[:4]), torch.stack(want), rtol=1e-5, atol=1e-6)
    assert frames() == 0, "something was traced again after the first steps (a recompile)"
    assert sra._compiled_blocks == compiled_calls
    blocks = sra.adapter.blocks(sra.teacher)
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in blocks)  # only during the pass
    twin = copy.deepcopy(sra)
    assert twin._compiled_blocks is None


def test_eager_model_keeps_an_eager_teacher_by_default():
    model = tiny_sit()
    sra = SelfRepresentationAlignment(model, 2, 5)
    steps(model, sra, n=1)
    assert sra._compiled_blocks is None


def test_compile_teacher_must_be_a_bool_dict_or_none():
    with pytest.raises(TypeError, match="compile_teacher='yes'"):
        SelfRepresentationAlignment(tiny_sit(), compile_teacher="yes")
