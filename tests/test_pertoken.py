"""Per-token time in one pass (Self-Flow style): ``SRADTS(separate=False)`` and the adapters'
``RunsPerTokenTime`` for the reference DiT/SiT, diffusers Wan and diffusers Flux.

Checked against a hand-written per-token SiT (its own sinusoid, layer norms and per-token modulation, written
here), the property that one time shared by all tokens gives the model's ordinary forward (SiT, DiT, Wan,
Flux with and without guidance), Flux's text tokens getting the mean of the image tokens' embedding, where
gradients go, that every swapped forward is restored (also when the pass raises), and misuse.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples.models import UViT
from sra_plugin import SRADTS, resolve_adapter
from sra_plugin.adapters import _pertoken
from sra_plugin.protocols import RunsPerTokenTime
from tests._models import tiny_dit, tiny_sit

B, T = 4, 16  # tiny SiT: 8x8 latents, patch 2 -> 16 tokens; groups of 4 and 12
LAYERS = dict(student_layer=2, teacher_layer=4)


def draw(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 4, 8, 8, generator=g)
    noise = torch.randn(B, 4, 8, 8, generator=g)
    y = torch.randint(0, 10, (B,), generator=g)
    groups = torch.ones(B, T, dtype=torch.long)
    groups.scatter_(1, torch.rand(B, T, generator=g).argsort(1)[:, :4], 0)
    t = torch.rand(B, 2, generator=g)
    s = (t - 0.2 * torch.rand(B, 2, generator=g)).clamp(0, 1)
    return x0, noise, y, groups, t, s


def swapped(model: nn.Module) -> list[str]:
    """Modules of ``model`` that carry a forward of their own on the instance."""
    return [name for name, module in model.named_modules() if "forward" in module.__dict__]


# ------------------------------------------------------------------------------------------ a hand-written per-token SiT
def hand_per_token(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The reference SiT with every token at its own time ``t`` ``(B, N)``: the time embedding token by token,
    every adaLN shift/scale/gate per token, full attention. Labels undropped (eval, or dropout 0)."""
    d = model.pos_embed.shape[-1]
    h = model.x_embedder(x) + model.pos_embed
    half = model.t_embedder.frequency_embedding_size // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    angles = t[..., None].float() * freqs  # (B, N, half)
    c = model.t_embedder.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))
    c = c + model.y_embedder.embedding_table(y)[:, None, :]
    norm = lambda v: F.layer_norm(v, (d,), eps=1e-6)  # noqa: E731
    taps = {}
    for number, block in enumerate(model.blocks, 1):
        lin = block.adaLN_modulation[1]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = lin(F.silu(c)).split(d, dim=-1)
        h = h + gate_a * block.attn(norm(h) * (1 + scale_a) + shift_a)
        h = h + gate_m * block.mlp(norm(h) * (1 + scale_m) + shift_m)
        taps[number] = h
    shift, scale = model.final_layer.adaLN_modulation[1](F.silu(c)).split(d, dim=-1)
    out = model.final_layer.linear(norm(h) * (1 + scale) + shift)
    return model.unpatchify(out), taps


def per_token_inputs(x0, noise, groups, times):
    """Each token's input at its group's time, built here from the patch grid (2x2 patches, 4x4 tokens)."""
    per_token = times.gather(1, groups)  # (B, T)
    grid = per_token.reshape(B, 1, 4, 4).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return (1 - grid) * x0 + grid * noise, per_token


@pytest.mark.parametrize("times", ["groups", "every-token"])
def test_per_token_pass_equals_a_hand_written_per_token_sit(times):
    model = tiny_sit(class_dropout_prob=0.0)
    nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    for layer in (model.t_embedder.mlp[0], model.t_embedder.mlp[2]):
        nn.init.normal_(layer.weight, std=0.3)  # time must matter, for the last check to mean something
    adapter = resolve_adapter(model)
    assert isinstance(adapter, RunsPerTokenTime)
    x0, noise, y, groups, t, _ = draw()
    if times == "every-token":  # a time of its own for every token (and one shared by samples 0 and 1)
        t = torch.rand(B, T, generator=torch.Generator().manual_seed(4))
        t[1, 3] = t[0, 3]
        groups = torch.arange(T).expand(B, T)
    x, per_token = per_token_inputs(x0, noise, groups, t)
    assert torch.equal(x, (1 - adapter.token_values(model, per_token, x0)) * x0 + adapter.token_values(model, per_token, x0) * noise)
    done = adapter.per_token_forward(model, x, per_token, (y,), {}, (2, 5), True)
    expected, taps = hand_per_token(model, x, per_token, y)
    torch.testing.assert_close(done.output, expected, rtol=1e-5, atol=1e-5)
    for k in (2, 5):
        torch.testing.assert_close(done.taps[k], taps[k], rtol=1e-5, atol=1e-5)
    # the per-token pass is not a per-sample one: a model at the samples' mean time differs
    mean_time = model(x, per_token.mean(1), y)
    assert (done.output - mean_time).abs().max() > 1e-3
    assert swapped(model) == []


def test_sradts_per_token_step_equals_the_hand_computation():
    model = tiny_sit(class_dropout_prob=0.0)
    nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    teacher_copy = copy.deepcopy(model).eval()  # the owned EMA starts as an exact copy
    dts = SRADTS(model, separate=False, **LAYERS)
    x0, noise, y, groups, t, s = draw()
    pred, align = dts(model, x0, noise, y, groups=groups, t=t, s=s)

    x_t, t_tok = per_token_inputs(x0, noise, groups, t)
    x_s, s_tok = per_token_inputs(x0, noise, groups, s)
    expected_pred, student = hand_per_token(model, x_t, t_tok, y)
    with torch.no_grad():
        _, teacher = hand_per_token(teacher_copy, x_s, s_tok, y)
    student_head = dts.head(student[2])
    expected_align = 0.5 * (1 - F.cosine_similarity(student_head, teacher[4])).mean()  # over tokens (dim=1)
    torch.testing.assert_close(pred, expected_pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(align, expected_align, rtol=1e-5, atol=1e-6)
    assert dts.separate is False and "separate=False" in repr(dts)
    assert swapped(model) == [] and swapped(dts.teacher) == []


# ------------------------------------------------------------------------------------------ one shared time = ordinary forward
def uniform(t: torch.Tensor, n: int) -> torch.Tensor:
    return t[:, None].expand(-1, n).contiguous()


@pytest.mark.parametrize("build", [tiny_sit, tiny_dit], ids=["sit", "dit"])
def test_one_time_for_all_tokens_is_the_ordinary_forward_dit_family(build):
    model = build().eval()
    nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    adapter = resolve_adapter(model)
    x0, noise, y, *_ = draw()
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    x = x0 + noise
    reference_taps = {}
    handle = model.blocks[2].register_forward_hook(lambda m, a, out: reference_taps.setdefault(3, out))
    reference = model(x, t, y)
    handle.remove()
    done = adapter.per_token_forward(model, x, uniform(t, T), (y,), {}, (3,), True)
    torch.testing.assert_close(done.output, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(done.taps[3], reference_taps[3], rtol=1e-5, atol=1e-6)


def diffusers_case(name: str, **overrides):
    pytest.importorskip("diffusers")
    from tests.test_diffusers_families import CASES, inputs

    case = CASES[name]
    case = copy.copy(case)
    case.config = {**case.config, **overrides}
    model = case.build().eval()
    x0, x_t, _, t, _, cond = inputs(case)
    return case, model, x0, x_t, t / case.t_scale, cond


@pytest.mark.parametrize("name,overrides,extra", [
    ("wan", {}, {}),
    ("flux", {}, {}),
    ("flux", {"guidance_embeds": True}, {"guidance": torch.tensor([3.5, 2.0])}),
    ("sd3", {}, {}),
    ("sd3", {"dual_attention_layers": (0,)}, {}),
], ids=["wan", "flux", "flux-guidance", "sd3", "sd3.5-dual-attention"])
def test_one_time_for_all_tokens_is_the_ordinary_forward_diffusers(name, overrides, extra):
    case, model, _, x, t, cond = diffusers_case(name, **overrides)
    cond = {**cond, **extra}
    adapter = resolve_adapter(model)
    assert adapter.per_token_support(model) is None
    n = adapter.num_tokens(model, x)
    assert n == case.n
    reference = model(**{adapter.x_key: x, adapter.t_key: t * case.t_scale}, **cond).sample
    done = adapter.per_token_forward(model, x, uniform(t, n), (), cond, (1, case.depth), True)
    torch.testing.assert_close(done.output, reference, rtol=1e-5, atol=1e-5)
    assert swapped(model) == []
    # per-token times change the prediction (the path is not a no-op), and tokens keep their layout
    varied = adapter.per_token_forward(model, x, torch.rand(x.shape[0], n), (), cond, (1,), True)
    assert varied.output.shape == reference.shape and (varied.output - reference).abs().max() > 1e-3
    assert done.taps[1].shape == (x.shape[0], n, adapter.dim(model, adapter.blocks(model)[0]))


def test_flux_text_tokens_get_the_mean_of_the_image_tokens_time_embedding():
    _, model, _, x, t, cond = diffusers_case("flux", guidance_embeds=True)
    pooled, guidance = cond["pooled_projections"], torch.tensor([3.5, 2.0]) * 1000
    times = torch.rand(x.shape[0], x.shape[1]) * 1000
    swaps = _pertoken._flux_swaps(model)
    state = swaps[0][1].args[2]
    with _pertoken.swapped_forwards(swaps):
        temb = model.time_text_embed(times, guidance, pooled)
    per_token = state.rows.gather(state.embedding)
    assert per_token.shape == (x.shape[0], x.shape[1], temb.shape[-1])
    for i in (0, 5, x.shape[1] - 1):  # token i's embedding is the ordinary embedding at token i's time
        torch.testing.assert_close(per_token[:, i], model.time_text_embed(times[:, i], guidance, pooled), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(temb, per_token.mean(dim=1))
    assert swapped(model) == []


@pytest.mark.parametrize("name,overrides", [("flux", {}), ("sd3", {}), ("sd3", {"dual_attention_layers": (0, 1)})],
                         ids=["flux", "sd3", "sd3.5-dual-attention"])
def test_per_token_modulation_against_one_pass_per_time(name, overrides):
    """Flux's and SD3's per-token modulation, checked through attention-free blocks: with every attention
    output replaced by zeros, an image token's output depends on its own input and time only, so the per-token
    pass must give each token what the ordinary forward at that token's time gives it; and the text tokens,
    in every block, what an ordinary forward gives them with the mean of the image tokens' embedding."""
    case, model, _, x, _, cond = diffusers_case(name, **overrides)
    adapter = resolve_adapter(model)

    def no_attention(module, args, kwargs, output):
        return tuple(torch.zeros_like(o) for o in output) if isinstance(output, tuple) else torch.zeros_like(output)

    blocks = [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]
    attentions = [getattr(b, a) for b in blocks for a in ("attn", "attn2") if getattr(b, a, None) is not None]
    assert len(attentions) == len(blocks) + (2 if overrides else 0)
    handles = [m.register_forward_hook(no_attention, with_kwargs=True) for m in attentions]
    texts: list[torch.Tensor] = []
    handles += [b.register_forward_hook(lambda m, a, out: texts.append(out[0])) for b in blocks]
    try:
        n = adapter.num_tokens(model, x)
        times = torch.where(torch.rand(x.shape[0], n) < 0.5, 0.3, 0.8)
        done = adapter.per_token_forward(model, x, times, (), cond, (1,), True).output
        per_token_texts, texts[:] = list(texts), []
        values = adapter.token_values(model, times, x).expand_as(done)
        for value in (0.3, 0.8):
            ordinary = model(hidden_states=x, timestep=torch.full((x.shape[0],), value * case.t_scale), **cond).sample
            mask = values == value
            torch.testing.assert_close(done[mask], ordinary[mask], rtol=1e-5, atol=1e-5)
        pooled = cond["pooled_projections"]
        mean = torch.stack([model.time_text_embed(times[:, i] * 1000, pooled) for i in range(n)], 1).mean(1)
        handles.append(model.time_text_embed.register_forward_hook(lambda m, a, out: mean))
        texts[:] = []
        model(hidden_states=x, timestep=times[:, 0], **cond)
        assert len(texts) == len(per_token_texts) == len(blocks)
        for got, expected in zip(per_token_texts, texts):
            if expected is None:  # SD3's last block returns no text
                assert got is None
                continue
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    finally:
        for handle in handles:
            handle.remove()


def test_wan_per_token_modulation_against_one_pass_per_time():
    """The same check on Wan's native per-token path (attention and cross-attention zeroed)."""
    _, model, _, x, _, cond = diffusers_case("wan")
    adapter = resolve_adapter(model)
    zero = lambda module, args, output: torch.zeros_like(output)  # noqa: E731
    handles = [m.register_forward_hook(zero) for b in model.blocks for m in (b.attn1, b.attn2)]
    try:
        n = adapter.num_tokens(model, x)
        times = torch.where(torch.rand(x.shape[0], n) < 0.5, 0.3, 0.8)
        done = adapter.per_token_forward(model, x, times, (), cond, (1,), True).output
        values = adapter.token_values(model, times, x).expand_as(done)
        for value in (0.3, 0.8):
            ordinary = model(hidden_states=x, timestep=torch.full((x.shape[0],), value * 1000), **cond).sample
            mask = values == value
            torch.testing.assert_close(done[mask], ordinary[mask], rtol=1e-5, atol=1e-5)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", ["wan", "flux", "sd3"])
def test_sradts_per_token_runs_on_diffusers(name):
    case, model, x0, _, _, cond = diffusers_case(name)
    model.train()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=g)
    dts = SRADTS(model, separate=False, student_layer=1, teacher_layer=2)
    pred, align = dts(model, x0, noise, generator=g, **cond)
    assert pred.shape == x0.shape and align.dim() == 0 and torch.isfinite(align)
    draw_ = dts.last_draw
    adapter = resolve_adapter(model)
    per_token = draw_["t"].gather(1, draw_["groups"])
    mix = adapter.token_values(model, per_token, x0)
    again = adapter.per_token_forward(model, (1 - mix) * x0 + mix * noise, per_token, (), cond, (1,), True)
    torch.testing.assert_close(pred, again.output)
    (((pred - (noise - x0)) ** 2).mean() + align).backward()
    assert all(p.grad is not None for p in dts.head.parameters())
    assert swapped(model) == []


# ------------------------------------------------------------------------------------------ gradients, restoring
def test_gradients_reach_student_and_head_never_teacher():
    model = tiny_sit(class_dropout_prob=0.0)
    nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    for teacher in ("ema", copy.deepcopy(model)):
        model.zero_grad(set_to_none=True)
        dts = SRADTS(model, teacher=teacher, separate=False, **LAYERS)
        x0, noise, y, groups, t, s = draw()
        pred, align = dts(model, x0, noise, y, groups=groups, t=t, s=s)
        align.backward(retain_graph=True)
        blocks = model.blocks
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for b in blocks[:2] for p in b.parameters())
        assert all(p.grad is None for b in blocks[2:] for p in b.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dts.head.parameters())
        assert dts.teacher is not model and all(p.grad is None for p in dts.teacher.parameters())
        model.zero_grad(set_to_none=True)
        ((pred - (noise - x0)) ** 2).mean().backward()
        assert all(p.grad is not None for b in blocks for p in b.parameters())
        assert all(p.grad is None for p in dts.teacher.parameters())


def test_forwards_are_restored_after_the_pass_and_on_an_exception():
    model = tiny_sit()
    own = lambda x, c: x  # noqa: E731  a forward some other tool set on the instance
    model.blocks[4].forward = own
    adapter = resolve_adapter(model)
    x0, noise, y, *_ = draw()
    times = torch.rand(B, T)

    def fail(module, args, output):
        assert swapped(model) != []  # the per-token forwards are in place during the pass
        raise RuntimeError("boom")

    handle = model.blocks[1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        adapter.per_token_forward(model, x0, times, (y,), {}, (3,), True)
    handle.remove()
    assert swapped(model) == ["blocks.4"] and model.blocks[4].forward is own
    adapter.per_token_forward(model, x0, times, (y,), {}, (3,), False)  # stopped early
    assert swapped(model) == ["blocks.4"] and model.blocks[4].forward is own
    del model.blocks[4].forward
    reference = model(x0, times[:, 0], y)
    assert reference.shape == x0.shape and swapped(model) == []


# ------------------------------------------------------------------------------------------ misuse
def test_unsupported_families_are_refused_by_name():
    uvit = UViT(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=5, num_heads=2, num_classes=10)
    with pytest.raises(TypeError, match=r"UViT \(adapter 'uvit'\) cannot run SRADTS\(separate=False\).*RunsPerTokenTime"):
        SRADTS(uvit, separate=False)
    pytest.importorskip("diffusers")
    from tests.test_diffusers_families import CASES

    pixart = CASES["pixart"].build()
    with pytest.raises(ValueError, match=r"PixArtTransformer2DModel \(adapter 'diffusers-pixart'\) cannot run SRADTS\(separate=False\): "
                                         r"per-token time in one pass is not available for the PixArtTransformer2DModel family"):
        SRADTS(pixart, separate=False)

    class RotaryBlock(nn.Module):
        def __init__(self):
            super().__init__()
            for name in ("adaLN_modulation", "norm1", "attn", "norm2", "mlp"):
                setattr(self, name, nn.Identity())

        def forward(self, x, c, feat_rope=None):
            return x

    rotary = tiny_sit()
    rotary.blocks = nn.ModuleList([RotaryBlock() for _ in range(6)])
    with pytest.raises(ValueError, match=r"SiT \(adapter 'dit'\) cannot run SRADTS\(separate=False\): its block 1 .*feat_rope"):
        SRADTS(rotary, separate=False)
    plain = tiny_sit()
    del plain.blocks[0].adaLN_modulation
    with pytest.raises(ValueError, match="its block 1 .* has no adaLN_modulation"):
        SRADTS(plain, separate=False)


def test_bad_input_is_refused_with_the_argument_named():
    model = tiny_sit()
    with pytest.raises(TypeError, match=r"separate=1 is not accepted"):
        SRADTS(model, separate=1)
    dts = SRADTS(model, separate=False, **LAYERS)
    x0, noise, y, groups, t, s = draw()
    with pytest.raises(TypeError, match="conditioning .* is not accepted for a DiT/SiT"):
        dts(model, x0, noise, y, y)
    with pytest.raises(ValueError, match=r"x0 of shape \(4, 4, 6, 6\)"):
        dts(model, x0[..., :6, :6], noise[..., :6, :6], y)
    with pytest.raises(ValueError, match=r"t\[0, 1\]=1.5 is not accepted"):
        dts(model, x0, noise, y, t=torch.tensor([[0.5, 1.5]] * B))
    adapter = resolve_adapter(model)
    with pytest.raises(ValueError, match=r"times of shape \(4, 15\) \(torch.float32\) is not accepted for SiT: .* \(4, 16\)"):
        adapter.per_token_forward(model, x0, torch.rand(B, 15), (y,), {}, (1,), True)
    with pytest.raises(ValueError, match=r"times of shape \(4, 16\) \(torch.int64\) is not accepted"):
        adapter.per_token_forward(model, x0, torch.ones(B, T, dtype=torch.long), (y,), {}, (1,), True)
    with pytest.raises(ValueError, match=r"taps=\[7\] is not accepted: SiT has blocks 1..6"):
        adapter.per_token_forward(model, x0, torch.rand(B, T), (y,), {}, (7,), True)
    with pytest.raises(ValueError, match="groups.* has 5 zeros"):
        bad = groups.clone()
        bad[0, (bad[0] == 1).nonzero()[0]] = 0
        dts(model, x0, noise, y, groups=bad)
    assert swapped(model) == []


def test_flux_reference_image_tokens_are_refused():
    _, model, x0, _, _, cond = diffusers_case("flux")
    reference = cond["img_ids"].clone()
    reference[:, 0] = 1  # Kontext marks reference-image rows with a first coordinate of 1
    cond = {**cond, "img_ids": torch.cat([cond["img_ids"], reference])}
    x = torch.cat([x0, x0], dim=1)
    adapter = resolve_adapter(model)
    with pytest.raises(ValueError, match="32 tokens of which 16 are the generated image's"):
        adapter.per_token_forward(model, x, torch.rand(x.shape[0], 32), (), cond, (1,), True)


def test_state_of_the_other_mode_is_refused():
    model = tiny_sit()
    separate = SRADTS(model, **LAYERS).state_dict()
    per_token = SRADTS(model, separate=False, **LAYERS)
    with pytest.raises(ValueError, match="separate: saved True, here False"):
        per_token.load_state_dict(separate)
    per_token.load_state_dict(SRADTS(model, separate=False, **LAYERS).state_dict())


@pytest.mark.parametrize("name", ["flux", "wan", "sd3"])
def test_gradient_checkpointing_recomputes_the_per_token_pass(name):
    """diffusers' gradient checkpointing recomputes each block during backward, after the pass restored the
    blocks' own forwards: the gradients must still be the per-token pass's."""
    _, model, _, x, _, cond = diffusers_case(name)
    model.train()
    adapter = resolve_adapter(model)
    n = adapter.num_tokens(model, x)
    times = torch.rand(x.shape[0], n, generator=torch.Generator().manual_seed(5))

    def grads():
        model.zero_grad(set_to_none=True)
        done = adapter.per_token_forward(model, x, times, (), cond, (1,), True)
        ((done.output ** 2).mean() + done.taps[1].square().mean()).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    functions = {name: m._gradient_checkpointing_func for name, m in model.named_modules() if "_gradient_checkpointing_func" in m.__dict__}
    checkpointed = grads()
    assert model.gradient_checkpointing and swapped(model) == []
    assert {name: m._gradient_checkpointing_func for name, m in model.named_modules() if name in functions} == functions  # restored
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


def test_ddp_must_wrap_the_bare_model(tmp_path):
    """Single process: DDP(model) is accepted with separate=False (the 2-process check is test_pertoken_ddp.py);
    a DDP around another wrapper, whose forward the per-token forwards might not reach, is refused."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = tiny_sit()
        wrapped = DistributedDataParallel(model)
        dts = SRADTS(wrapped, separate=False, **LAYERS)
        x0, noise, y, *_ = draw()
        pred, align = dts(wrapped, x0, noise, y)
        assert pred.shape == x0.shape and torch.isfinite(align)
        with pytest.raises(ValueError, match=r"DistributedDataParallel\(OptimizedModule\) is not accepted .* wrap the bare SiT"):
            dts(DistributedDataParallel(torch.compile(model)), x0, noise, y)
        with pytest.raises(ValueError, match="DistributedDataParallel is not supported by SRADTS.*separate=False"):
            SRADTS(wrapped, **LAYERS)
    finally:
        dist.destroy_process_group()


def test_remove_and_context_manager():
    model = tiny_sit()
    with SRADTS(model, separate=False, **LAYERS) as dts:
        x0, noise, y, *_ = draw()
        dts(model, x0, noise, y)
    dts.remove()  # twice is fine
    assert swapped(model) == []


@pytest.mark.parametrize("kind", ["owned", "user", "lora"])
def test_teacher_kinds_train_and_use_the_teacher_weights(kind):
    """After a few steps the alignment is the hand computation with the teacher's weights, for every teacher kind
    (a LoRA model's teacher is an EMA of the adapters on the shared base)."""
    from tests.test_sradts import teacher_kind_case, train_teacher_kind

    model, inner, user = teacher_kind_case(kind)
    dts = SRADTS(model, teacher=user if user is not None else "ema", ema_decay=0.5, separate=False, **LAYERS)
    assert kind == "user" or dts.ema.shared == (kind == "lora")
    train_teacher_kind(dts, model, inner, user, kind, draw)
    x0, noise, y, groups, t, s = draw(9)
    x_t, t_tok = per_token_inputs(x0, noise, groups, t)
    x_s, s_tok = per_token_inputs(x0, noise, groups, s)
    with torch.no_grad():
        _, align = dts(model, x0, noise, y, groups=groups, t=t, s=s)
        student = dts.head(hand_per_token(inner, x_t, t_tok, y)[1][2])
        with dts.teacher_weights() as m:
            m.eval()
            target = hand_per_token(m, x_s, s_tok, y)[1][4]
            m.train()
        with_student_weights = hand_per_token(inner, x_s, s_tok, y)[1][4]
    expected = 0.5 * (1 - F.cosine_similarity(student, target, dim=1)).mean()
    wrong = 0.5 * (1 - F.cosine_similarity(student, with_student_weights, dim=1)).mean()
    assert (align - expected).abs() < 1e-6
    assert (align - wrong).abs() > 1e-5  # the teacher differs from the student by now
    assert swapped(inner) == []


def test_teacher_labels_student_hands_the_dropped_labels_on():
    model = tiny_sit(class_dropout_prob=0.5)
    adapter = resolve_adapter(model)
    x0, noise, y, *_ = draw()
    y = torch.arange(8) % 10
    x0, noise = torch.cat([x0, x0]), torch.cat([noise, noise])
    torch.manual_seed(0)
    done = adapter.per_token_forward(model.train(), x0, torch.rand(8, T), (y,), {}, (1,), True)
    (used,) = done.args
    assert bool((used == 10).any()) and bool((used != 10).any())  # some dropped to the null id, some kept
    assert torch.equal(used[used != 10], y[used != 10])


def test_resume_continues_identically():
    from tests.test_sradts import train

    def fresh():
        model = tiny_sit(class_dropout_prob=0.0)
        dts = SRADTS(model, ema_decay=0.9, separate=False, **LAYERS)
        return model, dts, torch.optim.AdamW([*model.parameters(), *dts.head.parameters()], lr=1e-3)

    model, dts, opt = fresh()
    train(model, dts, opt, 2, 0)
    saved = copy.deepcopy({"model": model.state_dict(), "dts": dts.state_dict(), "opt": opt.state_dict()})
    reference = train(model, dts, opt, 2, 2)
    model2, dts2, opt2 = fresh()
    model2.load_state_dict(saved["model"])
    dts2.load_state_dict(saved["dts"])
    opt2.load_state_dict(saved["opt"])
    assert train(model2, dts2, opt2, 2, 2) == reference
    model3, dts3, opt3 = fresh()  # without the objective's state (EMA, head) the continuation differs
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    assert train(model3, dts3, opt3, 2, 2) != reference


def test_composes_with_an_objective_that_captures_the_training_forward():
    """LayerSync on the same model taps the user's forward; the per-token passes must not feed its capture."""
    from sra_plugin import LayerSync

    model = tiny_sit(class_dropout_prob=0.0)
    layersync = LayerSync(model, student_layer=2, target_layer=4)
    dts = SRADTS(model, separate=False, **LAYERS)
    x0, noise, y, groups, t, s = draw()
    x_t = 0.5 * x0 + 0.5 * noise
    tt = torch.full((B,), 0.5)
    pred = model(x_t, tt, y)
    _, align = dts(model, x0, noise, y, groups=groups, t=t, s=s)
    sync = layersync(model, x_t, tt, y)
    assert layersync.student_reruns == 0  # it used the user's forward, not one of the per-token passes
    alone = LayerSync(tiny_sit(class_dropout_prob=0.0), student_layer=2, target_layer=4)
    with pytest.warns(RuntimeWarning, match="found no student features"):  # it reruns its student: expected
        expected = alone(alone._student, x_t, tt, y)
    torch.testing.assert_close(sync, expected)
    (pred.square().mean() + align + sync).backward()
    assert swapped(model) == []


def test_sd3_feed_forward_chunking_gives_the_same_pass():
    _, model, _, x, _, cond = diffusers_case("sd3")
    adapter = resolve_adapter(model)
    times = torch.rand(x.shape[0], adapter.num_tokens(model, x), generator=torch.Generator().manual_seed(2))
    plain = adapter.per_token_forward(model, x, times, (), cond, (1,), True).output
    model.enable_forward_chunking(chunk_size=1, dim=1)  # token by token (the 5 text tokens allow no other size)
    assert model.transformer_blocks[0]._chunk_size == 1
    chunked = adapter.per_token_forward(model, x, times, (), cond, (1,), True).output
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)


def test_diffusers_bad_times_and_inputs_are_refused():
    _, wan, _, x, _, cond = diffusers_case("wan")
    adapter = resolve_adapter(wan)
    with pytest.raises(ValueError, match=r"times of shape \(2, 16\) .* not accepted for WanTransformer3DModel: .* \(2, 32\)"):
        adapter.per_token_forward(wan, x, torch.rand(2, 16), (), cond, (1,), True)
    with pytest.raises(ValueError, match=r"x0 of shape \(2, 4, 8, 8\) is not accepted by WanTransformer3DModel: use \(B, C, F, H, W\)"):
        adapter.num_tokens(wan, x[:, :, 0])
    with pytest.raises(ValueError, match=r"x0 of shape \(2, 4, 2, 7, 8\) .* multiples of the patch \(1, 2, 2\)"):
        adapter.num_tokens(wan, x[..., :7, :])
    _, flux, _, packed, _, cond = diffusers_case("flux")
    with pytest.raises(ValueError, match=r"x0 of shape \(2, 4, 4, 4\) is not accepted by FluxTransformer2DModel: use packed tokens"):
        resolve_adapter(flux).num_tokens(flux, packed.reshape(2, 4, 4, 4))
