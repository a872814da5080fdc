"""Issue 19's core rules on the family's other objectives (LayerSync, Dispersive, REPA), which share
SRA's capture and template: the step rule, sample_weight checks, an argument missing from the call,
the restore after a stopped re-run, inference-mode conditioning and ``x_t.data`` rebinding."""

from __future__ import annotations

import pytest
import timm
import torch

from sra_plugin import REPA, Dispersive, LayerSync, SelfRepresentationAlignment, schedules
from tests._models import flow_batch, no_warning
from tests.test_misuse_finetune import ContextSiT, ScalingSiT, lora, lora_scalings, pretrained_sit

IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def encoder() -> torch.nn.Module:
    """A random timm ViT with a 4x4 patch grid on 32x32 images: the tiny SiT's token grid."""
    torch.manual_seed(7)
    return timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=1,
                                                            num_heads=2, num_classes=0)


def build(method: str, model: torch.nn.Module, **options):
    if method == "layersync":
        return LayerSync(model, student_layer=2, target_layer=4, **options), {}
    if method == "dispersive":
        return Dispersive(model, layer=3, **options), {}
    return REPA(model, encoder(), layer=2, projector_dim=16, **options), {"images": IMAGES}


METHODS = ["layersync", "dispersive", "repa"]


@pytest.mark.parametrize("method", METHODS)
def test_family_step_counts_training_calls_only_and_a_call_that_raises_counts_none(method):
    model = pretrained_sit()
    objective, extra = build(method, model, weight=schedules.linear(0.0, 0.4, 0, 4))
    x_t, _, t, _, y, _ = flow_batch()
    assert objective(model, x_t, t, y, **extra).item() == 0.0 and objective.step == 1  # weight(0) = 0: skipped, counted
    model(x_t, t, y)
    no_warning(objective, model, x_t, t, y, **extra)
    assert objective.step == 2 and objective.metrics["weight"] == pytest.approx(0.1)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="no training forward"):
        objective(model, x_t, t, y, **extra)  # validation (re-runs the student): no step
    assert objective.step == 2
    with pytest.raises(ValueError, match="model="):
        objective(torch.nn.Linear(2, 2), x_t, t, y, **extra)
    assert objective.step == 2


@pytest.mark.parametrize("bad, error, words", [
    (torch.tensor([1.0, -0.5, 1.0, 1.0]), ValueError, ["sample_weight[1]=-0.5", ">= 0"]),
    (torch.tensor([1.0, 1.0, float("nan"), 1.0]), ValueError, ["sample_weight[2]=nan", "finite"]),
    (torch.ones(4, dtype=torch.int64), TypeError, ["torch.int64", "floating"]),
])
@pytest.mark.parametrize("method", ["layersync", "repa"])
def test_family_sample_weight_negative_nonfinite_or_integer_is_refused_naming_it(method, bad, error, words):
    model = pretrained_sit()
    objective, extra = build(method, model)
    x_t, _, t, _, y, _ = flow_batch()
    model(x_t, t, y)
    with pytest.raises(error) as info:
        objective(model, x_t, t, y, sample_weight=bad, **extra)
    for word in words:
        assert word in str(info.value), str(info.value)
    assert objective.step == 0
    ok = no_warning(objective, model, x_t, t, y, sample_weight=torch.tensor([1.0, 0.0, 2.0, 1.0]), **extra)
    assert torch.isfinite(ok) and objective.step == 1 and objective.metrics["student_reruns"] == 0


def test_dispersive_still_refuses_any_sample_weight():
    model = pretrained_sit()
    disp, _ = build("dispersive", model)
    x_t, _, t, _, y, _ = flow_batch()
    model(x_t, t, y)
    with pytest.raises(ValueError, match="sample_weight=Tensor is not accepted by Dispersive"):
        disp(model, x_t, t, y, sample_weight=torch.ones(4))
    assert disp.step == 0


def test_dispersive_refuses_a_batch_of_one_which_would_give_zero_loss_and_no_gradient():
    """A LoRA fine-tune at batch 1 per GPU (the diffusers scripts' default) would get nothing from it."""
    model = pretrained_sit()
    disp, _ = build("dispersive", model)
    x_t, _, t, _, y, _ = flow_batch()
    model(x_t[:1], t[:1], y[:1])
    with pytest.raises(ValueError, match="x_t has a batch of 1, which Dispersive cannot use.*per process"):
        disp(model, x_t[:1], t[:1], y[:1])
    assert disp.step == 0
    model(x_t[:2], t[:2], y[:2])
    assert disp(model, x_t[:2], t[:2], y[:2]).item() < 0 and disp.step == 1  # two samples: a real term


@pytest.mark.parametrize("method", METHODS)
def test_family_argument_missing_from_the_call_is_named_and_the_forward_kept(method):
    model = pretrained_sit()
    objective, extra = build(method, model)
    x_t, _, t, _, y, _ = flow_batch()
    model(x_t, t, y)
    with pytest.raises(ValueError, match=r"lacks 'y'.*pass y=\.\.\."):
        objective(model, x_t, t, **extra)
    assert objective.step == 0
    assert torch.isfinite(no_warning(objective, model, x_t, t, y=y, **extra))
    assert objective.metrics["student_reruns"] == 0


def test_a_missing_argument_in_one_objective_leaves_the_shared_forward_to_the_others():
    model = pretrained_sit()
    ls = LayerSync(model, student_layer=2, target_layer=4)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    x_t, x_s, t, s, y, _ = flow_batch()
    model(x_t, t, y)
    with pytest.raises(ValueError, match="lacks 'y'"):
        ls(model, x_t, t)
    no_warning(sra, model, x_t, x_s, t, s, y)
    no_warning(ls, model, x_t, t, y)
    assert sra.metrics["student_reruns"] == 0 and ls.metrics["student_reruns"] == 0


@pytest.mark.parametrize("method", METHODS)
def test_family_rerun_restores_lora_scaling_of_a_forward_that_scales_then_unscales(method):
    model = lora(pretrained_sit(ScalingSiT))
    objective, extra = build(method, model)
    x_t, _, t, _, y, _ = flow_batch()
    before = lora_scalings(model)
    with torch.no_grad():
        expected = model(x_t, t, y, lora_scale=0.5)
    with pytest.warns(RuntimeWarning, match="no training forward"):  # warned once, at the first
        for _ in range(3):
            objective(model, x_t, t, y, lora_scale=0.5, **extra)  # the student re-run stops after its deepest tap
    assert objective.metrics["student_reruns"] == 3
    assert lora_scalings(model) == before
    with torch.no_grad():
        torch.testing.assert_close(model(x_t, t, y, lora_scale=0.5), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_family_inference_mode_conditioning_trains_and_x_t_data_rebinding_is_detected(method):
    model = pretrained_sit(ContextSiT)
    objective, extra = build(method, model)
    x_t, _, t, _, y, target = flow_batch()
    with torch.inference_mode():
        context = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    loss = torch.nn.functional.mse_loss(model(x_t, t, y, context), target)
    (loss + no_warning(objective, model, x_t, t, y, context, **extra)).backward()
    assert objective.metrics["student_reruns"] == 0
    model(x_t, t, y, context)
    x_t.data = x_t.data + 1.0  # bumps no version counter
    with pytest.warns(RuntimeWarning, match="changed in place"):
        objective(model, x_t, t, y, context, **extra)
    assert objective.metrics["student_reruns"] == 1
