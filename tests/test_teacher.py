"""The owned EMA teacher (``sra_plugin/teacher.py``): what it holds, what it computes, when it starts,
how it hands its weights to the user's model, and how it survives a checkpoint.

Two modes, picked by what trains: ``full`` (every parameter trains: the teacher is a float32 copy of
the model) and ``shared`` (LoRA through peft: the EMA holds only the LoRA parameters, the base model's
frozen tensors are the student's own). Each test fails on a naive teacher (a deep copy made at
construction, an EMA in the model's dtype, a teacher that swaps or forgets weights).
"""

from __future__ import annotations

import copy
import gc
import types

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sra_plugin import SelfRepresentationAlignment
from tests._models import flow_batch, tiny_sit

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

LAYERS = dict(student_layer=2, teacher_layer=4)
ATTENTION = r".*\.attn\.(qkv|proj)"  # LoRA on the attention's linears of every block


# ---------------------------------------------------------------------------------------- models
def sit(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny SiT that looks pretrained (no zero-initialised output layer, so a frozen base passes
    gradients to adapters), without label dropout (a hand-built reference sees the student's labels)."""
    model = tiny_sit(seed=seed, class_dropout_prob=0.0)
    nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    return model.to(dtype)


def lora(model: nn.Module, r: int = 4, seed: int = 0, nonzero: bool = False) -> nn.Module:
    """``model`` with peft LoRA (rank ``r``) on its attention, base frozen: a ``PeftModel``.
    ``nonzero``: random ``lora_B`` too, so that the adapters change the output from the start."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=ATTENTION))
    if nonzero:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
    return peft_model


def build(mode: str, seed: int = 0, dtype: torch.dtype = torch.float32, nonzero: bool = False) -> nn.Module:
    model = sit(seed, dtype)
    return lora(model, seed=seed, nonzero=nonzero) if mode == "shared" else model


def inner(model: nn.Module) -> nn.Module:
    """The user's model under a PeftModel (peft injects the LoRA layers into it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in inner(model).named_parameters() if p.requires_grad}


def adamw(model: nn.Module, sra: SelfRepresentationAlignment, lr: float = 1e-2) -> torch.optim.Optimizer:
    return torch.optim.AdamW([*trainable(model).values(), *sra.head.parameters()], lr=lr, weight_decay=0.01)


def autocast(model: nn.Module):
    """The examples' SiT embeds time in float32, as upstream: a bf16 model runs under autocast."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_of(model) == torch.bfloat16)


def train_step(model: nn.Module, sra: SelfRepresentationAlignment, opt: torch.optim.Optimizer, step: int) -> Tensor:
    x_t, x_s, t, s, y, target = flow_batch(4, step)
    with autocast(model):
        pred = model(x_t, t, y)
        loss = F.mse_loss(pred.float(), target) + sra(model, x_t, x_s, t, s, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sra.update_teacher()
    return loss.detach()


def dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def block_output(module: nn.Module, index: int, run) -> Tensor:
    """The output of ``module.blocks[index - 1]`` during ``run()`` (the last time it ran)."""
    seen: list[Tensor] = []
    handle = inner(module).blocks[index - 1].register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    assert seen, "the block did not run"
    return seen[-1]


def teacher_tokens(model: nn.Module, sra: SelfRepresentationAlignment, seed: int) -> Tensor:
    """Block L_t's tokens of the teacher pass of one ``sra(...)`` call, read by a hook on the module
    the teacher runs (the student's own blocks when the weights are shared)."""
    x_t, x_s, t, s, y, _ = flow_batch(4, seed)
    model(x_t, t, y)  # the training forward; the hook below is added after it, so it sees the teacher only
    module = inner(model) if sra.ema.shared else sra.teacher
    out = block_output(module, sra.teacher_layer, lambda: sra(model, x_t, x_s, t, s, y))
    assert sra.metrics["student_reruns"] == 0
    return out


def reference_tokens(model: nn.Module, values: dict[str, Tensor], layer: int, seed: int) -> Tensor:
    """By hand: a deep copy of the model with ``values`` set into its parameters, in eval mode, run in
    full on (x_s, s); the output of block ``layer``."""
    ref = copy.deepcopy(inner(model))
    with torch.no_grad():
        params = dict(ref.named_parameters())
        for name, value in values.items():
            params[name].copy_(value.to(params[name].dtype))
    ref.eval()
    _, x_s, _, s, y, _ = flow_batch(4, seed)
    with torch.no_grad():
        return block_output(ref, layer, lambda: ref(x_s, s, y))


class ExactEMA:
    """The float64 EMA of the trainable parameters, started when told (the teacher's first use)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.values: dict[str, Tensor] = {}

    def start(self, model: nn.Module) -> None:
        self.values = {n: p.detach().double().clone() for n, p in trainable(model).items()}
        self.initial = dict(self.values)

    def update(self, model: nn.Module) -> None:
        for n, p in trainable(model).items():
            self.values[n] = self.decay * self.values[n] + (1 - self.decay) * p.detach().double()


# ---------------------------------------------------------------------------------------- memory
_SKIP = (types.ModuleType, type, types.BuiltinFunctionType, types.CodeType, str, bytes, int, float, bool)


def held_tensors(sra: SelfRepresentationAlignment, model: nn.Module) -> dict[int, int]:
    """Every tensor storage reachable from ``sra`` (attributes, submodules, containers, closures) that is
    neither the head's nor the model's own: storage address -> bytes. The walk stops at the model's
    modules and the head, so it finds what SRA keeps on the side however it keeps it."""
    stop = {id(m) for m in [*model.modules(), *sra.head.modules()]}
    model_storage = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    found: dict[int, int] = {}
    seen: set[int] = set()
    todo: list = [sra]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or (id(obj) in stop and obj is not sra):
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in model_storage and storage.nbytes():
                found[storage.data_ptr()] = storage.nbytes()
            continue
        if isinstance(obj, _SKIP):
            continue
        if isinstance(obj, types.FunctionType):  # its closure and defaults, not its module's globals
            todo += [c.cell_contents for c in obj.__closure__ or () if c.cell_contents is not None]
            todo += list(obj.__defaults__ or ())
            continue
        todo += gc.get_referents(obj)
    return found


def test_lora_teacher_holds_only_the_trainable_parameters_in_float32():
    model = build("shared", dtype=torch.bfloat16)  # frozen base in bf16, as fine-tuning runs it
    sra = SelfRepresentationAlignment(model, **LAYERS, head="mlp")
    opt = adamw(model, sra)
    for step in range(2):
        train_step(model, sra, opt, step)

    lora_f32 = sum(p.numel() * 4 for p in trainable(model).values())
    base = sum(p.numel() * p.element_size() for p in model.parameters())
    held = sum(held_tensors(sra, model).values())
    assert sra.ema.shared
    assert lora_f32 <= held <= 2 * lora_f32 + 4096, (held, lora_f32, base)
    assert held < base / 10  # the base model (20x the LoRA parameters here) is nowhere in it
    assert all(v.dtype == torch.float32 for v in sra.ema.values().values())


def test_full_training_keeps_a_float32_copy_as_the_teacher_module():
    model = build("full", dtype=torch.bfloat16)
    sra = SelfRepresentationAlignment(model, **LAYERS)
    assert not sra.ema.shared and isinstance(sra.teacher, nn.Module)
    params = sum(p.numel() for p in model.parameters())
    held = sum(held_tensors(sra, model).values())
    assert params * 4 <= held <= params * 4 + 4096
    assert {p.dtype for p in sra.teacher.parameters()} == {torch.float32}


# ---------------------------------------------------------------------------------------- the teacher pass
@pytest.mark.parametrize("mode", ["shared", "full"])
def test_teacher_pass_equals_a_copy_with_the_exact_ema_set_in(mode):
    decay = 0.6  # far from 1, so the EMA, the student and a stale copy all differ clearly
    model = build(mode, nonzero=True)
    sra = SelfRepresentationAlignment(model, **LAYERS, ema_decay=decay)
    opt = adamw(model, sra)
    exact = ExactEMA(decay)
    exact.start(model)  # the first sra(...) below starts the EMA from these weights
    for step in range(4):
        train_step(model, sra, opt, step)
        exact.update(model)

    got = teacher_tokens(model, sra, seed=9)
    want = reference_tokens(model, exact.values, sra.teacher_layer, seed=9)
    student_now = reference_tokens(model, {n: p.detach() for n, p in trainable(model).items()}, sra.teacher_layer, seed=9)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - student_now).abs().max() > 1e-3  # the test can tell the EMA from the student's weights
    assert inner(model).training  # the training mode is back after the teacher's eval pass


@pytest.mark.parametrize("mode", ["shared", "full"])
def test_bf16_model_teacher_moves_as_an_exact_ema(mode):
    decay, steps = 0.999, 100
    model = build(mode, dtype=torch.bfloat16)
    sra = SelfRepresentationAlignment(model, **LAYERS, ema_decay=decay, weight=0.0)  # weight 0: no teacher pass
    opt = torch.optim.AdamW(list(trainable(model).values()), lr=1e-3, weight_decay=0.0)
    exact = ExactEMA(decay)
    exact.start(model)
    for step in range(steps):
        train_step(model, sra, opt, step)
        exact.update(model)

    flat = lambda d: torch.cat([d[n].flatten() for n in sorted(exact.values)])  # noqa: E731
    teacher = {n: v.double() for n, v in sra.ema.values().items()}
    moved = (flat(exact.values) - flat(exact.initial)).norm()
    error = (flat(teacher) - flat(exact.values)).norm()
    assert moved > 0
    assert error <= 0.05 * moved, f"teacher off the exact EMA by {error / moved:.1%} of its movement"
    # What the model computes with inside teacher_weights() is that EMA, rounded once to bf16.
    with sra.teacher_weights():
        used = {n: p.detach().double() for n, p in trainable(model).items()}
    assert (flat(used) - flat(exact.values)).norm() <= 0.05 * moved + (flat(exact.values).abs() * 2**-8).norm()


# ---------------------------------------------------------------------------------------- first use
@pytest.mark.parametrize("mode", ["shared", "full"])
def test_weights_loaded_after_construction_are_the_teachers_start(mode):
    model = build(mode, seed=0, nonzero=True)
    sra = SelfRepresentationAlignment(model, student_layer=3, teacher_layer=3, head="identity", loss="mse")
    pretrained = build(mode, seed=1, nonzero=True).state_dict()
    model.load_state_dict(pretrained)  # after sra was built: what a fine-tuning script does
    assert not bool(sra.ema.initted)

    x_t, _, t, _, y, _ = flow_batch(4, 0)
    model(x_t, t, y)
    loss = sra(model, x_t, x_t, t, t, y)  # same input, same time, same block, same weights: nothing to align
    assert float(loss.detach()) == 0.0 and sra.metrics["student_reruns"] == 0
    assert bool(sra.ema.initted)
    for name, p in trainable(model).items():  # a copy made at construction would hold the other model
        assert torch.equal(sra.ema.values()[name], p.detach().float()), name


def test_update_teacher_before_any_call_also_starts_the_ema_there():
    model = build("shared", nonzero=True)
    sra = SelfRepresentationAlignment(model, **LAYERS, ema_decay=0.5)
    model.load_state_dict(build("shared", seed=3, nonzero=True).state_dict())
    sra.update_teacher()  # first use: copies, no averaging with the construction-time weights
    for name, p in trainable(model).items():
        assert torch.equal(sra.ema.values()[name], p.detach().float()), name


def test_ema_decay_1_on_lora_is_the_base_model():
    model = build("shared")  # LoRA as peft starts it: lora_B = 0, so the model is the base model
    sra = SelfRepresentationAlignment(model, **LAYERS, ema_decay=1.0)
    opt = adamw(model, sra)
    for step in range(3):
        train_step(model, sra, opt, step)
    assert any(p.abs().max() > 0 for n, p in trainable(model).items() if "lora_B" in n)  # the adapters trained

    got = teacher_tokens(model, sra, seed=5)
    _, x_s, _, s, y, _ = flow_batch(4, 5)
    inner(model).eval()
    with torch.no_grad():
        with model.disable_adapter():
            base = block_output(model, sra.teacher_layer, lambda: model(x_s, s, y))
        adapted = block_output(model, sra.teacher_layer, lambda: model(x_s, s, y))
    torch.testing.assert_close(got, base, atol=1e-6, rtol=0)
    assert (got - adapted).abs().max() > 1e-3  # with the trained adapters the output is another


# ---------------------------------------------------------------------------------------- teacher_weights()
def snapshot(model: nn.Module) -> dict[str, tuple[Tensor, Tensor, int]]:
    return {n: (p, p.detach().clone(), p.data_ptr()) for n, p in inner(model).named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["shared", "full", "user"])
def test_teacher_weights_round_trip_is_exact(mode, dtype):
    model = build("full" if mode == "user" else mode, dtype=dtype, nonzero=True)
    user_ema = None
    if mode == "user":
        user_ema = copy.deepcopy(model).requires_grad_(False)
        with torch.no_grad():
            for p in user_ema.parameters():
                p.add_(0.01)  # any EMA the user keeps: here simply other weights
    sra = SelfRepresentationAlignment(model, **LAYERS, ema_decay=0.5, teacher=user_ema if user_ema is not None else "ema")
    opt = adamw(model, sra)
    for step in range(3):
        train_step(model, sra, opt, step)
    before = snapshot(model)
    teacher = dict(user_ema.named_parameters()) if user_ema is not None else sra.ema.values()
    x_t, _, t, _, y, _ = flow_batch(4, 7)

    with sra.teacher_weights() as computing:
        assert computing is inner(model)
        inside = {n: p.detach().clone() for n, p in inner(model).named_parameters()}
        with torch.no_grad(), autocast(model):
            out = model(x_t, t, y)
    changed = 0
    for name, (param, value, ptr) in before.items():
        if name in teacher:
            assert torch.equal(inside[name], teacher[name].to(value.dtype)), name
            changed += not torch.equal(inside[name], value)
        else:
            assert torch.equal(inside[name], value), name  # frozen ones are not touched
        now = dict(inner(model).named_parameters())[name]
        assert now is param and now.data_ptr() == ptr and torch.equal(now, value), name  # back, bit for bit, same tensor
    assert changed > 0

    if mode != "shared":  # the teacher module computes the same thing
        teacher_module = user_ema if user_ema is not None else sra.teacher
        if dtype == torch.float32:  # (the owned copy of a bf16 model is float32: another computation)
            with torch.no_grad():
                torch.testing.assert_close(out, teacher_module(x_t, t, y), atol=0, rtol=0)
    # An error inside the block restores the weights too.
    with pytest.raises(KeyError):
        with sra.teacher_weights():
            raise KeyError("inside")
    for name, (param, value, ptr) in before.items():
        assert torch.equal(dict(inner(model).named_parameters())[name], value), name
    train_step(model, sra, opt, 3)  # training goes on with the same parameters and optimizer


# ---------------------------------------------------------------------------------------- structure
def test_adding_lora_after_first_use_names_the_parameter_and_the_fix():
    model = sit()
    sra = SelfRepresentationAlignment(model, **LAYERS)
    opt = adamw(model, sra)
    train_step(model, sra, opt, 0)
    peft_model = lora(model)  # LoRA added afterwards: the base is frozen, adapters appear

    x_t, x_s, t, s, y, _ = flow_batch(4, 1)
    peft_model(x_t, t, y)
    step = sra.step
    with pytest.raises(ValueError, match=r"after adding\s+adapters") as info:
        sra(peft_model, x_t, x_s, t, s, y)
    message = str(info.value)
    assert "lora_A" in message and "'blocks." in message
    with pytest.raises(ValueError, match="lora_A"):
        sra.update_teacher()
    assert sra.step == step  # nothing advanced
    with pytest.raises(ValueError, match="lora_A"):
        with sra.teacher_weights():
            pass


def test_freezing_a_parameter_after_first_use_is_named():
    model = sit()
    sra = SelfRepresentationAlignment(model, **LAYERS)
    sra.update_teacher()
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qkv\.weight' is gone or frozen"):
        sra.update_teacher()


# ---------------------------------------------------------------------------------------- resume
STEPS = 6


def fresh(mode: str, seed: int):
    model = build(mode, seed=seed)
    sra = SelfRepresentationAlignment(model, **LAYERS, ema_decay=0.8)
    return model, sra, adamw(model, sra, lr=1e-3)


def run(mode: str, save_at: int | None, tmp_path):
    """STEPS steps straight, or saved after ``save_at`` and continued in a freshly built model and sra."""
    model, sra, opt = fresh(mode, seed=0)
    torch.manual_seed(0)
    losses = [train_step(model, sra, opt, step) for step in range(save_at if save_at is not None else STEPS)]
    if save_at is not None:
        torch.save({"model": model.state_dict(), "sra": sra.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
        model, sra, opt = fresh(mode, seed=7)  # other weights, other head, an EMA not started
        checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        sra.load_state_dict(checkpoint["sra"])
        opt.load_state_dict(checkpoint["opt"])
        assert bool(sra.ema.initted) == (save_at > 0)
        losses += [train_step(model, sra, opt, step) for step in range(save_at, STEPS)]
    return losses, {**model.state_dict(), **{f"sra.{k}": v for k, v in sra.state_dict().items() if k != "_extra_state"}}


@pytest.mark.parametrize("save_at", [0, 3])
@pytest.mark.parametrize("mode", ["shared", "full"])
def test_resume_is_bit_exact(mode, save_at, tmp_path):
    straight, final = run(mode, None, tmp_path)
    resumed, state = run(mode, save_at, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed)), (straight, resumed)
    assert final.keys() == state.keys()
    for key in final:
        assert final[key].dtype == state[key].dtype and torch.equal(final[key], state[key]), key
    if mode == "shared":
        assert any(k.startswith("sra.ema.ema.") for k in state) and not any(k.startswith("sra.ema.model.") for k in state)
    assert len({float(x) for x in straight}) == STEPS


def test_a_frozen_positional_table_keeps_the_teacher_module():
    """A small SiT at 32x32 latents: its fixed pos_embed is a few percent of the weights, which must not
    switch the owned EMA to the shared-weight (LoRA) mode: sra.teacher stays a module to sample from."""
    from tests._models import tiny_sit

    model = tiny_sit(input_size=32, depth=4, hidden_size=64)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    share = frozen / sum(p.numel() for p in model.parameters())
    assert 0.01 < share < 0.1, share  # the case that 0.2.0's first cut got wrong
    sra = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=2)
    assert not sra.ema.shared and isinstance(sra.teacher, torch.nn.Module)


def test_head_follows_the_trainable_dtype_of_a_bf16_base_with_float32_lora():
    from tests._models import tiny_sit

    model = tiny_sit().to(torch.bfloat16)
    model.requires_grad_(False)
    model.blocks[0].attn.qkv.float().requires_grad_(True)  # the only trainable weights, float32 (as LoRA)
    sra = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=2)
    assert all(p.dtype == torch.float32 for p in sra.head.parameters())
    model.requires_grad_(False)
    frozen = SelfRepresentationAlignment(tiny_sit().to(torch.bfloat16), student_layer=1, teacher_layer=2)
    assert all(p.dtype == torch.bfloat16 for p in frozen.head.parameters())  # everything trains in bf16: the model's dtype
