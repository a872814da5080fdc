"""torch.compile: sra created first, then the model compiled: the compiled training forward feeds the
capture (no extra pass, no warning, one graph, no recompiles) and loss and gradients equal eager.
Compiled before sra: the warning says so and tells the fix.

Backend: ``aot_eager`` by default (dynamo tracing the hooks plus AOTAutograd's forward and backward
graphs: the parts that decide whether the capture works). Inductor on CPU compiles C++ kernels: its
three steps took 122 s on a shared 2-core machine (aot_eager: 17 s), too slow for CI, while what it
adds touches no hook; run it with ``SRA_TEST_INDUCTOR=1 python -m pytest tests/test_compile.py -k inductor -s``.
"""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

from sra_plugin import SelfRepresentationAlignment
from tests._models import flow_batch, tiny_sit

BACKEND = "aot_eager"
STEPS = 3


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def build():
    model = tiny_sit(class_dropout_prob=0.0, depth=4)
    # compile_teacher=False: the graph count below is the student's (tests/test_compiled_teacher.py covers the teacher's).
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=3, ema_decay=0.5, compile_teacher=False)
    opt = torch.optim.SGD([*model.parameters(), *sra.head.parameters()], lr=0.1)
    return model, sra, opt


def train(model, call, sra, opt, steps: int):
    losses = []
    for step in range(steps):
        x_t, x_s, t, s, y, target = flow_batch(seed=step)
        pred = call(x_t, t, y)
        align = sra(call, x_t, x_s, t, s, y)
        (F.mse_loss(pred, target) + align).backward()
        opt.step()
        opt.zero_grad()
        sra.update_teacher()
        losses.append(align.detach())
    return torch.stack(losses)


INDUCTOR = pytest.mark.skipif(os.environ.get("SRA_TEST_INDUCTOR") != "1", reason="slow on CPU: set SRA_TEST_INDUCTOR=1")


@pytest.mark.slow
@pytest.mark.parametrize("backend", [BACKEND, pytest.param("inductor", marks=INDUCTOR)])
def test_compiled_forward_feeds_the_capture_and_matches_eager(backend):
    model, sra, opt = build()
    eager_model, eager_sra, eager_opt = build()  # same seeds: the same start
    assert all(torch.equal(p, q) for p, q in zip(sra.state_dict().values(), eager_sra.state_dict().values()) if isinstance(p, torch.Tensor))
    compiled = torch.compile(model, backend=backend)
    start = time.perf_counter()
    passes = []
    sra.teacher.blocks[2].register_forward_hook(lambda m, a, o: passes.append("teacher"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback student pass would warn
        got = train(model, compiled, sra, opt, STEPS)
        seconds = time.perf_counter() - start
        want = train(eager_model, eager_model, eager_sra, eager_opt, STEPS)
    print(f"backend={backend}: {STEPS} compiled steps (first includes compilation) took {seconds:.1f} s")
    assert passes == ["teacher"] * STEPS  # one teacher pass per step, nothing else
    assert sra.metrics["student_reruns"] == 0  # every step reused the compiled forward's tokens
    print(f"compile {backend}: max |loss - eager| over {STEPS} steps = {(got - want).abs().max().item():.2e}")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    for p, q in zip(sra.parameters(), eager_sra.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    assert len(set(got.tolist())) == STEPS  # the steps moved the model
    # The hooks were traced into one graph that is reused: no recompiles, no graph breaks.
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["torch.compile(model)", "model.compile()"])
def test_model_compiled_before_sra_gets_a_warning_with_the_fix(how):
    model = tiny_sit(class_dropout_prob=0.0, depth=4)
    if how == "model.compile()":
        model.compile(backend="eager")  # dynamo alone decides which hooks run; no need for AOTAutograd here
        compiled = model
    else:
        compiled = torch.compile(model, backend="eager")
    x_t, x_s, t, s, y, _ = flow_batch(seed=0)
    compiled(x_t, t, y)  # the first compiled call traces the model as it is: without SRA's hooks
    sra = SelfRepresentationAlignment(compiled, student_layer=2, teacher_layer=3)
    compiled(x_t, t, y)
    assert sra._capture.record is None or sra._capture.record.tokens is None  # the compiled forward skips the block's hook
    with pytest.warns(RuntimeWarning, match=r"compiled before SelfRepresentationAlignment was created.*"
                                            r"create SelfRepresentationAlignment first, then call torch.compile\(model\)"):
        loss = sra(compiled, x_t, x_s, t, s, y)
    assert torch.isfinite(loss) and loss.requires_grad  # the fallback pass still trains
    # The fix the warning names: re-trace with the hooks in place.
    torch._dynamo.reset()
    compiled(x_t, t, y)
    assert sra._capture.record.tokens is not None


def test_uncompiled_fallback_warning_has_no_compile_hint():
    model, sra, _ = build()
    x_t, x_s, t, s, y, _ = flow_batch(seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sra(model, x_t, x_s, t, s, y)
    assert len(caught) == 1 and "torch.compile" not in str(caught[0].message)


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_in_place_after_sra_feeds_capture_and_fallback_runs(scope):
    """``model.compile()`` or ``block.compile()`` for every block (a common way to compile big models),
    after sra: the compiled forward feeds the capture, and a fallback pass (here: sra called on
    another input) still stops after the student block instead of failing."""
    model, sra, _ = build()
    for module in [model] if scope == "model" else list(model.blocks):
        module.compile(backend="eager")
    x_t, x_s, t, s, y, _ = flow_batch(seed=0)
    for _ in range(2):  # the second call runs the traced graph
        model(x_t, t, y)
        assert sra._capture.record.tokens is not None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sra(model, x_t, x_s, t, s, y)
    sra._warned.clear()
    with pytest.warns(RuntimeWarning, match="found no student features"):
        loss = sra(model, x_t + 1, x_s, t, s, y)
    assert torch.isfinite(loss) and loss.requires_grad
    assert all(getattr(m, "_compiled_call_impl", None) is not None for m in ([model] if scope == "model" else model.blocks))
