"""AMP: under ``torch.autocast`` the SRA loss is finite and float32, the teacher pass runs under the
same autocast, and the loss matches a float32 computation on the same (low-precision) features.
bf16 on CPU always; fp16 and bf16 on CUDA when a GPU is present."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from sra_plugin import SelfRepresentationAlignment
from tests._models import flow_batch, tiny_sit

CASES = [("cpu", torch.bfloat16)]
if torch.cuda.is_available():
    CASES += [("cuda", torch.float16), ("cuda", torch.bfloat16)]


@pytest.mark.parametrize("device,dtype", CASES, ids=[f"{d}-{str(t).split('.')[-1]}" for d, t in CASES])
@pytest.mark.parametrize("loss_name", ["smooth_l1", "cosine"])
def test_autocast_loss_is_float32_and_teacher_runs_under_autocast(device, dtype, loss_name):
    model = tiny_sit(class_dropout_prob=0.0).to(device)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=5, loss=loss_name).to(device)
    x_t, x_s, t, s, y, target = (v.to(device) for v in flow_batch(seed=1))
    seen = {}

    def keep(name):  # forward hooks must return None, or they replace the output
        def hook(module, args, output):
            seen.setdefault(name, output)
        return hook

    def autocast_state(module, args):
        seen.setdefault("autocast", torch.is_autocast_enabled(device))

    sra.teacher.blocks[4].attn.qkv.register_forward_pre_hook(autocast_state)
    sra.teacher.blocks[4].attn.qkv.register_forward_hook(keep("teacher_linear"))
    sra.teacher.blocks[4].register_forward_hook(keep("target"))
    model.blocks[1].attn.qkv.register_forward_hook(keep("student_linear"))
    model.blocks[1].register_forward_hook(keep("student"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast(device_type=device, dtype=dtype):
            pred = model(x_t, t, y)
            align = sra(model, x_t, x_s, t, s, y)
            loss = F.mse_loss(pred.float(), target) + align
    # The teacher ran under the caller's autocast: its matmuls are in low precision.
    assert seen["autocast"] is True and seen["teacher_linear"].dtype == dtype
    assert seen["student_linear"].dtype == dtype
    assert align.dtype == torch.float32 and torch.isfinite(align) and align.item() > 0
    # The alignment itself is computed in float32 from the low-precision features.
    with torch.autocast(device_type=device, dtype=dtype):
        head_out = sra.head(seen["student"])
    reference = {
        "smooth_l1": lambda p, q: F.smooth_l1_loss(p, q, beta=0.05),
        "cosine": lambda p, q: (1 - F.cosine_similarity(p, q, dim=-1)).mean(),
    }[loss_name](head_out.float(), seen["target"].detach().float())
    torch.testing.assert_close(align, sra.current_weight() * reference, rtol=1e-5, atol=1e-6)
    loss.backward()
    for p in [*model.parameters(), *sra.head.parameters()]:
        if p.grad is not None:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    assert sra.head[0].weight.grad is not None and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(v == v and abs(v) != float("inf") for v in sra.metrics.values())


def test_autocast_fallback_pass_also_runs_under_autocast():
    model = tiny_sit(class_dropout_prob=0.0)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=5)
    x_t, x_s, t, s, y, _ = flow_batch(seed=1)
    dtypes = []
    model.blocks[1].attn.qkv.register_forward_hook(lambda m, a, o: dtypes.append(o.dtype))
    with pytest.warns(RuntimeWarning, match="found no student features"):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            align = sra(model, x_t, x_s, t, s, y)
    assert dtypes == [torch.bfloat16] and align.dtype == torch.float32 and torch.isfinite(align)
