"""Gradient checkpointing: with each backbone's own switch on, the SRA loss and every gradient equal those
without it; the backward recompute never feeds the capture; where the student block runs inside a
reentrant checkpoint (its tokens carry no gradient) SRA raises instead of training only the head."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt
from torch import nn

from sra_plugin import SelfRepresentationAlignment, resolve_adapter
from tests.test_adapters import CASES, LightningDiTLike, inputs
from tests._models import TINY, randomise_gates


def diffusers_on(model: nn.Module) -> None:
    model.enable_gradient_checkpointing()  # non-reentrant, diffusers' default


def timm_on(model: nn.Module) -> None:
    model.set_grad_checkpointing(True)


def uvit_on(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = True


SWITCHES = {
    "diffusers-sd3": diffusers_on,
    "diffusers-flux": diffusers_on,
    "diffusers-dit": diffusers_on,  # its in-block label dropout is random: the recompute must replay it
    "timm-vit": timm_on,
    "uvit": uvit_on,  # checkpoint inside each block (reentrant, as upstream)
}


def step(name: str, checkpointing: bool, early_stop: bool = True):
    """One training step's SRA loss and gradients (model and head), from a fixed start. With
    ``early_stop=False`` the backward recompute runs each checkpointed block to its end, so the
    block's forward hooks fire during backward (with torch's default early stop they do not)."""
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        return _step(name, checkpointing)


def _step(name: str, checkpointing: bool):
    case = CASES[name]
    model = case.build()
    if checkpointing:
        SWITCHES[name](model)
    torch.manual_seed(0)
    sra = SelfRepresentationAlignment(model, student_layer=case.student, teacher_layer=case.teacher)
    x_t, x_s, x0, t, s, args, kwargs = inputs(case)
    model.train()
    torch.manual_seed(1)
    pred = case.call(model, x_t, t, args, kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = sra(model, x_t, x_s, t, s, *args, **kwargs)
    # The teacher's no-grad pass through checkpointed blocks is quiet (U-ViT checkpoints regardless of grad).
    assert not [w for w in caught if "requires_grad" in str(w.message)]
    target = x0 if pred.shape == x0.shape else torch.zeros_like(pred)
    (F.mse_loss(pred, target) + loss).backward()
    leftover = sra._capture.record  # what hooks firing during the backward recompute could have left
    grads = {n: p.grad.clone() for n, p in [*model.named_parameters(), *sra.head.named_parameters(prefix="head")] if p.grad is not None}
    return loss.detach(), grads, leftover


@pytest.mark.parametrize(
    "name, early_stop",
    [(name, True) for name in SWITCHES] + [("diffusers-sd3", False), ("timm-vit", False)],
)
def test_checkpointing_gives_the_same_loss_and_gradients(name: str, early_stop: bool) -> None:
    loss, grads, _ = step(name, checkpointing=False)
    loss_ckpt, grads_ckpt, leftover = step(name, checkpointing=True, early_stop=early_stop)
    assert leftover is None  # the recompute during backward was not captured
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-5, atol=1e-6)
    assert grads_ckpt.keys() == grads.keys() and len(grads) > 0
    for key in grads:
        torch.testing.assert_close(grads_ckpt[key], grads[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", list(SWITCHES))
def test_checkpointing_is_really_on(name: str) -> None:
    """The switches above do make the first block run again during backward (else the test above proves
    nothing). U-ViT checkpoints the block's body inside the block, so its attention is counted."""
    case = CASES[name]
    model = case.build()
    SWITCHES[name](model)
    model.train()
    first = resolve_adapter(model).blocks(model)[0]
    calls: list[int] = []
    handle = (first.attn if name == "uvit" else first).register_forward_pre_hook(lambda *a: calls.append(1))
    x_t, _, _, t, _, args, kwargs = inputs(case)
    case.call(model, x_t, t, args, kwargs).sum().backward()
    handle.remove()
    assert len(calls) == 2


def lightning(use_checkpoint: bool) -> nn.Module:
    torch.manual_seed(0)
    return randomise_gates(LightningDiTLike(use_checkpoint=use_checkpoint, **{**TINY, "learn_sigma": False}))


def test_reentrant_checkpoint_around_the_block_raises() -> None:
    """LightningDiT checkpoints each block reentrantly: the student's tokens carry no gradient."""
    case = CASES["lightningdit"]
    model = lightning(use_checkpoint=True)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    x_t, x_s, _, t, s, args, _ = inputs(case)
    model.train()
    model(x_t, t, *args)  # the user's forward itself still works
    with pytest.raises(RuntimeError, match="reentrant"):
        sra(model, x_t, x_s, t, s, *args)
    # No training forward first: SRA's own student pass finds the same and raises too.
    with pytest.warns(RuntimeWarning, match="no student features"), pytest.raises(RuntimeError, match="use_reentrant=False"):
        sra(model, x_t, x_s, t, s, *args)
    # The same model without checkpointing trains with SRA as usual.
    plain = lightning(use_checkpoint=False)
    sra_plain = SelfRepresentationAlignment(plain, student_layer=2, teacher_layer=4)
    plain.train()
    plain(x_t, t, *args)
    sra_plain(model=plain, x_t=x_t, x_s=x_s, t=t, s=s, y=args[0]).backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in plain.blocks[0].parameters())


def test_reentrant_checkpointing_in_diffusers_and_timm_raises() -> None:
    case = CASES["diffusers-sd3"]
    model = case.build()
    model.enable_gradient_checkpointing(functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True))
    sra = SelfRepresentationAlignment(model, student_layer=case.student, teacher_layer=case.teacher)
    x_t, x_s, _, t, s, args, kwargs = inputs(case)
    model.train()
    case.call(model, x_t, t, args, kwargs)
    with pytest.raises(RuntimeError, match="reentrant"):
        sra(model, x_t, x_s, t, s, **kwargs)

    case = CASES["timm-vit"]
    before = use_reentrant_ckpt()
    set_reentrant_ckpt(True)
    try:
        model = case.build()
        model.set_grad_checkpointing(True)
        sra = SelfRepresentationAlignment(model, student_layer=case.student, teacher_layer=case.teacher)
        x_t, x_s, _, t, s, args, kwargs = inputs(case)
        model.train()
        case.call(model, x_t, t, args, kwargs)
        with pytest.raises(RuntimeError, match="reentrant"):
            sra(model, x_t, x_s, t, s)
    finally:
        set_reentrant_ckpt(before)


def test_grad_disabled_on_purpose_is_not_an_error() -> None:
    """A forward under no_grad (evaluation in training mode) is simply not captured."""
    case = CASES["lightningdit"]
    model = lightning(use_checkpoint=True)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    x_t, x_s, _, t, s, args, _ = inputs(case)
    model.train()
    with torch.no_grad():
        model(x_t, t, *args)
    assert sra._capture.record is None
