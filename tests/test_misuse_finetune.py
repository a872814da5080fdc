"""No silent misuse III (issue 19), the core library's cases: the fine-tuning world's call patterns.
Each test is named after its case and goes through the public API only; each failed on 0.2.0."""

from __future__ import annotations

import copy
import os
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sra_plugin import LatentAlignment, SelfRepresentationAlignment, schedules
from tests._models import TINY, flow_batch, free_port, no_warning, optimizer_step, randomise_gates, tiny_sit
from examples.models import SiT

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

LAYERS = dict(student_layer=2, teacher_layer=4)


def pretrained_sit(cls: type = SiT, seed: int = 0) -> nn.Module:
    """A tiny SiT without label dropout and with a non-zero output layer (frozen bases pass gradients)."""
    torch.manual_seed(seed)
    model = randomise_gates(cls(**{**TINY, "class_dropout_prob": 0.0}))
    nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    return model


def lora(model: nn.Module, seed: int = 0) -> nn.Module:
    """peft LoRA (rank 4) on every block's attention, base frozen, ``lora_B`` random so it counts."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=r".*\.attn\.(qkv|proj)"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return peft_model


def lora_scalings(model: nn.Module) -> dict[str, dict[str, float]]:
    return {name: dict(m.scaling) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


# ---------------------------------------------------------------- 1. stopped pass restores state
class ScalingSiT(SiT):
    """A SiT whose forward scales every LoRA layer by ``lora_scale`` and unscales it after the last block
    with plain calls, as diffusers 0.30's transformers do with ``attention_kwargs={"scale": s}``."""

    def forward(self, x, t, y, lora_scale: float = 1.0):
        for m in self.modules():
            if isinstance(m, BaseTunerLayer):
                m.scale_layer(lora_scale)
        out = super().forward(x, t, y)
        for m in self.modules():
            if isinstance(m, BaseTunerLayer):
                m.unscale_layer(lora_scale)
        return out


def test_stopped_pass_restores_lora_scaling_of_a_forward_that_scales_then_unscales():
    model = lora(pretrained_sit(ScalingSiT))
    sra = SelfRepresentationAlignment(model, **LAYERS)
    x_t, x_s, t, s, y, _ = flow_batch()
    before = lora_scalings(model)
    assert before and all(v == {"default": 1.0} for v in before.values())
    with torch.no_grad():
        expected = model(x_t, t, y, lora_scale=0.5)
    for _ in range(3):
        model(x_t, t, y, lora_scale=0.5)
        no_warning(sra, model, x_t, x_s, t, s, y, lora_scale=0.5).backward()  # teacher pass stopped at block 4
    with pytest.warns(RuntimeWarning, match="no training forward"):
        sra(model, x_t, x_s, t, s, y, lora_scale=0.5)  # the student re-run is stopped too
    assert lora_scalings(model) == before
    with torch.no_grad():
        torch.testing.assert_close(model(x_t, t, y, lora_scale=0.5), expected, rtol=0, atol=0)


def test_stopped_pass_restores_lora_scaling_on_diffusers_flux_with_joint_attention_scale():
    """The real call: diffusers Flux + peft LoRA + ``joint_attention_kwargs={"scale": 0.5}`` (diffusers
    0.42 unscales in a ``finally``; 0.30 did not, and there the restore is what keeps the scaling:
    ``benchmarks/lora_scale_stopped_pass.py`` checks it in a 0.30 environment)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    sra = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=3)
    g = torch.Generator().manual_seed(0)
    x_t, x_s = torch.randn(2, 16, 4, generator=g), torch.randn(2, 16, 4, generator=g)
    grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3)
    cond = dict(encoder_hidden_states=torch.randn(2, 3, 16, generator=g), pooled_projections=torch.randn(2, 8, generator=g),
                img_ids=grid, txt_ids=torch.zeros(3, 3), joint_attention_kwargs={"scale": 0.5}, return_dict=False)
    t, s = torch.tensor([0.7, 0.5]), torch.tensor([0.6, 0.4])
    before = lora_scalings(model)
    with torch.no_grad():
        expected = model(x_t, timestep=t, **cond)[0]
    for _ in range(3):
        model(x_t, timestep=t, **cond)
        sra(model, x_t, x_s, t, s, **cond)
    assert lora_scalings(model) == before
    with torch.no_grad():
        torch.testing.assert_close(model(x_t, timestep=t, **cond)[0], expected, rtol=0, atol=0)


# ---------------------------------------------------------------- 2. merged / fused LoRA
def trained_lora_pair():
    """A LoRA SiT and its SRA (shared-weight EMA, decay 0.5) after two training steps: EMA != weights."""
    model = lora(pretrained_sit())
    sra = SelfRepresentationAlignment(model, **LAYERS, ema_decay=0.5)
    opt = torch.optim.SGD([*[p for p in model.parameters() if p.requires_grad], *sra.head.parameters()], lr=0.5)
    for seed in range(2):
        x_t, x_s, t, s, y, target = flow_batch(seed=seed)
        (F.mse_loss(model(x_t, t, y), target) + sra(model, x_t, x_s, t, s, y)).backward()
        opt.step()
        opt.zero_grad()
        sra.update_teacher()
    return model, sra


def test_fused_lora_teacher_weights_teacher_pass_and_update_are_refused_until_unmerged():
    model, sra = trained_lora_pair()
    x_t, x_s, t, s, y, _ = flow_batch(seed=5)
    with torch.no_grad(), sra.teacher_weights():
        teacher_out = model(x_t, t, y)  # unmerged: the EMA's output
    model.merge_adapter()  # what diffusers' fuse_lora() does to each layer
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = {k: v.clone() for k, v in sra.state_dict().items() if "ema" in k}
    for attempt in (lambda: sra.teacher_weights().__enter__(),
                    lambda: (model(x_t, t, y), sra(model, x_t, x_s, t, s, y)),
                    sra.update_teacher):
        with pytest.raises(ValueError, match=r"merged into\s+their base weights.*unmerge_adapter\(\).*unfuse_lora\(\)"):
            attempt()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert all(torch.equal(v, ema[k]) for k, v in sra.state_dict().items() if "ema" in k)
    model.unmerge_adapter()
    with torch.no_grad(), sra.teacher_weights():
        torch.testing.assert_close(model(x_t, t, y), teacher_out, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(model(x_t, t, y), teacher_out, atol=1e-4)  # so the check above could fail


def test_fused_lora_of_a_user_kept_teacher_is_refused_by_teacher_weights():
    model = lora(pretrained_sit())
    ema = copy.deepcopy(model)
    sra = SelfRepresentationAlignment(model, **LAYERS, teacher=ema)
    ema.merge_adapter()  # the teacher's base would be swapped into an unmerged student: LoRA counted twice
    with pytest.raises(ValueError, match="unmerge"):
        with sra.teacher_weights():
            pass
    ema.unmerge_adapter()
    with sra.teacher_weights():
        pass


def test_fused_lora_in_diffusers_is_refused_by_teacher_weights():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    sra = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=2)
    model.fuse_lora()
    with pytest.raises(ValueError, match="unfuse_lora"):
        with sra.teacher_weights():
            pass
    model.unfuse_lora()
    with sra.teacher_weights():
        pass


# ---------------------------------------------------------------- 5. one step rule
def test_user_ema_without_update_teacher_still_moves_a_warmup_schedule():
    model = pretrained_sit()
    sra = SelfRepresentationAlignment(model, **LAYERS, teacher=copy.deepcopy(model), weight=schedules.linear(0.0, 0.2, 0, 2))
    weights = []
    for step in range(4):
        x_t, x_s, t, s, y, _ = flow_batch(seed=step)
        model(x_t, t, y)
        sra(model, x_t, x_s, t, s, y)
        weights.append(sra.metrics["weight"])
    assert weights == [0.0, 0.1, 0.2, 0.2] and sra.step == 4
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="no training forward"):  # evaluation calls count no step
        sra(model, x_t, x_s, t, s, y)
    assert sra.step == 4


def test_step_rule_is_the_same_for_latent_alignment():
    model = pretrained_sit()
    align = LatentAlignment(model, layer=2, weight=schedules.linear(0.0, 0.2, 0, 2))
    for step in range(3):
        x_t, _, t, _, y, target = flow_batch(seed=step)
        model(x_t, t, y)
        align(model, x_t, x_t - t.view(-1, 1, 1, 1) * target, t, y)
    assert align.step == 3 and align.metrics["weight"] == 0.2


def test_step_counts_optimizer_steps_under_accumulation_once_update_teacher_is_called():
    model = pretrained_sit()
    sra = SelfRepresentationAlignment(model, **LAYERS, weight=schedules.linear(0.0, 0.2, 0, 2))
    seen = []
    for k in range(3):
        for micro in range(4):
            x_t, x_s, t, s, y, _ = flow_batch(seed=10 * k + micro)
            model(x_t, t, y)
            sra(model, x_t, x_s, t, s, y)
            seen.append(sra.metrics["weight"])
        optimizer_step(model)
        sra.update_teacher()
        assert sra.step == k + 1
    # the first optimizer step's micro-batches counted before update_teacher() was ever called
    assert seen[4:] == [0.1] * 4 + [0.2] * 4


def test_a_step_stuck_after_one_update_teacher_warns_once(monkeypatch):
    from sra_plugin import student

    monkeypatch.setattr(student, "STILL_STEP_CALLS", 3)
    model = pretrained_sit()
    sra = SelfRepresentationAlignment(model, **LAYERS)
    sra.update_teacher()  # e.g. once, to start the EMA, then never again
    x_t, x_s, t, s, y, _ = flow_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            model(x_t, t, y)
            sra(model, x_t, x_s, t, s, y)
    still = [w for w in caught if "has stayed at 1 for 3 training calls" in str(w.message)]
    assert len(still) == 1 and sra.step == 1


def test_resume_of_a_call_counted_step_continues_the_schedule():
    def run(sra, model, steps):
        out = []
        for step in steps:
            x_t, x_s, t, s, y, _ = flow_batch(seed=step)
            model(x_t, t, y)
            out.append(float(sra(model, x_t, x_s, t, s, y).detach()))
        return out

    def build():
        model = pretrained_sit()
        return model, SelfRepresentationAlignment(model, **LAYERS, teacher=copy.deepcopy(model), weight=schedules.linear(0.0, 0.3, 0, 4))

    model, sra = build()
    straight = run(sra, model, range(4))
    model, sra = build()
    run(sra, model, range(2))
    state = sra.state_dict()
    model, resumed = build()
    resumed.load_state_dict(state)
    assert resumed.step == 2 and run(resumed, model, range(2, 4)) == straight[2:]


# ---------------------------------------------------------------- 6. sample_weight
@pytest.mark.parametrize("bad, error, words", [
    (torch.tensor([1.0, -0.5, 1.0, 1.0]), ValueError, ["sample_weight[1]=-0.5", ">= 0"]),
    (torch.tensor([1.0, 1.0, float("nan"), 1.0]), ValueError, ["sample_weight[2]=nan", "finite"]),
    (torch.tensor([float("inf"), 1.0, 1.0, 1.0]), ValueError, ["sample_weight[0]=inf", "finite"]),
    (torch.ones(4, dtype=torch.int64), TypeError, ["torch.int64", "floating"]),
    ([1.0, 1.0, 1.0, 1.0], TypeError, ["sample_weight=list", "floating tensor"]),
    (torch.ones(4, 1), ValueError, ["shape (4, 1)", "(4,)"]),
])
@pytest.mark.parametrize("method", ["sra", "latent"])
def test_sample_weight_negative_nonfinite_or_integer_is_refused_naming_it(method, bad, error, words):
    model = pretrained_sit()
    x_t, x_s, t, s, y, target = flow_batch()
    if method == "sra":
        aligner = SelfRepresentationAlignment(model, **LAYERS)
        args = (x_t, x_s, t, s, y)
    else:
        aligner = LatentAlignment(model, layer=2)
        args = (x_t, x_t - t.view(-1, 1, 1, 1) * target, t, y)
    model(x_t, t, y)
    with pytest.raises(error) as info:
        aligner(model, *args, sample_weight=bad)
    for word in words:
        assert word in str(info.value), str(info.value)
    assert aligner.step == 0
    ok = no_warning(aligner, model, *args, sample_weight=torch.tensor([1.0, 0.0, 2.0, 1.0]))  # the capture is intact
    assert torch.isfinite(ok) and aligner.step == 1


# ---------------------------------------------------------------- 7. accelerate bf16
@pytest.fixture
def bf16_accelerator():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield accelerate.Accelerator(mixed_precision="bf16", cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_accelerate_bf16_teacher_is_the_same_built_before_or_after_prepare(bf16_accelerator):
    x_t, x_s, t, s, y, _ = flow_batch()
    losses, teachers = [], []
    for order in ("before", "after"):
        model = pretrained_sit()
        if order == "before":
            sra = SelfRepresentationAlignment(model, **LAYERS)
            model = bf16_accelerator.prepare(model)
        else:
            model = bf16_accelerator.prepare(model)
            sra = SelfRepresentationAlignment(model, **LAYERS)
        pred = model(x_t, t, y)
        assert pred.dtype == torch.float32 and "forward" in vars(model)  # accelerate wrapped the model's forward
        torch.manual_seed(0)
        losses.append(sra(model, x_t, x_s, t, s, y).detach())
        teachers.append(sra.teacher)
    assert all("forward" not in vars(m) for teacher in teachers for m in teacher.modules())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


def test_teacher_copy_keeps_a_forward_the_user_set_on_a_submodule():
    """Only accelerate's wrapper (marked by its ``_original_forward``) is dropped from the copy."""
    model = pretrained_sit()
    calls = []
    block = model.blocks[1]

    def counted(*args, **kwargs):
        calls.append(1)
        return type(block).forward(block, *args, **kwargs)

    block.forward = counted
    sra = SelfRepresentationAlignment(model, **LAYERS)
    assert "forward" in vars(sra.teacher.blocks[1])


# ---------------------------------------------------------------- 9. x_t.data
def test_x_t_data_rebound_after_the_forward_is_detected():
    model = pretrained_sit()
    sra = SelfRepresentationAlignment(model, **LAYERS)
    x_t, x_s, t, s, y, _ = flow_batch()
    model(x_t, t, y)
    x_t.data = x_t.data + 1.0  # bumps no version counter
    with pytest.warns(RuntimeWarning, match="changed in place"):
        loss = sra(model, x_t, x_s, t, s, y)
    model(x_t, t, y)
    torch.testing.assert_close(loss, no_warning(sra, model, x_t, x_s, t, s, y), rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- crash (a): inference-mode conditioning
class ContextSiT(SiT):
    """A SiT with a cached text-like conditioning vector added to the time embedding (no trainable
    layer sees it, as with a frozen text projection under LoRA)."""

    def forward(self, x, t, y, context):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training) + context
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def test_conditioning_made_under_inference_mode_trains_normally():
    model = pretrained_sit(ContextSiT)
    sra = SelfRepresentationAlignment(model, **LAYERS)
    x_t, x_s, t, s, y, target = flow_batch()
    with torch.inference_mode():
        context = torch.randn(4, TINY["hidden_size"], generator=torch.Generator().manual_seed(3))
    assert context.is_inference()
    loss = F.mse_loss(model(x_t, t, y, context), target)
    align = no_warning(sra, model, x_t, x_s, t, s, y, context)  # the forward's features are reused
    (loss + align).backward()
    assert sra.metrics["student_reruns"] == 0
    plain = context.clone()
    model(x_t, t, y, plain)
    torch.testing.assert_close(align, no_warning(sra, model, x_t, x_s, t, s, y, plain), rtol=0, atol=0)
    model(x_t, t, y, context)  # what can still be checked is: an input changed in place
    x_t.mul_(2)
    with pytest.warns(RuntimeWarning, match="changed in place"):
        sra(model, x_t, x_s, t, s, y, context)


# ---------------------------------------------------------------- crash (c): an argument missing from the sra call
def test_flux_guidance_missing_from_the_sra_call_names_the_argument():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4), guidance_embeds=True)
    sra = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=3)
    g = torch.Generator().manual_seed(0)
    x_t, x_s = torch.randn(2, 16, 4, generator=g), torch.randn(2, 16, 4, generator=g)
    grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3)
    cond = dict(encoder_hidden_states=torch.randn(2, 3, 16, generator=g), pooled_projections=torch.randn(2, 8, generator=g),
                img_ids=grid, txt_ids=torch.zeros(3, 3), return_dict=False)
    t, s, guidance = torch.tensor([0.7, 0.5]), torch.tensor([0.6, 0.4]), torch.full((2,), 3.5)
    model(x_t, timestep=t, guidance=guidance, **cond)
    with pytest.raises(ValueError, match=r"lacks 'guidance'.*guidance=a tensor of shape \(2,\).*pass guidance=\.\.\."):
        sra(model, x_t, x_s, t, s, **cond)
    assert sra.step == 0
    loss = no_warning(sra, model, x_t, x_s, t, s, guidance=guidance, **cond)  # the forward's capture was kept
    assert torch.isfinite(loss) and sra.metrics["student_reruns"] == 0


def test_labels_or_lora_scale_missing_from_the_sra_call_name_the_argument():
    model = lora(pretrained_sit(ScalingSiT))
    sra = SelfRepresentationAlignment(model, **LAYERS)
    x_t, x_s, t, s, y, _ = flow_batch()
    model(x_t, t, y, lora_scale=0.5)
    with pytest.raises(ValueError, match=r"lacks 'lora_scale'.*lora_scale=0\.5"):
        sra(model, x_t, x_s, t, s, y)
    model(x_t, t, y)
    with pytest.raises(ValueError, match=r"lacks 'y'"):
        sra(model, x_t, x_s, t, s)
    # positional in one, keyword in the other is the same call: no false alarm, the forward is reused
    no_warning(sra, model, x_t, x_s, t, s, y=y)
    # an argument given at its default value is as good as left out
    model(x_t, t, y, lora_scale=1.0)
    no_warning(sra, model, x_t, x_s, t, s, y)
    assert sra.metrics["student_reruns"] == 0
    sra.remove()
    align = LatentAlignment(model, layer=2)  # the same capture: the same check
    model(x_t, t, y)
    with pytest.raises(ValueError, match=r"lacks 'y'"):
        align(model, x_t, x_s, t)
    assert align.step == 0


# ---------------------------------------------------------------- crash (b): DDP(sra) with head="identity"
def _identity_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = tiny_sit(seed=rank, depth=4)
        sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=3, head="identity", ema_decay=0.5)
        refused = ""
        try:
            DDP(sra)
        except RuntimeError as error:
            refused = str(error)
        ddp_model = DDP(model)  # the recipe: wrap the model only; sra has nothing to synchronise
        opt = torch.optim.AdamW(ddp_model.parameters(), lr=1e-3)
        for step in range(3):
            x_t, x_s, t, s, y, target = flow_batch(4, 100 * step + rank)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                loss = F.mse_loss(ddp_model(x_t, t, y), target) + sra(ddp_model, x_t, x_s, t, s, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            sra.update_teacher()
        torch.save({"refused": refused, "model": model.state_dict(), "teacher": sra.teacher.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: a rank whose peer already left can be aborted by gloo
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_with_identity_head_wraps_the_model_only_and_stays_identical():
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_identity_worker, args=(free_port(), out_dir), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(2))
    assert "doesn't have any parameter that requires a gradient" in r0["refused"]
    for part in ("model", "teacher"):
        assert r0[part].keys() == r1[part].keys()
        assert all(torch.equal(r0[part][k], r1[part][k]) for k in r0[part]), part
