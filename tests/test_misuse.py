"""No silent misuse (issue 10): each numbered case of the issue, as a realistic user would hit it.
Every test here fails on 0.1.0 (wrong loss without an error, a crash, or a missing warning) and
passes now; case 9 (a source checkout beside a regular install) is
``tests/test_packaging.py::test_source_checkout_imports_beside_an_installed_copy``.

The reference loss of a step is always computed independently of the capture: block outputs read
by throwaway hooks (cloned, so nothing done later to them matters), the head, smooth-L1 with beta 0.05.
"""

from __future__ import annotations

import copy
import gc
import io
import math
import pickle
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch import nn

from examples.models import SiT
from examples.models.dit import TimestepEmbedder
from sra_plugin import Adapter, LinearPath, NoiseGap, SelfRepresentationAlignment
from tests._models import TINY, flow_batch, no_warning, randomise_gates, tiny_sit

NULL = TINY["num_classes"]  # the null label id of the tiny models


# ---------------------------------------------------------------- helpers
def block_output(model: nn.Module, k: int, x, t, *cond) -> torch.Tensor:
    """A clone of block k's output (1-based) in a plain forward, taken before anything after the block runs."""
    out = []
    handle = model.blocks[k - 1].register_forward_hook(lambda m, a, o: out.append(o.clone()))
    try:
        model(x, t, *cond)
    finally:
        handle.remove()
    return out[0]


def reference_features(sra: SelfRepresentationAlignment, model: nn.Module, x_t, x_s, t, s, *cond):
    """Student block L_s on (x_t, t) in training mode; teacher block L_t on (x_s, s) in eval mode."""
    student = block_output(model, sra.student_layer, x_t, t, *cond)
    teacher = sra.teacher
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            target = block_output(teacher, sra.teacher_layer, x_s, s, *cond)
    finally:
        teacher.train(was_training)
    return student, target


def loss_of(sra: SelfRepresentationAlignment, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred = sra.head(student.to(next(sra.head.parameters()).dtype))
    return sra.current_weight() * F.smooth_l1_loss(pred.float(), target.float(), beta=0.05)


def reference_loss(sra: SelfRepresentationAlignment, model: nn.Module, x_t, x_s, t, s, *cond) -> torch.Tensor:
    return loss_of(sra, *reference_features(sra, model, x_t, x_s, t, s, *cond))


def build(model: nn.Module | None = None, **kwargs) -> tuple[nn.Module, SelfRepresentationAlignment]:
    model = tiny_sit(class_dropout_prob=0.0) if model is None else model
    return model, SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, **kwargs)


# ---------------------------------------------------------------- case 1
EXTRA_FORWARDS = {
    # name: (the extra forward's t and labels, as functions of the step's t and y; the argument that differs)
    "another t": (lambda t, y: (t * 0.5, y), "t"),
    "another y": (lambda t, y: (t, (y + 1) % NULL), "y"),
    "null labels": (lambda t, y: (t, torch.full_like(y, NULL)), "y"),
}


@pytest.mark.parametrize("extra", list(EXTRA_FORWARDS))
def test_case1_an_extra_forward_with_another_time_or_conditioning_is_not_used(extra):
    """model(x_t, t, y); model(x_t, t2 or y2 or null labels); sra(model, x_t, x_s, t, s, y): the student
    runs again on (x_t, t, y), the teacher sees y, and the loss is the loss of a clean call."""
    # A null-label row in the embedding table, but (in effect) no random dropping.
    model, sra = build(tiny_sit(class_dropout_prob=1e-12))
    x_t, x_s, t, s, y, _ = flow_batch()
    make, differs = EXTRA_FORWARDS[extra]
    teacher_labels = []
    sra.teacher.y_embedder.embedding_table.register_forward_pre_hook(lambda m, args: teacher_labels.append(args[0].clone()))

    model(x_t, t, y)
    model(x_t, *make(t, y))  # e.g. a CFG-style forward with null labels, or a second time
    with pytest.warns(RuntimeWarning, match=f"different '{differs}'"):
        loss = sra(model, x_t, x_s, t, s, y)
    assert sra.metrics["student_reruns"] == 1
    assert torch.equal(teacher_labels[-1], y)
    torch.testing.assert_close(loss, reference_loss(sra, model, x_t, x_s, t, s, y), rtol=1e-5, atol=1e-7)

    model(x_t, t, y)
    clean = no_warning(sra, model, x_t, x_s, t, s, y)
    assert sra.metrics["student_reruns"] == 1  # the clean call reused its forward
    torch.testing.assert_close(loss, clean, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- case 2
class InPlaceSiT(SiT):
    """SiT whose forward changes each block's output in place after the block (``x = block(x); x += 1``)."""

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
            x += 1.0
        return self.unpatchify(self.final_layer(x, c))


def test_case2_block_output_changed_in_place_after_the_hook_is_detected():
    torch.manual_seed(0)
    model, sra = build(randomise_gates(InPlaceSiT(**{**TINY, "class_dropout_prob": 0.0})))
    x_t, x_s, t, s, y, _ = flow_batch()
    model(x_t, t, y)
    with pytest.warns(RuntimeWarning, match="changed in place"):
        loss = sra(model, x_t, x_s, t, s, y)
    assert sra.metrics["student_reruns"] == 1
    student, target = reference_features(sra, model, x_t, x_s, t, s, y)  # block 2's output before the += 1
    torch.testing.assert_close(loss, loss_of(sra, student, target), rtol=1e-5, atol=1e-7)
    # The changed tokens (what 0.1.0 used) give a clearly different loss.
    assert not torch.allclose(loss, loss_of(sra, student + 1.0, target), rtol=1e-2)


def test_case2_input_changed_in_place_after_the_forward_is_detected():
    model, sra = build()
    x_t, x_s, t, s, y, _ = flow_batch()
    model(x_t, t, y)
    x_t.add_(0.5)  # e.g. a buffer reused for the next noise level before sra(...)
    with pytest.warns(RuntimeWarning, match="changed in place"):
        loss = sra(model, x_t, x_s, t, s, y)
    assert sra.metrics["student_reruns"] == 1
    torch.testing.assert_close(loss, reference_loss(sra, model, x_t, x_s, t, s, y), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- case 3
class CastingTimestepEmbedder(TimestepEmbedder):
    """DiT's timestep embedder, computing in its weights' dtype (what a bf16 model without autocast needs)."""

    def forward(self, t):
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


def bf16_ready_sit() -> nn.Module:
    model = tiny_sit(class_dropout_prob=0.0)
    model.t_embedder.__class__ = CastingTimestepEmbedder
    return model


def test_case3_bf16_model_without_autocast_gets_a_bf16_head():
    model, sra = build(bf16_ready_sit().to(torch.bfloat16))
    assert {p.dtype for p in sra.head.parameters()} == {torch.bfloat16}
    x_t, x_s, t, s, y, _ = (v.to(torch.bfloat16) if v.is_floating_point() else v for v in flow_batch())
    model(x_t, t, y)
    loss = no_warning(sra, model, x_t, x_s, t, s, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # At first use the teacher has the student's weights (its float32 EMA state holds the bf16 values
    # exactly): its tokens are the bf16 model's own, in eval mode.
    student = block_output(model, sra.student_layer, x_t, t, y)
    model.eval()
    with torch.no_grad():
        target = block_output(model, sra.teacher_layer, x_s, s, y)
    model.train()
    torch.testing.assert_close(loss, loss_of(sra, student, target), rtol=1e-5, atol=1e-7)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in sra.head.parameters())
    assert model.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("device", ["meta", *(["cuda"] if torch.cuda.is_available() else [])])
def test_case3_head_is_created_on_the_models_device(device):
    model, sra = build(tiny_sit(class_dropout_prob=0.0).to(device))  # any device but the CPU default
    assert {p.device.type for p in sra.head.parameters()} == {device}


def test_case3_teacher_built_before_the_model_is_cast_to_bf16_follows():
    model, sra = build(bf16_ready_sit())  # float32 when sra is built
    model.to(torch.bfloat16)
    x_t, x_s, t, s, y, _ = (v.to(torch.bfloat16) if v.is_floating_point() else v for v in flow_batch())
    seen = []
    sra.teacher.blocks[sra.teacher_layer - 1].register_forward_hook(lambda m, a, o: seen.append(o))
    model(x_t, t, y)
    loss = no_warning(sra, model, x_t, x_s, t, s, y)
    assert [o.dtype for o in seen] == [torch.bfloat16]
    # At first use the teacher has the student's weights: its tokens are the bf16 model's own, in eval mode.
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(seen[0], block_output(model, sra.teacher_layer, x_s, s, y), rtol=0, atol=0)
    model.train()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


# ---------------------------------------------------------------- case 4
def qk_norm_sit() -> nn.Module:
    """A tiny SiT whose blocks use RMSNorm for the residual stream and a LayerNorm(head_dim) qk-norm,
    so that the first nn.LayerNorm in a block is the qk-norm (width 16, the stream is 32)."""
    model = tiny_sit(class_dropout_prob=0.0)
    width = TINY["hidden_size"]
    for block in model.blocks:
        block.norm1 = nn.RMSNorm(width, eps=1e-6, elementwise_affine=False)
        block.norm2 = nn.RMSNorm(width, eps=1e-6, elementwise_affine=False)
        block.attn = Attention(width, num_heads=TINY["num_heads"], qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm)
    return model


def test_case4_qk_norm_does_not_set_the_width():
    model = qk_norm_sit()
    first_layer_norm = next(m for m in model.blocks[0].modules() if isinstance(m, nn.LayerNorm))
    assert first_layer_norm.normalized_shape == (TINY["hidden_size"] // TINY["num_heads"],)  # the premise
    model, sra = build(model)
    assert sra.head[0].in_features == TINY["hidden_size"] and sra.head[-1].out_features == TINY["hidden_size"]
    x_t, x_s, t, s, y, _ = flow_batch()
    model(x_t, t, y)
    loss = no_warning(sra, model, x_t, x_s, t, s, y)
    torch.testing.assert_close(loss, reference_loss(sra, model, x_t, x_s, t, s, y), rtol=1e-5, atol=1e-7)


def test_case4_generic_width_of_an_mmdit_block_with_layer_norm_qk_norm():
    from examples.models import MMDiT

    model = MMDiT(input_size=8, patch_size=2, in_channels=4, depth=2, head_dim=8, qk_norm="ln")
    block = model.joint_blocks[0]
    assert any(isinstance(m, nn.LayerNorm) and m.normalized_shape == (8,) for m in block.modules())
    assert Adapter().dim(model, block) == model.hidden_size == 16


# ---------------------------------------------------------------- case 5
def test_case5_model_with_sra_attached_pickles_and_saves_whole(tmp_path):
    model, sra = build()
    x_t, x_s, t, s, y, _ = flow_batch()
    model(x_t, t, y)
    sra(model, x_t, x_s, t, s, y).backward()
    with torch.no_grad():
        want = model(x_t, t, y)

    torch.save(model, tmp_path / "model.pt")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    restored = [
        pickle.loads(pickle.dumps(model)),
        torch.load(tmp_path / "model.pt", weights_only=False),
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=False),
    ]
    for copy_ in restored:
        torch.testing.assert_close(copy_(x_t, t, y), want, rtol=0, atol=0)  # a training forward runs
        assert sra._capture.record is None  # and feeds nothing into the original's capture


# ---------------------------------------------------------------- case 6
def hook_dicts(model: nn.Module) -> list[dict]:
    return [d for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)]


def test_case6_dropping_sra_removes_its_hooks_and_holds_no_activations():
    model = tiny_sit(class_dropout_prob=0.0)
    x_t, x_s, t, s, y, _ = flow_batch()
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    assert any(hook_dicts(model))
    model(x_t, t, y)  # captured: the record holds block 2's tokens and their graph
    tokens = weakref.ref(sra._capture.record.tokens)
    del sra
    gc.collect()
    assert not any(hook_dicts(model)), [dict(d) for d in hook_dicts(model) if d]
    assert tokens() is None
    # The model trains on as if SRA had never been attached.
    out = model(x_t, t, y)
    out.square().mean().backward()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_case6_a_copied_pair_works_and_leaves_the_original_alone(how):
    model, sra = build()
    x_t, x_s, t, s, y, _ = flow_batch()
    model(x_t, t, y)
    sra(model, x_t, x_s, t, s, y)  # one step first: the teacher is initialised
    pair = (model, sra)
    model2, sra2 = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    assert model2 is not model and sra2.teacher is not sra.teacher

    model2(x_t, t, y)
    assert sra._capture.record is None  # the copy's hooks write into the copy only
    loss2 = no_warning(sra2, model2, x_t, x_s, t, s, y)
    assert sra2.metrics["student_reruns"] == 0
    model(x_t, t, y)
    loss = no_warning(sra, model, x_t, x_s, t, s, y)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)

    # Training the copy trains the copy's model and head, not the original's.
    loss2.backward()
    assert all(p.grad is None for p in [*model.parameters(), *sra.head.parameters()])
    assert model2.blocks[0].attn.qkv.weight.grad is not None and sra2.head[0].weight.grad is not None
    # Removing the copy's hooks leaves the original's in place.
    sra2.remove()
    model(x_t, t, y)
    no_warning(sra, model, x_t, x_s, t, s, y)


# ---------------------------------------------------------------- case 7
def test_case7_warns_once_per_cause_and_counts_every_rerun():
    model, sra = build()
    x_t, x_s, t, s, y, _ = flow_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # A validation call: no training forward before it.
        model.eval()
        with torch.no_grad():
            sra(model, x_t, x_s, t, s, y)
        model.train()
        # Training, mis-wired: the forward ran on another t. A new cause: a new warning.
        model(x_t, t * 0.5, y)
        sra(model, x_t, x_s, t, s, y)
        # The same causes again: counted, not warned.
        model(x_t, t * 0.5, y)
        sra(model, x_t, x_s, t, s, y)
        sra(model, x_t, x_s, t, s, y)
        # Wired right: reused, not counted.
        model(x_t, t, y)
        sra(model, x_t, x_s, t, s, y)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2, messages
    assert "found no training forward" in messages[0]
    assert "different 't'" in messages[1]
    assert sra.metrics["student_reruns"] == 4


# ---------------------------------------------------------------- case 8
class ScalarTimeSiT(SiT):
    """SiT that also takes one time for the whole batch (0-dim or shape (1,)), as many samplers pass it."""

    def forward(self, x, t, y):
        return super().forward(x, torch.as_tensor(t).reshape(-1).expand(x.shape[0]), y)


def test_case8_time_of_shape_1_broadcasts_like_a_0_dim_time():
    torch.manual_seed(0)
    model, sra = build(randomise_gates(ScalarTimeSiT(**{**TINY, "class_dropout_prob": 0.0})))
    x0, noise = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(4)
    losses = {}
    for shape in [(), (1,), (4,)]:
        t, s = torch.full(shape, 0.6), torch.full(shape, 0.45)
        x_t, x_s = LinearPath().pair(x0, noise, t, s)
        model(x_t, t, y)
        losses[shape] = no_warning(sra, model, x_t, x_s, t, s, y)
    assert sra.metrics["student_reruns"] == 0
    torch.testing.assert_close(losses[(1,)], losses[()], rtol=0, atol=0)
    torch.testing.assert_close(losses[(1,)], losses[(4,)], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("weight", [torch.tensor(0.2), lambda step: torch.tensor(0.2), np.float32(0.2)],
                         ids=["0-dim tensor", "callable returning a tensor", "numpy float32"])
def test_case8_weight_as_a_0_dim_tensor_equals_the_number(weight):
    model = tiny_sit(class_dropout_prob=0.0)
    torch.manual_seed(5)
    plain = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, weight=0.2)
    torch.manual_seed(5)
    other = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, weight=weight)
    x_t, x_s, t, s, y, _ = flow_batch()
    model(x_t, t, y)  # feeds both
    want = no_warning(plain, model, x_t, x_s, t, s, y)
    got = no_warning(other, model, x_t, x_s, t, s, y)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert other.metrics["weight"] == pytest.approx(0.2)
    got.backward()
    assert other.head[0].weight.grad is not None


class ParamLinear(nn.Module):
    """A linear map that is not an ``nn.Linear`` (as fused or quantized layers are)."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in) / math.sqrt(fan_in))

    def forward(self, x):
        return x @ self.weight.T


def rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class ToyJointBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.context_out, self.x_out = ParamLinear(width, width), ParamLinear(width, width)

    def forward(self, context, x):
        joint = rms(torch.cat([context, x], 1))
        mixed = joint + joint.mean(1, keepdim=True)  # a crude stand-in for joint attention
        n = context.shape[1]
        return context + self.context_out(mixed[:, :n]), x + self.x_out(mixed[:, n:])


class ToyMMDiT(nn.Module):
    """MMDiT-like (``x_embedder``, ``joint_blocks`` returning ``(context, x)``) without any nn.LayerNorm,
    nn.Linear in its blocks, or a width attribute: only the patch embedder tells the width (24)."""

    def __init__(self, width: int = 24, depth: int = 4) -> None:
        super().__init__()
        self.x_embedder = nn.Conv2d(4, width, kernel_size=2, stride=2)
        self.context_embedder = ParamLinear(8, width)
        self.joint_blocks = nn.ModuleList([ToyJointBlock(width) for _ in range(depth)])
        self.out = ParamLinear(width, 16)

    def forward(self, x, t, context):
        h = self.x_embedder(x).flatten(2).transpose(1, 2) * (1 + t.reshape(-1, 1, 1))
        c = self.context_embedder(context)
        for block in self.joint_blocks:
            c, h = block(c, h)
        return self.out(h)


def test_case8_mmdit_without_layer_norm_or_width_attribute_takes_the_patch_embedders_width():
    torch.manual_seed(0)
    model = ToyMMDiT()
    sra = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=3)
    assert sra.adapter.name == "mmdit"
    assert sra.head[0].in_features == 24 and sra.head[-1].out_features == 24
    x_t, x_s, t, s, _, _ = flow_batch()
    context = torch.randn(4, 3, 8)
    model(x_t, t, context)
    loss = no_warning(sra, model, x_t, x_s, t, s, context)
    assert torch.isfinite(loss) and loss > 0


# ---------------------------------------------------------------- case 9
# tests/test_packaging.py::test_source_checkout_imports_beside_an_installed_copy: a regular (non-editable)
# install in a site folder, the source tree first on sys.path, `import sra_plugin, sra_plugin.adapters`
# (0.1.0: a circular-import error).


# ---------------------------------------------------------------- cleanups of issue 10
@pytest.mark.parametrize("path", [LinearPath(), LinearPath(noise_at="lo")])
def test_paths_accept_a_python_float_time(path):
    x0, noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(path(x0, noise, 0.3), path(x0, noise, torch.tensor(0.3)))
    torch.testing.assert_close(path.snr(0.3), path.snr(torch.tensor(0.3)))


def test_numpy_scalars_are_numbers_everywhere():
    gap = NoiseGap(max_gap=np.float32(0.2), lo=np.float64(0.0), hi=np.float32(1.0))
    t = torch.rand(64, generator=torch.Generator().manual_seed(0))
    s = gap.sample(t, generator=torch.Generator().manual_seed(1))
    assert ((t - s) >= 0).all() and ((t - s) <= 0.2 + 1e-6).all() and (t - s).max() > 0.1
    discrete = NoiseGap(max_gap=np.int64(200), lo=np.int64(1), hi=np.int32(999), discrete=True)
    steps = torch.randint(1, 1000, (64,), generator=torch.Generator().manual_seed(0))
    gap_steps = steps - discrete.sample(steps, generator=torch.Generator().manual_seed(1))
    assert (gap_steps >= 0).all() and (gap_steps < 200).all()
    model = tiny_sit(class_dropout_prob=0.0)
    sra = SelfRepresentationAlignment(model, student_layer=np.int64(2), teacher_layer=np.float64(0.7),
                                      ema_decay=np.float32(0.5), weight=np.float64(0.2))
    assert (sra.student_layer, sra.teacher_layer) == (2, 4)


@pytest.mark.parametrize("where,kwargs", [
    ("NoiseGap", dict(max_gap=True)),
    ("NoiseGap", dict(lo=np.bool_(False))),
    ("SelfRepresentationAlignment", dict(weight=True)),
    ("SelfRepresentationAlignment", dict(ema_decay=np.bool_(True))),
])
def test_bools_are_not_numbers(where, kwargs):
    with pytest.raises((TypeError, ValueError), match=next(iter(kwargs))):
        if where == "NoiseGap":
            NoiseGap(**kwargs)
        else:
            SelfRepresentationAlignment(tiny_sit(depth=4), **kwargs)
