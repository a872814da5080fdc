"""SRADTS (SRA-DTS, the SRA authors' ``SiT-SRA_DTS_AS``): exactness against a restatement of the official
step (``tests/_official_dts.py``), the per-group passes against one masked pass, gradients, the three
teacher kinds, resume, the draws, and refusals."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples.models import SiT, UViT
from sra_plugin import SRADTS
from sra_plugin.sradts import group_sizes
from tests._models import TINY, tiny_dit, tiny_sit
from tests._official_dts import OfficialSiT, TimestepEmbedder, official_step

B, T = 4, 16  # tiny SiT: 8x8 latents, patch 2 -> 16 tokens; mask_ratio 0.25 -> groups of 4 and 12
LAYERS = dict(student_layer=2, teacher_layer=4)


def official_model(seed: int, dropout: float = 0.1, dtype: torch.dtype = torch.float32) -> OfficialSiT:
    torch.manual_seed(seed)
    model = OfficialSiT(class_dropout_prob=dropout)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # nothing zero: every block and the output do something
    return model.to(dtype)


def sit_like(official: OfficialSiT, dropout: float = 0.1) -> SiT:
    """examples/models/sit.py's SiT holding the official model's weights (the head stays outside)."""
    model = SiT(**{**TINY, "class_dropout_prob": dropout}).to(official.pos_embed.dtype)
    model.load_state_dict({k: v for k, v in official.state_dict().items() if not k.startswith("ap_head.")})
    return model


def head_from(official: OfficialSiT) -> dict:
    head = official.ap_head
    return {"0.weight": head.linear1.weight, "0.bias": head.linear1.bias, "2.weight": head.linear2.weight, "2.bias": head.linear2.bias}


def draw(seed: int = 0, dtype: torch.dtype = torch.float32):
    """x0, noise, labels, groups (4 zeros per row), t and s = clamp(t - 0.2 u, 0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 4, 8, 8, generator=g, dtype=dtype)
    noise = torch.randn(B, 4, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (B,), generator=g)
    groups = torch.ones(B, T, dtype=torch.long)
    groups.scatter_(1, torch.rand(B, T, generator=g).argsort(1)[:, :4], 0)
    t = torch.rand(B, 2, generator=g, dtype=dtype)
    s = (t - 0.2 * torch.rand(B, 2, generator=g, dtype=dtype)).clamp(0, 1)
    return x0, noise, y, groups, t, s


def diffusion_per_sample(pred, x0, noise):
    return ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3))


# ------------------------------------------------------------------------------- (a) exactness
@pytest.mark.parametrize("teacher_kind", ["ema", "user"])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_matches_official_step_float32(teacher_kind, dropout):
    official = official_model(0, dropout).train()
    official_teacher = (copy.deepcopy(official) if teacher_kind == "ema" else official_model(1, dropout)).eval()
    student = sit_like(official, dropout).train()
    teacher = "ema" if teacher_kind == "ema" else sit_like(official_teacher, dropout)
    dts = SRADTS(student, teacher=teacher, **LAYERS)
    dts.head.load_state_dict(head_from(official))
    x0, noise, y, groups, t, s = draw()

    torch.manual_seed(123)  # the CFG dropout draw, once per step in both
    denoising, align = official_step(official, official_teacher, x0, noise, y, groups, t, s, 2, 4)
    torch.manual_seed(123)
    pred, ours = dts(student, x0, noise, y, groups=groups, t=t, s=s)

    diff_gap = (diffusion_per_sample(pred, x0, noise) - denoising).abs().max().item()
    align_gap = (ours - 0.5 * align.mean()).abs().item()
    print(f"float32 teacher={teacher_kind} dropout={dropout}: diffusion per sample max |diff| {diff_gap:.2e}, "
          f"weighted alignment |diff| {align_gap:.2e} (value {ours.item():.4f})")
    assert diff_gap < 2e-6 * max(1.0, denoising.abs().max().item())
    assert align_gap < 2e-6
    assert ours.item() > 1e-3  # a real alignment term, not a trivial zero


def test_official_teacher_sees_undropped_labels():
    """The official teacher gets the labels as loaded (eval mode drops none); ``teacher_labels="student"``
    gives it the labels the student used after its CFG dropout instead, and the two differ."""
    official = official_model(0, 0.5).train()
    official_teacher = official_model(1, 0.5).eval()
    x0, noise, y, groups, t, s = draw()
    torch.manual_seed(7)
    dropped = torch.where(torch.rand(B) < 0.5, 10, y)
    assert (dropped != y).any() and (dropped == y).any()
    results = {}
    for mode in ("given", "student"):
        student = sit_like(official, 0.5).train()
        dts = SRADTS(student, teacher=sit_like(official_teacher, 0.5), teacher_labels=mode, **LAYERS)
        dts.head.load_state_dict(head_from(official))
        torch.manual_seed(7)
        results[mode] = dts(student, x0, noise, y=y, groups=groups, t=t, s=s)[1]
    torch.manual_seed(7)
    _, official_align = official_step(official, official_teacher, x0, noise, y, groups, t, s, 2, 4)
    torch.manual_seed(7)
    _, dropped_align = official_step(official, official_teacher, x0, noise, y, groups, t, s, 2, 4, teacher_labels=dropped)
    assert (results["given"] - 0.5 * official_align.mean()).abs() < 2e-6
    assert (results["student"] - 0.5 * dropped_align.mean()).abs() < 2e-6
    assert (results["given"] - results["student"]).abs() > 1e-4


# ------------------------------------------------------------------------------- (b) group passes = masked pass
def float64_sit(official: OfficialSiT) -> SiT:
    """The examples' SiT in float64: its time embedder computes in float32 (as upstream), so the float64
    check swaps in one that follows the input's dtype (same parameters)."""
    model = sit_like(official, official.y_embedder.dropout_prob)
    model.t_embedder = TimestepEmbedder(32).double()
    model.t_embedder.load_state_dict(official.t_embedder.state_dict())
    return model


def group_tokens(adapter, module, x0, noise, y, groups, times, layer, n0=4):
    """Block ``layer``'s tokens of the adapter's per-group passes, back in token order ``(B, T, D)``."""
    ranked = groups.argsort(dim=1, stable=True)
    index = [ranked[:, :n0], ranked[:, n0:]]
    inputs = [(1 - times[:, g, None, None, None]) * x0 + times[:, g, None, None, None] * noise for g in range(2)]
    out = adapter.group_forward(module, inputs, [times[:, 0], times[:, 1]], index, (y,), {}, (layer,), False)
    joined = torch.cat(out.taps[layer], 1)
    return joined.gather(1, ranked.argsort(1)[..., None].expand(-1, -1, joined.shape[-1]))


def mixed_inputs(x0, noise, groups, times):
    """The official forward's inputs: the groups' full noisy samples stacked, and the per-token time."""
    inputs = torch.cat([(1 - times[:, g, None, None, None]) * x0 + times[:, g, None, None, None] * noise for g in range(2)])
    return inputs, torch.where(groups == 0, times[:, :1], times[:, 1:])


@pytest.mark.parametrize("on", ["examples_sit", "official_layout"])
def test_group_passes_equal_masked_pass_float64(on):
    official = official_model(0, 0.0, torch.float64).train()
    official_teacher = official_model(1, 0.0, torch.float64).eval()
    if on == "examples_sit":
        student, teacher = float64_sit(official).train(), float64_sit(official_teacher)
    else:  # the adapter also runs the official layout itself (per-token c, blocks with separation_mask)
        student, teacher = copy.deepcopy(official), copy.deepcopy(official_teacher)
    dts = SRADTS(student, teacher=teacher, **LAYERS).double()
    dts.head.load_state_dict(head_from(official))
    x0, noise, y, groups, t, s = draw(3, torch.float64)
    pred, ours = dts(student, x0, noise, y, groups=groups, t=t, s=s)

    inputs, time = mixed_inputs(x0, noise, groups, t)
    out, xr, _ = official(inputs, time, y, ad=2, mask=groups, return_token=True)
    official.eval()
    raw_student = official(inputs, time, y, ad=2, mask=groups)[1]
    official.train()
    teacher_inputs, teacher_time = mixed_inputs(x0, noise, groups, s)
    raw_teacher = official_teacher(teacher_inputs, teacher_time, y, ad=4, mask=groups)[1]
    denoising, _ = official_step(official, official_teacher, x0, noise, y, groups, t, s, 2, 4)

    gaps = {
        "pred": (pred - official.unpatchify(out)).abs().max().item(),
        "student block": (group_tokens(dts.adapter, student, x0, noise, y, groups, t, 2) - raw_student).abs().max().item(),
        "teacher block": (group_tokens(dts.adapter, teacher, x0, noise, y, groups, s, 4) - raw_teacher).abs().max().item(),
        "diffusion per sample": (diffusion_per_sample(pred, x0, noise) - denoising).abs().max().item(),
    }
    # The package computes alignment losses in float32 (losses.per_sample), whatever the tokens' dtype.
    expected = 0.5 * (1 - F.cosine_similarity(xr.float(), raw_teacher.float())).mean()
    gaps["alignment (float32 loss)"] = (ours - expected).abs().item()
    print(f"float64 on {on}: " + ", ".join(f"{k} {v:.1e}" for k, v in gaps.items()))
    assert all(v < 1e-12 for k, v in gaps.items() if k != "alignment (float32 loss)")
    assert gaps["alignment (float32 loss)"] < 1e-7


def test_separation_matters():
    """The masked pass is not the plain pass: without the mask (tokens of both groups attend to each other)
    the prediction differs, so the checks above could fail."""
    official = official_model(0, 0.0, torch.float64).train()
    student = float64_sit(official).train()
    dts = SRADTS(student, teacher=float64_sit(official_model(1, 0.0, torch.float64)), **LAYERS).double()
    x0, noise, y, groups, t, s = draw(3, torch.float64)
    pred, _ = dts(student, x0, noise, y, groups=groups, t=t, s=s)
    full_time = torch.where(groups == 0, t[:, :1], t[:, 1:])
    inputs = torch.cat([(1 - t[:, g, None, None, None]) * x0 + t[:, g, None, None, None] * noise for g in range(2)])
    x_mixed = OfficialSiT.mix_group_tokens((official.x_embedder(inputs) + official.pos_embed).reshape(2, B, T, -1), groups)
    c = official.t_embedder(full_time.reshape(-1)).reshape(B, T, -1) + official.y_embedder(y, False)[0][:, None]
    h = x_mixed
    for block in official.blocks:
        h = block(h, c, separation_mask=None)
    plain = official.unpatchify(official.final_layer(h, c))
    assert (pred - plain).abs().max() > 1e-3


# ------------------------------------------------------------------------------- (c) gradients
def test_gradients_reach_student_and_head_never_teacher():
    model = tiny_sit(class_dropout_prob=0.0)
    nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    user_teacher = copy.deepcopy(model)
    for teacher in ("ema", user_teacher):
        model.zero_grad(set_to_none=True)
        dts = SRADTS(model, teacher=teacher, **LAYERS)
        x0, noise, y, groups, t, s = draw()
        pred, align = dts(model, x0, noise, y, groups=groups, t=t, s=s)
        align.backward(retain_graph=True)
        blocks = model.blocks
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[0].parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[1].parameters())
        assert all(p.grad is None for b in blocks[2:] for p in b.parameters())  # after the student's block
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dts.head.parameters())
        teacher_module = dts.teacher
        assert teacher_module is not model
        assert all(p.grad is None for p in teacher_module.parameters())
        model.zero_grad(set_to_none=True)
        diffusion_per_sample(pred, x0, noise).mean().backward()  # the prediction trains every block
        assert all(p.grad is not None for b in blocks for p in b.parameters())
        assert all(p.grad is None for p in teacher_module.parameters())


# ------------------------------------------------------------------------------- (d) teacher kinds
def lora_sit(seed: int = 0):
    peft = pytest.importorskip("peft")
    model = tiny_sit(seed=seed, class_dropout_prob=0.0)
    nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    torch.manual_seed(seed)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=4, target_modules=r".*\.attn\.(qkv|proj)"))
    with torch.no_grad():  # adapters that already do something, so that a few steps move them visibly
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def manual_alignment(dts: SRADTS, model: nn.Module, student_tokens_model: nn.Module, x0, noise, y, groups, t, s):
    """The alignment recomputed by hand: student tokens from ``student_tokens_model`` in training mode,
    teacher tokens from the user's model computing with ``dts.teacher_weights()`` in eval mode."""
    adapter = dts.adapter
    ranked = groups.argsort(dim=1, stable=True)
    index = [ranked[:, :4], ranked[:, 4:]]
    order = ranked.argsort(1)

    def passes(module, times, layer):
        inputs = [(1 - times[:, g, None, None, None]) * x0 + times[:, g, None, None, None] * noise for g in range(2)]
        out = adapter.group_forward(module, inputs, [times[:, 0], times[:, 1]], index, (y,), {}, (layer,), False)
        joined = torch.cat(out.taps[layer], 1)
        return joined.gather(1, order[..., None].expand(-1, -1, joined.shape[-1]))

    student = passes(student_tokens_model, t, dts.student_layer)
    with torch.no_grad(), dts.teacher_weights() as m:
        m.eval()
        target = passes(m, s, dts.teacher_layer)
        m.train()
    return 0.5 * (1 - F.cosine_similarity(dts.head(student), target, dim=1)).mean()


def teacher_kind_case(kind: str):
    """``(model, inner, user)`` for a teacher kind: a LoRA SiT (``inner`` its base) for ``"lora"``, else a tiny SiT
    with a non-zero output layer; ``user``: a copy of ``inner`` as the user's EMA for ``"user"``, else None."""
    if kind == "lora":
        model = lora_sit()
        inner = model.get_base_model()
    else:
        model = tiny_sit(class_dropout_prob=0.0)
        nn.init.normal_(model.final_layer.linear.weight, std=0.05)
        inner = model
    return model, inner, copy.deepcopy(inner) if kind == "user" else None


def train_teacher_kind(dts, model, inner, user, kind: str, draw, steps: int = 3) -> None:
    """``steps`` SGD steps of the diffusion MSE + ``dts``'s term on the draws ``draw(0..steps-1)``, the teacher
    updated after each (a user teacher by a 0.5 lerp towards the model)."""
    params = [p for p in inner.parameters() if p.requires_grad] + list(dts.head.parameters())
    opt = torch.optim.SGD(params, lr=20.0 if kind == "lora" else 0.5)  # LoRA's gradients are small here
    for step in range(steps):
        x0, noise, y, groups, t, s = draw(step)
        pred, align = dts(model, x0, noise, y, groups=groups, t=t, s=s)
        (diffusion_per_sample(pred, x0, noise).mean() + align).backward()
        opt.step()
        opt.zero_grad()
        dts.update_teacher()
        if user is not None:
            with torch.no_grad():
                for pu, pm in zip(user.parameters(), inner.parameters()):
                    pu.lerp_(pm, 0.5)


@pytest.mark.parametrize("kind", ["owned", "user", "lora"])
def test_teacher_kinds_train_and_use_the_teacher_weights(kind):
    model, inner, user = teacher_kind_case(kind)
    dts = SRADTS(model, teacher=user if user is not None else "ema", ema_decay=0.5, **LAYERS)
    if kind == "lora":
        assert dts.ema.shared  # the EMA holds only the LoRA parameters
    elif kind == "owned":
        assert not dts.ema.shared
    train_teacher_kind(dts, model, inner, user, kind, draw)
    x0, noise, y, groups, t, s = draw(9)
    with torch.no_grad():
        _, align = dts(model, x0, noise, y, groups=groups, t=t, s=s)
        expected = manual_alignment(dts, model, inner, x0, noise, y, groups, t, s)
        # the teacher differs from the student by now: the same check with the student's weights fails
        student_target = manual_alignment_student_weights(dts, inner, x0, noise, y, groups, t, s)
    assert torch.isfinite(align)
    assert (align - expected).abs() < 1e-6
    assert (align - student_target).abs() > 1e-5
    assert dts.step == 3


def manual_alignment_student_weights(dts, inner, x0, noise, y, groups, t, s):
    class Same:
        def __enter__(self):
            return inner

        def __exit__(self, *exc):
            return False

    original = dts.teacher_weights
    dts.teacher_weights = lambda: Same()
    try:
        return manual_alignment(dts, inner, inner, x0, noise, y, groups, t, s)
    finally:
        del dts.teacher_weights
        assert dts.teacher_weights.__func__ is original.__func__


# ------------------------------------------------------------------------------- (e) resume
def train(model, dts, opt, steps, start):
    out = []
    for step in range(start, start + steps):
        x0, noise, y, _, _, _ = draw(step)
        pred, align = dts(model, x0, noise, y, generator=torch.Generator().manual_seed(100 + step))
        loss = diffusion_per_sample(pred, x0, noise).mean() + align
        loss.backward()
        opt.step()
        opt.zero_grad()
        dts.update_teacher()
        out.append(loss.item())
    return out


def fresh(schedule=None):
    model = tiny_sit(class_dropout_prob=0.0)
    dts = SRADTS(model, ema_decay=0.9, weight=schedule if schedule is not None else 0.5, **LAYERS)
    opt = torch.optim.AdamW([*model.parameters(), *dts.head.parameters()], lr=1e-3)
    return model, dts, opt


def test_resume_continues_identically():
    schedule = lambda step: 0.5 if step < 3 else 0.25  # noqa: E731 - the step must resume too
    model, dts, opt = fresh(schedule)
    train(model, dts, opt, 2, 0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "dts": dts.state_dict(), "opt": opt.state_dict()}, buffer)
    reference = train(model, dts, opt, 3, 2)

    model2, dts2, opt2 = fresh(schedule)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model2.load_state_dict(saved["model"])
    dts2.load_state_dict(saved["dts"])
    opt2.load_state_dict(saved["opt"])
    assert dts2.step == 2
    resumed = train(model2, dts2, opt2, 3, 2)
    assert resumed == reference
    for a, b in zip(dts.ema.model.parameters(), dts2.ema.model.parameters()):
        assert torch.equal(a, b)

    # without the objective's state (EMA and head) the continuation differs
    model3, dts3, opt3 = fresh(schedule)
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    assert train(model3, dts3, opt3, 3, 2) != reference


def test_state_of_another_configuration_is_refused():
    model = tiny_sit()
    state = SRADTS(model, mask_ratio=0.25, **LAYERS).state_dict()
    with pytest.raises(ValueError, match="mask_ratio"):
        SRADTS(tiny_sit(), mask_ratio=0.5, **LAYERS).load_state_dict(state)


# ------------------------------------------------------------------------------- draws, weights, families
def test_draws_follow_the_recipe_and_the_generator():
    model = tiny_sit()
    dts = SRADTS(model, **LAYERS)
    x0, noise, y, *_ = draw()
    draws = []
    for _ in range(2):
        dts(model, x0, noise, y, generator=torch.Generator().manual_seed(5))
        draws.append({k: v.clone() for k, v in dts.last_draw.items()})
    assert all(torch.equal(draws[0][k], draws[1][k]) for k in draws[0])
    d = draws[0]
    assert ((d["groups"] == 0).sum(1) == 4).all() and ((d["groups"] == 1).sum(1) == 12).all()
    assert not torch.equal(d["groups"][0], d["groups"][1])  # a permutation per sample
    assert d["t"].shape == (B, 2) and not torch.equal(d["t"][:, 0], d["t"][:, 1])  # a time per group
    gap = d["t"] - d["s"]
    assert (gap >= 0).all() and (gap <= 0.2 + 1e-6).all() and (d["s"] >= 0).all()
    dts(model, x0, noise, y, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(dts.last_draw["groups"], d["groups"])


def test_group_sizes_follow_the_official_rule():
    # floor of each share, the remainder to the larger fractional part
    assert group_sizes(0.25, 256) == (64, 192)
    assert group_sizes(0.25, 16) == (4, 12)
    assert group_sizes(0.25, 9) == (2, 7)    # 2.25 / 6.75: group 1 gets the token
    assert group_sizes(0.25, 11) == (3, 8)   # 2.75 / 8.25: group 0 gets it (floor alone would say 2)
    assert group_sizes(0.5, 7) == (4, 3)     # a tie goes to group 0


def test_weight_zero_skips_the_teacher_and_schedules_apply():
    model = tiny_sit()
    user = copy.deepcopy(model)
    calls = []
    user.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    dts = SRADTS(model, teacher=user, weight=lambda step: 0.0 if step == 0 else 0.5, **LAYERS)
    x0, noise, y, groups, t, s = draw()
    pred, align = dts(model, x0, noise, y, groups=groups, t=t, s=s)
    assert align.item() == 0.0 and not calls and pred.shape == x0.shape
    pred, align = dts(model, x0, noise, y, groups=groups, t=t, s=s)
    assert align.item() > 0 and len(calls) == 2  # one teacher pass per group
    assert dts.metrics["weight"] == 0.5


def test_dit_learn_sigma_prediction_layout():
    model = tiny_dit()
    dts = SRADTS(model, **LAYERS)
    x0, noise, y, groups, t, s = draw()
    pred, align = dts(model, x0, noise, y, groups=groups, t=t, s=s)
    assert pred.shape == (B, 8, 8, 8)  # learn_sigma: 2C channels, as the model's own forward
    align.backward()
    assert dts.head[0].weight.grad is not None


def test_the_groups_see_only_their_tokens():
    """Changing group 1's input leaves group 0's predictions unchanged (and changes its own)."""
    model = tiny_sit().eval()
    nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    dts = SRADTS(model, **LAYERS)
    x0, noise, y, groups, t, s = draw()
    with torch.no_grad():
        pred1, _ = dts(model, x0, noise, y, groups=groups, t=t, s=s)
        t2 = t.clone()
        t2[:, 1] = (t2[:, 1] + 0.3) % 1.0
        pred2, _ = dts(model, x0, noise, y, groups=groups, t=t2, s=s)
    tokens = lambda p: p.reshape(B, 4, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(B, T, -1)  # noqa: E731
    change = (tokens(pred1) - tokens(pred2)).abs().amax(-1)
    assert (change[groups == 0] == 0).all()
    assert (change[groups == 1] > 0).all()


# ------------------------------------------------------------------------------- (f) bad input, refusals
def test_bad_input_is_refused_with_the_argument_named():
    model = tiny_sit()
    dts = SRADTS(model, **LAYERS)
    x0, noise, y, groups, t, s = draw()
    cases = [
        (dict(groups=groups.float()), TypeError, "groups"),
        (dict(groups=groups[:, :8]), ValueError, r"groups of shape \(4, 8\)"),
        (dict(groups=groups + 1), ValueError, r"groups\[0, \d+\]=2"),
        (dict(groups=torch.zeros_like(groups)), ValueError, "has 16 zeros"),
        (dict(t=t[:, :1]), ValueError, r"t of shape \(4, 1\)"),
        (dict(t=t + 1.5), ValueError, r"t\[0, 0\]="),
        (dict(s=-s - 0.1), ValueError, r"s\[0, 0\]="),
        (dict(t=[0.5, 0.5]), TypeError, "t=list"),
        (dict(generator=3), TypeError, "generator"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            dts(model, x0, noise, y, **kwargs)
    with pytest.raises(ValueError, match="noise of shape"):
        dts(model, x0, noise[:2], y)
    with pytest.raises(ValueError, match="makes 64 tokens"):
        dts(model, torch.randn(B, 4, 16, 16), torch.randn(B, 4, 16, 16), y)
    with pytest.raises(TypeError, match="conditioning"):
        dts(model, x0, noise, y, y)
    with pytest.raises(ValueError, match="not the model"):
        dts(tiny_sit(), x0, noise, y)


def test_bad_options_are_refused():
    model = tiny_sit()
    with pytest.raises(ValueError, match="mask_ratio=1.0"):
        SRADTS(model, mask_ratio=1.0)
    with pytest.raises(ValueError, match="max_gap=-0.1"):
        SRADTS(model, max_gap=-0.1)
    with pytest.raises(ValueError, match="teacher_labels='dropped'"):
        SRADTS(model, teacher_labels="dropped")
    with pytest.raises(TypeError, match="separate='no' is not accepted: use True .* or False"):
        SRADTS(model, separate="no")
    with pytest.raises(ValueError, match="comes before"):
        SRADTS(model, student_layer=4, teacher_layer=2)


def test_other_families_are_refused_by_name():
    uvit = UViT(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=5, num_heads=2, num_classes=10)
    with pytest.raises(TypeError, match=r"UViT \(adapter 'uvit'\).*not supported"):
        SRADTS(uvit)

    class RotaryBlock(nn.Module):  # a LightningDiT-like block: rotary positions besides (x, c)
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(32)

        def forward(self, x, c, feat_rope=None):
            return x

    rotary = tiny_sit()
    rotary.blocks = nn.ModuleList([RotaryBlock() for _ in range(6)])
    with pytest.raises(ValueError, match=r"SiT \(adapter 'dit'\).*feat_rope"):
        SRADTS(rotary)


def test_defaults_are_the_sit_b_recipe():
    model = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=24, depth=12, num_heads=2, num_classes=10)
    dts = SRADTS(model)
    assert (dts.student_layer, dts.teacher_layer) == (3, 8)
    assert (dts.mask_ratio, dts.max_gap, dts.loss_name, dts.weight, dts.ema_decay) == (0.25, 0.2, "cosine_tokens", 0.5, 0.9999)
    assert dts.teacher_labels == "given"
    assert [m.__class__.__name__ for m in dts.head] == ["Linear", "SiLU", "Linear"]
    assert (dts.head[0].in_features, dts.head[0].out_features, dts.head[2].out_features) == (24, 48, 24)


def test_copy_and_pickle():
    model = tiny_sit()
    dts = SRADTS(model, **LAYERS)
    model2, dts2 = copy.deepcopy((model, dts))
    x0, noise, y, groups, t, s = draw()
    torch.manual_seed(0)
    a = dts(model, x0, noise, y, groups=groups, t=t, s=s)[1]
    torch.manual_seed(0)
    b = dts2(model2, x0, noise, y, groups=groups, t=t, s=s)[1]
    assert torch.equal(a, b)
    buffer = io.BytesIO()
    torch.save((model, dts), buffer)


def test_ddp_is_refused(tmp_path):
    """DDP would not synchronise the gradients of passes that bypass its forward: refused, not silent."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = tiny_sit()
        dts = SRADTS(model, **LAYERS)
        wrapped = DistributedDataParallel(model)
        x0, noise, y, *_ = draw()
        with pytest.raises(ValueError, match="DistributedDataParallel is not supported by SRADTS"):
            dts(wrapped, x0, noise, y)
        with pytest.raises(ValueError, match="DistributedDataParallel is not supported by SRADTS"):
            SRADTS(wrapped, **LAYERS)
    finally:
        dist.destroy_process_group()


def test_sample_weight_and_metrics():
    official = official_model(0, 0.0).train()
    official_teacher = official_model(1, 0.0).eval()
    student = sit_like(official, 0.0).train()
    dts = SRADTS(student, teacher=sit_like(official_teacher, 0.0), **LAYERS)
    dts.head.load_state_dict(head_from(official))
    x0, noise, y, groups, t, s = draw()
    _, align = official_step(official, official_teacher, x0, noise, y, groups, t, s, 2, 4)
    per_sample = align.mean(dim=1)
    weights = torch.tensor([2.0, 0.0, 1.0, 0.0])
    _, ours = dts(student, x0, noise, y, groups=groups, t=t, s=s, sample_weight=weights)
    assert (ours - 0.5 * (weights * per_sample).mean()).abs() < 2e-6
    m = dts.metrics
    assert m["weight"] == 0.5 and abs(m["gap"] - (t - s).abs().mean().item()) < 1e-6
    assert set(m) >= {"loss", "align_loss", "cos_sim", "student_norm", "teacher_norm", "gap"}
    with pytest.raises(ValueError, match="sample_weight"):
        dts(student, x0, noise, y, groups=groups, t=t, s=s, sample_weight=torch.ones(3))


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("how", ["wrapper", "in_place"])
def test_a_compiled_model_gives_the_eager_step(separate, how):
    """``torch.compile(model)`` and ``model.compile()`` are accepted; the passes give the eager numbers and
    gradients (they run the model's modules eagerly: no speed-up from compiling, no graph break to handle)."""
    from tests._models import batch

    def step(model, dts_model):
        dts = SRADTS(dts_model, student_layer=1, teacher_layer=2, separate=separate)
        x0, noise, _, y = batch(model)
        pred, align = dts(dts_model, x0, noise, y, generator=torch.Generator().manual_seed(3))
        (pred.square().mean() + align).backward()
        return pred, align, [p.grad for p in model.parameters()]

    eager = step(*(2 * [tiny_sit()]))
    model = tiny_sit()
    if how == "wrapper":
        compiled = torch.compile(model, backend="eager")
    else:
        model.compile(backend="eager")
        compiled = model
    got = step(model, compiled)
    torch.testing.assert_close(got[0], eager[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], eager[1], rtol=0, atol=0)
    for a, b in zip(got[2], eager[2]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
