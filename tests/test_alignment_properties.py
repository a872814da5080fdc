"""Property-based tests of the alignment's invariants and of layer specs (issue 4).

The models are the reference SiT from ``examples/models`` at a tiny size, built once for the module;
every example attaches a fresh ``SelfRepresentationAlignment`` and removes its hooks afterwards.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from examples.models import SiT
from sra_plugin import LinearPath, NoiseGap, SelfRepresentationAlignment
from sra_plugin.layers import resolve_layer
from tests._models import tiny_sit

DEPTH = 5
LOSSES = ["smooth_l1", "cosine", "mse", "l1"]
HEADS = ["mlp", "linear", "identity"]
# A model example costs a few forwards: a quarter of the profile's examples (10 in ci, 250 in deep).
MODEL_EXAMPLES = settings(max_examples=max(5, settings.default.max_examples // 4))


def modulated(model: SiT) -> SiT:
    """adaLN-Zero starts every block as the identity; random modulation makes each block's output differ."""
    with torch.no_grad():
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.normal_(std=0.1)
            block.adaLN_modulation[-1].bias.normal_(std=0.5)
    return model.train()


SIZE = dict(init=modulated, in_channels=2, depth=DEPTH, num_classes=4)
MODEL = tiny_sit(0, class_dropout_prob=0.25, **SIZE)  # drops labels for CFG inside its forward
TWIN = copy.deepcopy(MODEL)  # identical weights, a separate module: a teacher that "is" the student
PLAIN = tiny_sit(1, class_dropout_prob=0.0, **SIZE)  # no random label dropout: for batch-order comparisons
PLAIN_TWIN = copy.deepcopy(PLAIN)


# ---------------------------------------------------------------------------------------- strategies
@st.composite
def layer_spec(draw, block: int, depth: int = DEPTH) -> int | float:
    """Block ``block`` written as an int, a negative int or a fraction of depth that rounds to it."""
    form = draw(st.sampled_from(["int", "negative", "fraction"]))
    if form == "int":
        return block
    if form == "negative":
        return block - depth - 1
    offset = draw(st.floats(0.01, 0.99 if block < depth else 0.49))
    fraction = (block - 0.5 + offset) / depth
    assume(0 < fraction < 1 and math.floor(fraction * depth + 0.5) == block)
    return fraction


@st.composite
def layer_pairs(draw, same: bool = False, ints: bool = False) -> tuple[int | float, int | float]:
    """A valid (student_layer, teacher_layer): the teacher's block is the same or a later one."""
    student = draw(st.integers(1, DEPTH))
    teacher = student if same else draw(st.integers(student, DEPTH))
    if ints:
        return student, teacher
    return draw(layer_spec(student)), draw(layer_spec(teacher))


@st.composite
def batches(draw, same_time: bool = False) -> tuple[torch.Tensor, ...]:
    """(x_t, x_s, t, s, y) from the same x0 and noise on the linear path, at any finite scale."""
    batch = draw(st.integers(1, 4))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 1e3]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x0, noise = (scale * torch.randn(batch, 2, 8, 8, generator=gen) for _ in range(2))
    t = torch.rand(batch, generator=gen)
    s = t.clone() if same_time else NoiseGap(0.2).sample(t, generator=gen)
    x_t, x_s = LinearPath().pair(x0, noise, t, s)
    return x_t, x_s, t, s, torch.randint(0, 4, (batch,), generator=gen)


def align(sra: SelfRepresentationAlignment, model: SiT, x_t, x_s, t, s, y) -> torch.Tensor:
    """One training step's SRA loss: the user's forward (captured by the hooks), then ``sra``."""
    model(x_t, t, y)
    return sra(model, x_t, x_s, t, s, y=y)


# ----------------------------------------------------------------------------------------- the loss
@st.composite
def setups(draw) -> tuple[tuple, tuple]:
    """A layer pair and a batch; half the time the edge case L_s == L_t, s == t (features nearly equal)."""
    edge = draw(st.booleans())
    return draw(layer_pairs(same=edge)), draw(batches(same_time=edge))


@MODEL_EXAMPLES
@given(setups(), st.sampled_from(LOSSES), st.sampled_from(HEADS), st.integers(0, 2**31))
def test_loss_is_nonnegative_and_finite(setup, loss, head, seed):
    """For finite inputs, every loss and head gives a finite alignment loss >= 0."""
    torch.manual_seed(seed)
    layers, inputs = setup
    with SelfRepresentationAlignment(MODEL, *layers, teacher=TWIN, head=head, loss=loss, weight=1.0) as sra:
        value = align(sra, MODEL, *inputs)
    assert torch.isfinite(value) and value >= 0, value


@MODEL_EXAMPLES
@given(layer_pairs(same=True), batches(same_time=True), st.sampled_from(LOSSES), st.sampled_from(["twin", "ema"]),
       st.integers(0, 2**31))
def test_loss_is_zero_when_the_teacher_is_the_student(layers, inputs, loss, teacher, seed):
    """With a teacher identical to the student (a deep copy, or the owned EMA right after construction),
    the identity head, L_s == L_t and s == t, the loss is exactly 0 (cosine: 0 up to float32 rounding
    of cos(a, a)), even when the student's forward drops labels for CFG."""
    torch.manual_seed(seed)
    teacher = TWIN if teacher == "twin" else "ema"
    with SelfRepresentationAlignment(MODEL, *layers, teacher=teacher, head="identity", loss=loss) as sra:
        value = align(sra, MODEL, *inputs)
    if loss == "cosine":
        assert 0 <= value <= 1e-6, value
    else:
        assert value == 0, value


@MODEL_EXAMPLES
@given(layer_pairs(), batches(), st.sampled_from(LOSSES), st.sampled_from(HEADS), st.randoms(use_true_random=False),
       st.integers(0, 2**31))
def test_loss_is_invariant_to_permuting_the_batch(layers, inputs, loss, head, rng, seed):
    """Reordering the samples of a batch (inputs, times and labels alike) leaves the loss unchanged."""
    torch.manual_seed(seed)
    order = list(range(inputs[0].shape[0]))
    rng.shuffle(order)
    permuted = [x[order] for x in inputs]
    with SelfRepresentationAlignment(PLAIN, *layers, teacher=PLAIN_TWIN, head=head, loss=loss, weight=1.0) as sra:
        value = align(sra, PLAIN, *inputs)
        shuffled = align(sra, PLAIN, *permuted)
    assert torch.allclose(shuffled, value, rtol=1e-5, atol=1e-7), (value, shuffled)


@MODEL_EXAMPLES
@given(layer_pairs(), batches(), st.sampled_from(HEADS), st.floats(1e-2, 1e2), st.integers(0, 2**31))
def test_cosine_is_invariant_to_scaling_the_teacher_features(layers, inputs, head, factor, seed):
    """Multiplying the teacher's block output by any c > 0 leaves the cosine loss unchanged."""
    torch.manual_seed(seed)
    with SelfRepresentationAlignment(PLAIN, *layers, teacher=PLAIN_TWIN, head=head, loss="cosine", weight=1.0) as sra:
        value = align(sra, PLAIN, *inputs)
        norm = sra.metrics["teacher_norm"]
        block = PLAIN_TWIN.blocks[sra.teacher_layer - 1]
        handle = block.register_forward_hook(lambda module, args, output: output * factor)
        try:
            scaled = align(sra, PLAIN, *inputs)
        finally:
            handle.remove()
        assert sra.metrics["teacher_norm"] == pytest.approx(factor * norm, rel=1e-4)  # the scaling took effect
    assert torch.allclose(scaled, value, rtol=1e-4, atol=1e-6), (value, scaled)


@MODEL_EXAMPLES
@given(layer_pairs(ints=True), batches(), st.sampled_from(LOSSES), st.integers(0, 2**31))
def test_no_gradient_reaches_the_teacher(layers, inputs, loss, seed):
    """For any valid layer pair, backward through the loss leaves the teacher's parameters and x_s
    without gradient, while the student side (head, x_t) gets one."""
    torch.manual_seed(seed)
    trainable = [p for p in TWIN.parameters() if p.requires_grad]
    assert len(trainable) > 10  # the teacher could take gradients, so "none reached it" means something
    x_t, x_s, t, s, y = (x.requires_grad_() if x.is_floating_point() and x.dim() == 4 else x for x in inputs)
    MODEL.zero_grad(set_to_none=True)
    with SelfRepresentationAlignment(MODEL, *layers, teacher=TWIN, head="mlp", loss=loss) as sra:
        align(sra, MODEL, x_t, x_s, t, s, y).backward()
        assert all(p.grad is not None for p in sra.head.parameters())
    assert x_t.grad is not None
    assert x_s.grad is None
    assert all(p.grad is None for p in trainable)


# ------------------------------------------------------------------------------------- layer specs
@given(st.integers(1, 64), st.data())
def test_every_valid_layer_spec_resolves_into_the_model(depth, data):
    """An int k in 1..depth names block k, a negative int -k block depth - k + 1, and a fraction in
    (0, 1) some block in 1..depth."""
    k = data.draw(st.integers(1, depth))
    fraction = data.draw(st.floats(0, 1, exclude_min=True, exclude_max=True))
    assert resolve_layer(k, depth) == k
    assert resolve_layer(-k, depth) == depth - k + 1
    assert 1 <= resolve_layer(fraction, depth) <= depth


@given(st.integers(1, 64), st.floats(0, 1, exclude_min=True, exclude_max=True),
       st.floats(0, 1, exclude_min=True, exclude_max=True))
def test_fractions_resolve_monotonically(depth, a, b):
    """A larger fraction of depth never names an earlier block."""
    lo, hi = sorted((a, b))
    assert resolve_layer(lo, depth) <= resolve_layer(hi, depth)


@given(st.integers(1, 64), st.data())
def test_invalid_layer_specs_raise(depth, data):
    """Ints outside 1..depth and -depth..-1, fractions outside (0, 1), nan and bools are rejected,
    naming the argument."""
    spec = data.draw(st.one_of(
        st.just(0), st.integers(depth + 1, 10**6), st.integers(-(10**6), -depth - 1),
        st.floats(allow_nan=True).filter(lambda f: not 0 < f < 1), st.booleans(),
    ))
    with pytest.raises((ValueError, TypeError), match="student_layer"):
        resolve_layer(spec, depth, "student_layer")


@given(st.integers(1, DEPTH), st.integers(1, DEPTH), st.data())
def test_teacher_layer_before_student_layer_is_rejected(student, teacher, data):
    """SelfRepresentationAlignment accepts a pair iff the teacher's block is the same as or later than
    the student's, and then uses exactly the blocks the specs name; otherwise ValueError naming teacher_layer."""
    specs = data.draw(layer_spec(student)), data.draw(layer_spec(teacher))
    if teacher < student:
        with pytest.raises(ValueError, match="teacher_layer"):
            SelfRepresentationAlignment(MODEL, *specs, teacher=TWIN)
    else:
        with SelfRepresentationAlignment(MODEL, *specs, teacher=TWIN) as sra:
            assert (sra.student_layer, sra.teacher_layer) == (student, teacher)
