"""Gradient accumulation: k micro-batches then one optimizer step give the same update as one batch
of k times the size (within float tolerance), for the model, the head and the EMA teacher."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from sra_plugin import SelfRepresentationAlignment
from sra_plugin.student import decode_state
from tests._models import flow_batch, tiny_sit

BATCH, K = 8, 4


def data(seed: int = 0):
    return flow_batch(BATCH, seed)


def build(loss: str):
    model = tiny_sit(seed=0, class_dropout_prob=0.0)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=5, loss=loss, ema_decay=0.5)
    opt = torch.optim.SGD([*model.parameters(), *sra.head.parameters()], lr=0.5)
    return model, sra, opt


def one_step(micro: int, loss_name: str):
    model, sra, opt = build(loss_name)
    x_t, x_s, t, s, y, target = data()
    size = BATCH // micro
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every micro-batch's own forward feeds its sra call
        for i in range(micro):
            part = slice(i * size, (i + 1) * size)
            pred = model(x_t[part], t[part], y[part])
            loss = F.mse_loss(pred, target[part]) + sra(model, x_t[part], x_s[part], t[part], s[part], y[part])
            (loss / micro).backward()
    grads = {n: p.grad.clone() for n, p in [*model.named_parameters(), *sra.head.named_parameters(prefix="head")] if p.grad is not None}
    opt.step()
    opt.zero_grad()
    sra.update_teacher()
    return grads, model.state_dict(), sra.state_dict()


@pytest.mark.parametrize("loss_name", ["smooth_l1", "cosine"])
def test_k_micro_batches_equal_one_big_batch(loss_name):
    grads_1, model_1, sra_1 = one_step(1, loss_name)
    grads_k, model_k, sra_k = one_step(K, loss_name)
    assert grads_1.keys() == grads_k.keys()
    assert any(k.startswith("head.") for k in grads_1) and any(k.startswith("blocks.1.") for k in grads_1)
    worst = max((grads_k[n] - grads_1[n]).abs().max().item() / grads_1[n].abs().max().clamp_min(1e-12).item() for n in grads_1)
    print(f"accumulation {loss_name}: batch {BATCH} as {K} x {BATCH // K}: max |grad diff| / max |grad| = {worst:.2e}")
    for name in grads_1:
        torch.testing.assert_close(grads_k[name], grads_1[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in model_1:
        torch.testing.assert_close(model_k[name], model_1[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in sra_1:
        if name != "_extra_state":
            torch.testing.assert_close(sra_k[name], sra_1[name], rtol=1e-4, atol=1e-6, msg=name)
    assert decode_state(sra_k["_extra_state"])["step"] == decode_state(sra_1["_extra_state"])["step"] == 1
    # The SRA term did move the model: without it the student block's gradients differ.
    model, _, _ = build(loss_name)
    x_t, _, t, _, y, target = data()
    F.mse_loss(model(x_t, t, y), target).backward()
    assert not torch.allclose(model.blocks[1].attn.qkv.weight.grad, grads_1["blocks.1.attn.qkv.weight"])
