"""No silent misuse IV (issue 27): each numbered case, as a user would hit it, against a reference
computed without the capture. Every test here failed on 0.3.0 (a silently wrong loss or gradient) and
passes now. Case 9 (FSDP2 and the head's view) is ``tests/test_fsdp.py``, which now fails on the warning."""

from __future__ import annotations

import gc
import io
import math
import warnings
import weakref

import pytest
import timm
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from examples.models import SiT
from sra_plugin import REPA, Dispersive, LayerSync, SelfRepresentationAlignment
from sra_plugin.dispersive import dispersive_loss
from sra_plugin.heads import MLPHead, build_head
from sra_plugin.repa import REPAProjector
from tests._models import TINY, flow_batch, no_warning, tiny_sit
from tests.test_misuse_finetune import lora, pretrained_sit

NULL = TINY["num_classes"]


def block_output(model: nn.Module, k: int, x, t, *cond) -> torch.Tensor:
    """Block k's output (1-based) in a plain forward, read by a throwaway hook."""
    out = []
    handle = model.blocks[k - 1].register_forward_hook(lambda m, a, o: out.append(o))
    try:
        model(x, t, *cond)
    finally:
        handle.remove()
    return out[0]


def layersync_reference(model, x_t, t, y, student=2, target=4) -> torch.Tensor:
    outs = {}
    handles = [model.blocks[k - 1].register_forward_hook(lambda m, a, o, k=k: outs.__setitem__(k, o)) for k in (student, target)]
    try:
        model(x_t, t, y)
    finally:
        for h in handles:
            h.remove()
    cos = F.cosine_similarity(outs[student], outs[target].detach(), dim=-1)
    return 0.2 * (1 - cos).mean()


# ---------------------------------------------------------------- 1. no-grad re-run reused with grad
def test_no_grad_rerun_is_not_reused_by_a_call_that_needs_gradients():
    model = pretrained_sit().eval()  # as diffusers' from_pretrained returns it
    logged = LayerSync(model, student_layer=2, target_layer=4)
    trained = Dispersive(model, layer=3, weight=0.25)
    x_t, _, t, _, y, _ = flow_batch()
    model(x_t, t, y)  # eval mode: not a training forward, nothing captured
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with torch.no_grad():
            logged(model, x_t, t, y)  # a logging call re-runs the student without grad
        loss = trained(model, x_t, t, y)
    assert loss.requires_grad, "the term with grad reused the no-grad re-run's tokens"
    reference = 0.25 * dispersive_loss(block_output(model, 3, x_t, t, y))
    torch.testing.assert_close(loss, reference)
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


# ---------------------------------------------------------------- 2. compiled model, x_t edited in place
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_x_t_edited_in_place_after_the_forward_is_detected(backend):
    torch._dynamo.reset()
    model = pretrained_sit().train()
    ls = LayerSync(model, student_layer=2, target_layer=4)
    compiled = torch.compile(model, backend=backend)
    x_t, _, t, _, y, _ = flow_batch()
    compiled(x_t, t, y)
    x_t.mul_(0.5).add_(0.3)  # edited in place after the forward
    with pytest.warns(RuntimeWarning, match="changed in place"):
        loss = ls(compiled, x_t, t, y)
    torch.testing.assert_close(loss, layersync_reference(model, x_t, t, y))
    # An untouched step reuses the compiled forward's tokens, with no warning and no re-run.
    x_t2, _, t2, _, y2, _ = flow_batch(seed=3)
    compiled(x_t2, t2, y2)
    no_warning(ls, compiled, x_t2, t2, y2)
    assert ls.metrics["student_reruns"] == 1
    torch._dynamo.reset()


# ---------------------------------------------------------------- 3. REPA: equal token counts, other grids
class WideViT(timm.models.vision_transformer.VisionTransformer):
    """A ViT denoiser on 16x64 inputs, patch 4: a 4x16 token grid (64 tokens)."""

    def forward(self, x, t):
        return super().forward(x)


def test_repa_equal_token_counts_on_different_grids_are_resized_not_paired_by_index():
    torch.manual_seed(0)
    model = WideViT(img_size=(16, 64), patch_size=4, in_chans=4, embed_dim=32, depth=3, num_heads=2, num_classes=0,
                    class_token=False, global_pool="")
    encoder = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=4, embed_dim=24, depth=1,
                                                               num_heads=2, num_classes=0)  # 8x8 grid, 64 tokens
    repa = REPA(model, encoder, layer=2, projector_dim=16)
    x_t = torch.randn(2, 4, 16, 64)
    images = torch.randn(2, 3, 32, 32)
    model.train()
    model(x_t, 0.5)
    loss = repa(model, x_t, 0.5, images=images)
    with torch.no_grad():
        enc = encoder.forward_features(images)[:, encoder.num_prefix_tokens:]  # (2, 64, 24) on 8x8
        grid = enc.transpose(1, 2).reshape(2, 24, 8, 8)
        target = F.interpolate(grid, size=(4, 16), mode="bilinear", align_corners=False, antialias=True)
        target = target.reshape(2, 24, 64).transpose(1, 2)
    tokens = block_output(model, 2, x_t, 0.5)[:, model.num_prefix_tokens:]
    reference = 0.5 * (1 - F.cosine_similarity(repa.head(tokens), target, dim=-1)).mean()
    torch.testing.assert_close(loss, reference)


# ---------------------------------------------------------------- 4. peft disable_adapters() reference forward
@pytest.mark.parametrize("method", ["layersync", "dispersive"])
def test_a_reference_forward_with_adapters_disabled_is_a_different_forward(method):
    model = lora(pretrained_sit()).train()
    objective = LayerSync(model, student_layer=2, target_layer=4) if method == "layersync" else Dispersive(model, layer=3, weight=0.25)
    x_t, _, t, _, y, _ = flow_batch()
    model(x_t, t, y)  # the training forward, adapters on
    with model.disable_adapter():
        model(x_t, t, y)  # the base model's prediction, with grad, same arguments
    with pytest.warns(RuntimeWarning, match="adapter"):
        loss = objective(model, x_t, t, y)
    base = model.base_model.model
    reference = layersync_reference(base, x_t, t, y) if method == "layersync" else \
        0.25 * dispersive_loss(block_output(base, 3, x_t, t, y))
    torch.testing.assert_close(loss, reference)
    loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and ".blocks.0." in n]
    assert all(g is not None for g in lora_grads) and any(bool(g.abs().sum() > 0) for g in lora_grads)


# ---------------------------------------------------------------- 5. a learnable weight
def test_a_learnable_weight_keeps_its_gradient():
    model = pretrained_sit().train()
    w = nn.Parameter(torch.tensor(0.3))
    ls = LayerSync(model, student_layer=2, target_layer=4, weight=w)
    x_t, _, t, _, y, _ = flow_batch()
    model(x_t, t, y)
    loss = ls(model, x_t, t, y)
    loss.backward()
    assert w.grad is not None
    torch.testing.assert_close(w.grad, torch.tensor(ls.metrics["align_loss"]))
    assert "weight" not in dict(ls.named_parameters()) and "weight" not in ls.state_dict()  # the user's, not ours
    # A schedule returning a tensor with a graph (e.g. uncertainty weighting exp(-s)) keeps it too.
    s = nn.Parameter(torch.tensor(0.1))
    ls2 = LayerSync(model, student_layer=2, target_layer=4, weight=lambda step: torch.exp(-s))
    model(x_t, t, y)
    ls2(model, x_t, t, y).backward()
    assert s.grad is not None and float(s.grad) < 0


# ---------------------------------------------------------------- 6. a module called alone in between
def test_a_label_embedding_called_alone_does_not_change_the_teachers_conditioning():
    torch.manual_seed(0)
    model = tiny_sit(class_dropout_prob=0.5).train()  # labels dropped for CFG inside the forward
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    x_t, x_s, t, s, y, _ = flow_batch(n=8)
    seen = {}
    hooks = [model.y_embedder.embedding_table.register_forward_hook(lambda m, a, o: seen.update(y=a[0])),
             model.blocks[1].register_forward_hook(lambda m, a, o: seen.update(student=o))]
    model(x_t, t, y)
    for h in hooks:
        h.remove()
    model.y_embedder(y, False, torch.ones_like(y))  # the null-label embedding for a CFG batch, alone, with grad
    loss = sra(model, x_t, x_s, t, s, y)
    with torch.no_grad():
        target = block_output(sra.teacher.eval(), 4, x_s, s, seen["y"])  # the labels the training forward used
    reference = 0.2 * F.smooth_l1_loss(sra.head(seen["student"]), target, beta=0.05)
    torch.testing.assert_close(loss, reference)


# ---------------------------------------------------------------- 7. a custom forward's own state
class GainSiT(SiT):
    """A SiT whose forward sets its own attribute at its start and resets it at its end (no finally)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.gain = 1.0
        self.log = {"mode": "idle"}

    def forward(self, x, t, y):
        self.gain = self.gain * 0.5
        self.log["mode"] = "busy"
        out = super().forward(x, t, y) / (2 * self.gain)
        self.gain = self.gain * 2
        self.log["mode"] = "idle"
        return out


@pytest.mark.parametrize("kind", ["full copy", "shared weights"])
def test_a_stopped_pass_leaves_a_custom_forwards_own_state_as_a_completed_forward(kind):
    model = pretrained_sit(GainSiT).train()
    if kind == "shared weights":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("blocks.0."))  # mostly frozen: the shared-weight EMA
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    teacher_module = model if kind == "shared weights" else sra.teacher
    for seed in range(3):
        x_t, x_s, t, s, y, _ = flow_batch(seed=seed)
        model(x_t, t, y)
        sra(model, x_t, x_s, t, s, y)
    assert model.gain == 1.0 and teacher_module.gain == 1.0
    assert model.log == {"mode": "idle"} and teacher_module.log == {"mode": "idle"}


# ---------------------------------------------------------------- 8. update_teacher() under accumulation
def test_update_teacher_on_every_micro_batch_counts_only_optimizer_steps():
    model = pretrained_sit().train()
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, ema_decay=0.5)
    opt = torch.optim.SGD([*model.parameters(), *sra.head.parameters()], lr=0.1)
    accumulation = 4
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}  # the EMA starts at the first call
    with pytest.warns(RuntimeWarning, match="no optimizer step"):
        for i in range(8):
            x_t, x_s, t, s, y, target = flow_batch(seed=i)
            pred = model(x_t, t, y)
            ((F.mse_loss(pred, target) + sra(model, x_t, x_s, t, s, y)) / accumulation).backward()
            if (i + 1) % accumulation == 0:
                opt.step()
                opt.zero_grad()
                with torch.no_grad():  # the EMA by hand, at optimizer steps only
                    expected = {n: 0.5 * expected[n] + 0.5 * p for n, p in model.named_parameters()}
            sra.update_teacher()  # "after optimizer.step()", inside accelerate's accumulate: every micro-batch
    assert sra.step == 2
    teacher = dict(sra.teacher.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(teacher[name], value, msg=name)


# ---------------------------------------------------------------- 9. heads return no view
@pytest.mark.parametrize("head", [lambda: MLPHead(8, 6), lambda: build_head("linear", 8, 6), lambda: REPAProjector(8, 6, 16)])
def test_heads_return_a_tensor_that_is_not_a_view(head):
    out = head()(torch.randn(2, 5, 8, requires_grad=True))
    assert out._base is None


# ---------------------------------------------------------------- 10. Dispersive at large feature sizes
def _distances_float64(z: torch.Tensor) -> torch.Tensor:
    """Squared distances of every pair, accumulated in float64 in chunks (the reference)."""
    b = z.shape[0]
    d = torch.zeros(b, b, dtype=torch.float64)
    for chunk in z.split(1 << 24, dim=1):
        c = chunk.double()
        for i in range(b):
            d[i] += ((c[i:i + 1] - c) ** 2).sum(1)
    return d


@pytest.mark.slow
def test_dispersive_distances_stay_exact_at_large_feature_sizes():
    size = 1 << 27
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, size, generator=g) * 0.05 + 4.0  # large offset: cancellation in |a|^2 - 2ab + |b|^2
    d = _distances_float64(z) / size
    exact = torch.logsumexp(-d.flatten(), 0) - math.log(9)
    got = dispersive_loss(z)
    assert abs(float(got) - float(exact)) < 1e-5 * max(1.0, abs(float(exact))), (float(got), float(exact))


# ---------------------------------------------------------------- the red team's cases against the fixes above
def _accumulate(model, sra, micro_batches: int, first_seed: int = 0, between=None) -> int:
    """``micro_batches`` micro-batches, an SGD step every 4, ``update_teacher()`` after each; returns the
    optimizer steps. ``between(i)`` runs after each micro-batch's backward."""
    opt = torch.optim.SGD([*model.parameters(), *sra.head.parameters()], lr=0.1)
    steps = 0
    for i in range(first_seed, first_seed + micro_batches):
        x_t, x_s, t, s, y, target = flow_batch(seed=i)
        ((F.mse_loss(model(x_t, t, y), target) + sra(model, x_t, x_s, t, s, y)) / 4).backward()
        if between is not None:
            between(i)
        if (i + 1) % 4 == 0:
            opt.step()
            opt.zero_grad()
            steps += 1
        sra.update_teacher()
    return steps


def test_update_teacher_ignores_another_models_optimizer_stepping_every_micro_batch():
    model = pretrained_sit().train()
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, ema_decay=0.5)
    critic = nn.Linear(4, 1)
    critic_opt = torch.optim.SGD(critic.parameters(), lr=0.1)

    def critic_step(i):
        critic(torch.randn(2, 4)).sum().backward()
        critic_opt.step()

    with pytest.warns(RuntimeWarning, match="no optimizer step"):
        steps = _accumulate(model, sra, 8, between=critic_step)
    assert steps == 2 and sra.step == 2


def test_teacher_weights_for_sampling_is_not_an_optimizer_step():
    model = pretrained_sit().train()
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, ema_decay=0.5)
    x_t, _, t, _, y, _ = flow_batch()

    def sample(i):
        if i % 4 == 1:
            with torch.no_grad(), sra.teacher_weights():  # swaps the EMA weights in and back (copy_)
                model(x_t, t, y)

    with pytest.warns(RuntimeWarning, match="no optimizer step"):
        steps = _accumulate(model, sra, 8, between=sample)
    assert steps == 2 and sra.step == 2


def test_a_pickled_and_loaded_objective_counts_no_step_for_the_first_micro_batch():
    model = pretrained_sit().train()
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, ema_decay=0.5)
    with pytest.warns(RuntimeWarning, match="no optimizer step"):
        _accumulate(model, sra, 4)
    buffer = io.BytesIO()
    torch.save({"model": model, "sra": sra}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    model, sra = loaded["model"], loaded["sra"]
    before = [p.detach().clone() for p in sra.teacher.parameters()]
    x_t, x_s, t, s, y, _ = flow_batch(seed=50)
    model(x_t, t, y)
    sra(model, x_t, x_s, t, s, y).backward()
    with pytest.warns(RuntimeWarning, match="no optimizer step"):
        sra.update_teacher()  # a micro-batch with no optimizer step since the save
    assert sra.step == 1 and all(torch.equal(a, b) for a, b in zip(before, sra.teacher.parameters()))


@pytest.mark.parametrize("method", ["sra", "layersync"])
def test_a_model_trained_with_an_objective_is_freed_with_it(method):
    def run():
        model = pretrained_sit().train()
        objective = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4) if method == "sra" \
            else LayerSync(model, student_layer=2, target_layer=4)
        x_t, x_s, t, s, y, _ = flow_batch()
        model(x_t, t, y)
        x_t2, x_s2, t2, s2, y2, _ = flow_batch(seed=1)  # no forward: a stopped re-run
        with pytest.warns(RuntimeWarning):
            loss = objective(model, x_t2, x_s2, t2, s2, y2) if method == "sra" else objective(model, x_t2, t2, y2)
        loss.backward()
        return weakref.ref(model), weakref.ref(objective)

    model, objective = run()
    gc.collect()
    assert objective() is None and model() is None


class LazyBufferSiT(SiT):
    """A buffer registered as None and filled by every forward (a per-step statistic)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("last_mean", None, persistent=False)

    def forward(self, x, t, y):
        self.last_mean = x.mean(0)  # a tensor of many values
        return super().forward(x, t, y)


def test_a_buffer_filled_by_the_forward_survives_stopped_passes():
    model = pretrained_sit(LazyBufferSiT).train()
    ls = LayerSync(model, student_layer=2, target_layer=4)
    x_v, _, t_v, _, y_v, _ = flow_batch(seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with torch.no_grad():
            ls(model, x_v, t_v, y_v)  # a validation call first: a stopped re-run while the buffer is None
        x_t, _, t, _, y, _ = flow_batch(seed=0)
        model(x_t, t, y)
        ls(model, x_t, t, y)
        x2, _, t2, _, y2, _ = flow_batch(seed=1)
        loss = ls(model, x2, t2, y2)  # a stopped re-run with the buffer holding a tensor
    torch.testing.assert_close(loss, layersync_reference(model, x2, t2, y2))
    assert torch.is_tensor(model.last_mean)


def test_a_lora_scale_that_a_forward_leaves_a_rounding_step_off_is_no_other_adapter_state():
    from tests.test_misuse_finetune import ScalingSiT

    torch.manual_seed(0)
    base = pretrained_sit(ScalingSiT)
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=6, target_modules=r".*\.attn\.(qkv|proj)"))
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    for seed in range(3):  # scaling 1.5 * 0.7 / 0.7 = 1.4999999999999998 after the first forward
        x_t, x_s, t, s, y, _ = flow_batch(seed=seed)
        model(x_t, t, y, lora_scale=0.7)
        no_warning(sra, model, x_t, x_s, t, s, y, lora_scale=0.7)
    assert sra.metrics["student_reruns"] == 0


def test_a_learnable_weight_is_read_without_a_warning():
    model = pretrained_sit().train()
    w = nn.Parameter(torch.tensor(0.3))
    ls = no_warning(LayerSync, model, student_layer=2, target_layer=4, weight=w)
    x_t, _, t, _, y, _ = flow_batch()
    model(x_t, t, y)
    no_warning(ls, model, x_t, t, y)
    assert no_warning(lambda: ls.metrics)["weight"] == pytest.approx(0.3)
