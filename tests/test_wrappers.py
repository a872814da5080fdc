"""Unwrapping (``sra_plugin/wrappers.py``): peft's ``PeftModel``, its tuner (``LoraModel``) and the model
inside are one model to SRA, whichever is passed and whichever the loop trains through."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sra_plugin import SelfRepresentationAlignment
from sra_plugin.wrappers import unwrap
from tests._models import flow_batch, optimizer_step, tiny_sit

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

LEVELS = ("PeftModel", "LoraModel", "inner")


def lora_sit():
    model = tiny_sit(seed=0, class_dropout_prob=0.0)
    nn.init.normal_(model.final_layer.linear.weight, std=0.05)  # a "pretrained" output layer
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=r".*\.attn\.(qkv|proj)"))
    levels = {"PeftModel": peft_model, "LoraModel": peft_model.base_model, "inner": model}
    return levels


def test_peft_levels_unwrap_to_the_model_with_the_adapters():
    levels = lora_sit()
    assert [type(m).__name__ for m in levels.values()] == ["PeftModel", "LoraModel", "SiT"]
    assert all(unwrap(m) is levels["inner"] for m in levels.values())
    assert any("lora_A" in n for n, _ in levels["inner"].named_parameters())


def test_modules_outside_peft_with_a_model_attribute_are_not_unwrapped():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Linear(2, 2)
            self.base_model = nn.Linear(2, 2)

    holder = Holder()
    assert unwrap(holder) is holder


@pytest.mark.parametrize("train_through", LEVELS)
@pytest.mark.parametrize("built_with", LEVELS)
def test_capture_fires_whichever_level_is_passed_and_trained(built_with, train_through):
    levels = lora_sit()
    sra = SelfRepresentationAlignment(levels[built_with], student_layer=2, teacher_layer=4)
    assert sra.ema.shared  # the base is frozen: the EMA holds the LoRA parameters only
    model = levels[train_through]
    x_t, x_s, t, s, y, target = flow_batch(4, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        pred = model(x_t, t, y)
        align = sra(model, x_t, x_s, t, s, y)
    assert sra.metrics["student_reruns"] == 0 and float(align.detach()) > 0
    (F.mse_loss(pred, target) * 0 + align).backward()  # only the SRA term: it reaches the adapters up to L_s
    grads = {n: p.grad for n, p in levels["inner"].named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("blocks.1.") and "lora_B" in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n.startswith(("blocks.2.", "blocks.3.")))
    optimizer_step(model)
    sra.update_teacher()
    assert sra.step == 1


def test_a_peft_model_of_another_model_is_refused():
    levels, other = lora_sit(), lora_sit()
    sra = SelfRepresentationAlignment(levels["PeftModel"], student_layer=2, teacher_layer=4)
    x_t, x_s, t, s, y, _ = flow_batch(4, 0)
    other["PeftModel"](x_t, t, y)
    with pytest.raises(ValueError, match="not the model this SelfRepresentationAlignment was built on"):
        sra(other["PeftModel"], x_t, x_s, t, s, y)
