"""SelfRepresentationAlignment against a hand computation of the paper's step on the reference SiT and DiT."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

from sra_plugin import DDPMPath, LinearPath, NoiseGap, SelfRepresentationAlignment
from tests._models import batch, optimizer_step, tiny_dit, tiny_sit

BUILDERS = {"sit": tiny_sit, "dit": tiny_dit}


def inputs(kind: str, model):
    """(x_t, x_s, t, s, y) with the model's own time convention and one shared noise tensor."""
    discrete = kind == "dit"
    x0, noise, t, y = batch(model, discrete=discrete)
    if discrete:
        s = NoiseGap(max_gap=200, lo=1, hi=999, discrete=True).sample(t, generator=torch.Generator().manual_seed(3))
        path = DDPMPath.linear()
    else:
        s = NoiseGap().sample(t, generator=torch.Generator().manual_seed(3))
        path = LinearPath()
    x_t, x_s = path.pair(x0, noise, t, s)
    return x_t, x_s, t, s, y


def tokens_by_hand(model, x, t, y, k: int) -> torch.Tensor:
    """Output of block k (1-based), computed without hooks from the model's parts."""
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder.embedding_table(y)
    for block in model.blocks[:k]:
        h = block(h, c)
    return h


HAND_LOSSES = {
    "smooth_l1": lambda p, q: F.smooth_l1_loss(p, q, beta=0.05),
    "cosine": lambda p, q: (1 - F.cosine_similarity(p, q, dim=-1)).mean(),
    "cosine_tokens": lambda p, q: (1 - F.cosine_similarity(p, q)).mean(),  # the official code: torch's default dim=1
    "mse": lambda p, q: F.mse_loss(p, q),
    "l1": lambda p, q: F.l1_loss(p, q),
}


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize("loss", HAND_LOSSES)
def test_loss_equals_hand_computation(kind, loss):
    model = BUILDERS[kind](class_dropout_prob=0.0)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=5, loss=loss, weight=0.3)
    with torch.no_grad():  # make the teacher differ from the student
        for p in sra.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x_t, x_s, t, s, y = inputs(kind, model)
    model(x_t, t, y)
    got = sra(model, x_t, x_s, t, s, y)

    with torch.no_grad():
        target = tokens_by_hand(sra.teacher, x_s, s, y, 5)
    pred = sra.head(tokens_by_hand(model, x_t, t, y, 2))
    want = 0.3 * HAND_LOSSES[loss](pred, target)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert sra.metrics["align_loss"] == pytest.approx(want.item() / 0.3, rel=1e-5)
    assert sra.metrics["weight"] == 0.3


def test_callable_loss_and_weight_schedule():
    model = tiny_sit(class_dropout_prob=0.0)
    seen = []
    sra = SelfRepresentationAlignment(
        model, 2, 4, loss=lambda p, q: (p - q).pow(2).sum(-1), weight=lambda step: seen.append(step) or 0.1 * (step + 1)
    )
    x_t, x_s, t, s, y = inputs("sit", model)
    model(x_t, t, y)
    first = sra(model, x_t, x_s, t, s, y)
    optimizer_step(model)
    sra.update_teacher()
    optimizer_step(model)
    sra.update_teacher()
    model(x_t, t, y)
    third = sra(model, x_t, x_s, t, s, y)
    assert seen == [0, 2]
    assert sra.metrics["weight"] == pytest.approx(0.3)
    torch.testing.assert_close(third / first, torch.tensor(3.0), rtol=1e-4, atol=0)


class CallCounter:
    def __init__(self, modules):
        self.counts = [0] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i):
        def hook(*_):
            self.counts[i] += 1
        return hook


@pytest.mark.parametrize("kind", BUILDERS)
def test_blocks_run_once_and_teacher_stops_after_its_block(kind):
    model = BUILDERS[kind]()
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    student = CallCounter([*model.blocks, model.final_layer])
    teacher = CallCounter([*sra.teacher.blocks, sra.teacher.final_layer])
    x_t, x_s, t, s, y = inputs(kind, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the capture is used: no fallback warning
        model(x_t, t, y)
        sra(model, x_t, x_s, t, s, y).backward()
    assert student.counts == [1] * 7
    assert teacher.counts == [1, 1, 1, 1, 0, 0, 0]


def test_missing_capture_runs_student_up_to_its_block_and_warns_once_per_cause():
    model = tiny_sit(class_dropout_prob=0.0)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    counter = CallCounter([*model.blocks, model.final_layer])
    x_t, x_s, t, s, y = inputs("sit", model)
    with pytest.warns(RuntimeWarning, match="no student features.*no training forward"):
        sra(model, x_t, x_s, t, s, y)
    assert counter.counts == [1, 1, 0, 0, 0, 0, 0]
    assert sra.metrics["student_reruns"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same cause again: silent, but still recomputed
        sra(model, x_t, x_s, t, s, y)
    assert counter.counts == [2, 2, 0, 0, 0, 0, 0]
    other = x_t + 1  # a forward on another input must not be used for this x_t
    model(other, t, y)
    with pytest.warns(RuntimeWarning, match="different 'x'"):  # a new cause warns once more
        loss = sra(model, x_t, x_s, t, s, y)
    model(other, t, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sra(model, x_t, x_s, t, s, y)
    assert sra.metrics["student_reruns"] == 4
    # 4 partial student passes (2 blocks each) and 2 full forwards on `other` (the teacher is a copy)
    assert counter.counts == [6, 6, 2, 2, 2, 2, 2]
    # and the recomputed loss is the one of x_t, not of `other`
    model(x_t, t, y)
    torch.testing.assert_close(sra(model, x_t, x_s, t, s, y), loss)
    assert sra.metrics["student_reruns"] == 4


@pytest.mark.parametrize("kind", BUILDERS)
def test_gradient_reaches_head_and_blocks_up_to_student_layer_only(kind):
    model = BUILDERS[kind]()
    sra = SelfRepresentationAlignment(model, student_layer=3, teacher_layer=5)
    x_t, x_s, t, s, y = inputs(kind, model)
    model(x_t, t, y)
    sra(model, x_t, x_s, t, s, y).backward()
    for k, block in enumerate(model.blocks, start=1):
        grads = [p.grad for p in block.parameters()]
        if k <= 3:
            assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), f"block {k}"
        else:
            assert all(g is None for g in grads), f"block {k} got gradient from SRA"
    assert all(p.grad is None for p in model.final_layer.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sra.head.parameters())
    assert all(p.grad is None and not p.requires_grad for p in sra.teacher.parameters())


def test_update_teacher_is_the_ema_formula_and_advances_step():
    model = tiny_sit()
    sra = SelfRepresentationAlignment(model, 2, 4, ema_decay=0.9)
    sra.update_teacher()  # the first use starts the EMA at the model's weights
    assert sra.step == 1
    before = copy.deepcopy(sra.teacher.state_dict())
    for name, value in model.state_dict().items():
        torch.testing.assert_close(before[name], value.float(), rtol=0, atol=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    sra.update_teacher()
    assert sra.step == 2
    student = model.state_dict()
    for name, value in sra.teacher.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * before[name] + 0.1 * student[name])
    # a user-kept teacher is the user's to update: only the step advances
    ema = copy.deepcopy(model)
    kept = SelfRepresentationAlignment(model, 2, 4, teacher=ema)
    frozen = copy.deepcopy(ema.state_dict())
    kept.update_teacher()
    assert kept.step == 1 and kept.teacher is ema
    assert all(torch.equal(v, frozen[k]) for k, v in ema.state_dict().items())


def test_dropped_labels_reach_the_teacher_as_null_ids():
    model = tiny_sit(class_dropout_prob=0.5)
    sra = SelfRepresentationAlignment(model, 2, 4)
    seen = {}
    sra.teacher.y_embedder.embedding_table.register_forward_pre_hook(lambda m, a: seen.update(teacher=a[0].clone()))
    student_ids = {}
    model.y_embedder.embedding_table.register_forward_pre_hook(lambda m, a: student_ids.update(ids=a[0].clone()))
    x_t, x_s, t, s, _ = inputs("sit", model)
    y = torch.arange(8) % 10
    x_t, x_s = x_t.repeat(2, 1, 1, 1), x_s.repeat(2, 1, 1, 1)
    t, s = t.repeat(2), s.repeat(2)
    torch.manual_seed(5)
    model(x_t, t, y)
    sra(model, x_t, x_s, t, s, y)
    dropped = student_ids["ids"] == 10
    assert dropped.any() and not dropped.all()  # seed 5 drops some labels, not all
    assert torch.equal(seen["teacher"], student_ids["ids"])
    assert torch.equal(seen["teacher"][~dropped], y[~dropped])


def train_steps(model, sra, opt, steps: int, seed: int) -> list[float]:
    losses = []
    g = torch.Generator().manual_seed(seed)
    gap, path = NoiseGap(), LinearPath()
    for _ in range(steps):
        x0 = torch.randn(4, 4, 8, 8, generator=g)
        noise = torch.randn(4, 4, 8, 8, generator=g)
        t = torch.rand(4, generator=g)
        s = gap.sample(t, generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        x_t, x_s = path.pair(x0, noise, t, s)
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))  # label dropout inside forward
        pred = model(x_t, t, y)
        loss = F.mse_loss(pred, path.velocity(x0, noise)) + sra(model, x_t, x_s, t, s, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sra.update_teacher()
        losses.append(loss.item())
    return losses


def build(seed=0):
    model = tiny_sit(seed)
    sra = SelfRepresentationAlignment(model, 2, 4, ema_decay=0.9)
    opt = torch.optim.AdamW([*model.parameters(), *sra.head.parameters()], lr=1e-3)
    return model, sra, opt


def test_save_rebuild_load_continues_bit_identically():
    model, sra, opt = build()
    train_steps(model, sra, opt, 3, seed=10)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "sra": sra.state_dict(), "opt": opt.state_dict()}, buffer)
    expected = train_steps(model, sra, opt, 3, seed=20)

    model2, sra2, opt2 = build(seed=123)  # different initial weights: everything must come from the file
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    model2.load_state_dict(state["model"])
    sra2.load_state_dict(state["sra"])
    opt2.load_state_dict(state["opt"])
    assert sra2.step == 3
    assert train_steps(model2, sra2, opt2, 3, seed=20) == expected
    for a, b in zip(sra.teacher.state_dict().values(), sra2.teacher.state_dict().values()):
        assert torch.equal(a, b)


def test_remove_and_context_manager_leave_no_hooks():
    model = tiny_sit()

    def hook_count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    base = hook_count()
    with SelfRepresentationAlignment(model, 2, 4) as sra:
        assert hook_count() > base
    assert hook_count() == base
    assert sra._capture.record is None


def test_default_layers_are_8_and_20_of_28():
    from examples.models import SiT

    model = SiT(input_size=4, patch_size=2, in_channels=1, hidden_size=8, depth=28, num_heads=1, num_classes=2)
    sra = SelfRepresentationAlignment(model)
    assert (sra.student_layer, sra.teacher_layer) == (8, 20)
    assert sra.head[0].in_features == 8 and sra.head[0].out_features == 16 and sra.head[2].out_features == 8
