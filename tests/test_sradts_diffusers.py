"""SRADTS on the diffusers families (``sra_plugin.adapters.diffusers``, ``RunsTokenGroups``): Flux, SD3, SD3.5,
QwenImage, Wan, PixArt, DiT, on the tiny random models of ``tests/test_diffusers_families.py``.

What a group pass must be: the family's ordinary forward run on an input that holds only the group's
tokens. Checked where such an input can be built: one group of every token (in a shuffled order) gives the
model's own output and block tokens; a group that is a crop the model's positions agree on (Flux: any
tokens with their ``img_ids`` rows; SD3 and QwenImage: the central crop, whose positions are centred;
Wan: a top-left crop of every frame) gives the forward on that crop. PixArt's and DiT's sin-cos tables are
rescaled to the grid, so no crop keeps its positions: they have the whole-image check only. Then: samples of one batch
keep groups of their own, a full SRADTS step trains what it should, and the other families are refused by
name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields, replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sra_plugin import SRADTS, resolve_adapter
from sra_plugin.registry import ModelCall
from tests.test_diffusers_families import CASES, B, Case, inputs

FAMILIES: dict[str, Case] = {name: CASES[name] for name in ("flux", "sd3", "qwenimage", "wan", "pixart")}
FAMILIES["sd35"] = replace(CASES["sd3"], config={**CASES["sd3"].config, "dual_attention_layers": (0, 1), "qk_norm": "rms_norm"})


@dataclass
class UndroppedDiT(Case):
    """diffusers DiT with its in-block label dropout off (SRADTS refuses it on: each block draws its own)."""

    def build(self) -> nn.Module:
        model = super().build()
        for block in model.transformer_blocks:
            block.norm1.emb.class_embedder.dropout_prob = 0.0
        return model


FAMILIES["dit"] = UndroppedDiT(**{f.name: getattr(CASES["dit"], f.name) for f in fields(Case)})
ATOL = 2e-5  # float32, values of order 1


def noisy(case: Case, seed: int = 1):
    """The model input, its time in [0, 1] (1 = noise) per sample, the conditioning."""
    _, x_t, _, t, _, cond = inputs(case, seed)
    return x_t, t / case.t_scale, cond


def forward(case: Case, model: nn.Module, x: torch.Tensor, t01: torch.Tensor, cond: dict, layers=()) -> tuple[torch.Tensor, dict]:
    """The model's ordinary forward at time ``t01``: its output and the image tokens of ``layers`` (1-based)."""
    adapter = resolve_adapter(model)
    blocks = adapter.blocks(model)
    call = {adapter.x_key: x, adapter.t_key: t01 * case.t_scale, **cond}
    kept: dict[int, Any] = {}

    def keep(k: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            kept.setdefault(k, output)
        return hook

    handles = [blocks[k - 1].register_forward_hook(keep(k)) for k in layers]
    try:
        with torch.no_grad():
            out = case.sample(model(**call))
    finally:
        for h in handles:
            h.remove()
    return out, {k: adapter.tokens(kept[k], model, ModelCall((), call)) for k in layers}


def in_order(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A pass's tokens ``(B, N, X)``, held in the order ``index`` (a permutation per sample), in token order."""
    return tokens.gather(1, index.argsort(1)[..., None].expand(-1, -1, tokens.shape[-1]))


def permutations(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(tokens, generator=g) for _ in range(n)])


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_one_group_of_every_token_is_the_models_forward(name):
    """All tokens, shuffled differently per sample, one time: outputs (through ``unpatchify``) and block tokens
    equal the ordinary forward's, so the gather, the positions and the order restored all agree."""
    case = FAMILIES[name]
    model = case.build().eval()
    adapter = resolve_adapter(model)
    x, t, cond = noisy(case)
    depth = len(adapter.blocks(model))
    index = permutations(B, adapter.num_tokens(model, x))
    with torch.no_grad():
        passes = adapter.group_forward(model, [x], [t], [index], (), cond, (1, depth), True)
    pred = adapter.unpatchify(model, in_order(passes.outputs[0], index), x)
    out, tokens = forward(case, model, x, t, cond, (1, depth))
    assert gap(pred, out) < ATOL
    for k in (1, depth):
        assert gap(in_order(passes.taps[k][0], index), tokens[k]) < ATOL, f"block {k}"
    # the shuffle is real: the tokens in the pass's own order are not the forward's
    assert gap(passes.outputs[0], adapter.patchify(model, out) if adapter.layout != "packed" else out) > 1e-2


def crop(name: str, case: Case, x: torch.Tensor, cond: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A group the family's positions agree on: its token index ``(B, n)`` and the model input (and
    conditioning) holding only those tokens."""
    if name in ("sd3", "sd35", "qwenimage"):  # centred positions: rows and columns 1..2 of the 4x4 grid
        index = torch.tensor([5, 6, 9, 10]).expand(B, -1)
        if name == "qwenimage":
            return index, x[:, index[0]], {**cond, "img_shapes": [[(1, 2, 2)]] * B}
        return index, x[..., 2:6, 2:6], cond
    if name == "wan":  # rows and columns 0..1 of both frames (2 x 4 x 4 tokens)
        index = torch.tensor([f * 16 + r * 4 + c for f in range(2) for r in range(2) for c in range(2)]).expand(B, -1)
        return index, x[..., :4, :4], cond
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["sd3", "sd35", "qwenimage", "wan"])
def test_a_crop_group_is_the_forward_on_the_crop(name):
    case = FAMILIES[name]
    model = case.build().eval()
    adapter = resolve_adapter(model)
    x, t, cond = noisy(case)
    index, part, part_cond = crop(name, case, x, cond)
    depth = len(adapter.blocks(model))
    with torch.no_grad():
        passes = adapter.group_forward(model, [x], [t], [index], (), cond, (1, depth), True)
    handle = None
    if name == "qwenimage":
        # QwenImage places the text's rotary positions after the image's extent (max(h, w) / 2): a crop moves
        # them, a group pass (a part of the whole image) keeps the image's. The crop's forward gets the whole
        # image's text positions here, so that only the image tokens' positions are compared.
        with torch.no_grad():
            text_positions = model.pos_embed(cond["img_shapes"], max_txt_seq_len=cond["encoder_hidden_states"].shape[1],
                                             device=x.device)[1]
        handle = model.pos_embed.register_forward_hook(lambda m, a, o: (o[0], text_positions))
    try:
        out, tokens = forward(case, model, part, t, part_cond, (1, depth))
    finally:
        if handle is not None:
            handle.remove()
    expected = out if adapter.layout == "packed" else adapter.patchify(model, out)
    assert gap(passes.outputs[0], expected) < ATOL
    for k in (1, depth):
        assert gap(passes.taps[k][0], tokens[k]) < ATOL, f"block {k}"
    # the crop's own positions matter: the same tokens placed at the image's corner give another output
    if name != "wan":
        corner = torch.tensor([0, 1, 4, 5]).expand(B, -1)
        with torch.no_grad():
            moved = adapter.group_forward(model, [x], [t], [corner], (), cond, (depth,), True)
        assert gap(moved.outputs[0], expected) > 1e-3


def test_flux_group_is_the_forward_on_its_tokens_and_their_ids():
    """Flux: any tokens, with their ``img_ids`` rows, each sample its own, equal the forward on only those."""
    case = FAMILIES["flux"]
    model = case.build().eval()
    adapter = resolve_adapter(model)
    x, t, cond = noisy(case)
    index = permutations(B, 16, seed=3)[:, :6]
    assert not torch.equal(index[0], index[1])
    with torch.no_grad():
        passes = adapter.group_forward(model, [x], [t], [index], (), cond, (1, 4), True)
    for b in range(B):
        rows = index[b]
        alone = {**cond, "encoder_hidden_states": cond["encoder_hidden_states"][b:b + 1],
                 "pooled_projections": cond["pooled_projections"][b:b + 1], "img_ids": cond["img_ids"][rows]}
        out, tokens = forward(case, model, x[b:b + 1, rows], t[b:b + 1], alone, (1, 4))
        assert gap(passes.outputs[0][b:b + 1], out) < ATOL
        assert gap(passes.taps[1][0][b:b + 1], tokens[1]) < ATOL and gap(passes.taps[4][0][b:b + 1], tokens[4]) < ATOL


def sample_of(cond: dict, b: int) -> dict:
    """Sample ``b``'s conditioning (per-sample tensors and lists sliced; position ids, shared, kept)."""
    out = {}
    for key, value in cond.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == B and not key.endswith("_ids"):
            out[key] = value[b:b + 1]
        elif isinstance(value, list) and len(value) == B:
            out[key] = value[b:b + 1]
        else:
            out[key] = value
    return out


GUIDED_FLUX = replace(CASES["flux"], config={**CASES["flux"].config, "guidance_embeds": True},
                      cond=lambda g: {**CASES["flux"].cond(g), "guidance": torch.tensor([3.5, 5.0])})


@pytest.mark.parametrize("name", [*FAMILIES, "flux-guidance"])
def test_samples_keep_groups_of_their_own(name):
    """Two groups, each sample of the batch with its own tokens in them: the batch's passes equal each
    sample's passes run alone (per-sample gather of tokens and rotary positions; for Flux and QwenImage,
    whose positions are one set for the batch, the per-sample conditioning sliced, guidance too)."""
    case = GUIDED_FLUX if name == "flux-guidance" else FAMILIES[name]
    model = case.build().eval()
    adapter = resolve_adapter(model)
    x, t, cond = noisy(case)
    tokens = adapter.num_tokens(model, x)
    ranked = permutations(B, tokens, seed=5)
    index = [ranked[:, : tokens // 4].sort(1).values, ranked[:, tokens // 4:].sort(1).values]
    times = [t, 1 - t]
    with torch.no_grad():
        together = adapter.group_forward(model, [x, x.flip(0)], times, index, (), cond, (1,), True)
        for b in range(B):
            alone = adapter.group_forward(model, [x[b:b + 1], x.flip(0)[b:b + 1]], [tm[b:b + 1] for tm in times],
                                          [i[b:b + 1] for i in index], (), sample_of(cond, b), (1,), True)
            for g in range(2):
                assert gap(together.outputs[g][b:b + 1], alone.outputs[g]) < ATOL, (b, g)
                assert gap(together.taps[1][g][b:b + 1], alone.taps[1][g]) < ATOL, (b, g)


def has_grad(module: nn.Module) -> bool:
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sradts_step(name):
    """One SRADTS step: the prediction in the model's output layout, a finite alignment term, the teacher
    stopped after its block, gradients to the model and head and never to the teacher; then an optimizer
    step and an EMA update."""
    case = FAMILIES[name]
    model = case.build().train()
    adapter = resolve_adapter(model)
    depth = len(adapter.blocks(model))
    teacher_layer = depth - 1
    dts = SRADTS(model, student_layer=1, teacher_layer=teacher_layer, ema_decay=0.5)
    x0, _, _, t, _, cond = inputs(case)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    out, _ = forward(case, model, x0, t / case.t_scale, cond)

    calls = [0] * depth
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1) and None)
               for i, b in enumerate(adapter.blocks(dts.teacher))]
    pred, align = dts(model, x0, noise, generator=torch.Generator().manual_seed(0), **cond)
    for h in handles:
        h.remove()
    assert pred.shape == out.shape
    assert align.shape == () and bool(torch.isfinite(align)) and align.item() > 0
    assert calls[teacher_layer:] == [0] * (depth - teacher_layer) and min(calls[:teacher_layer]) >= 2

    opt = torch.optim.SGD([*model.parameters(), *dts.head.parameters()], lr=1e-3)
    align.backward(retain_graph=True)
    blocks = adapter.blocks(model)
    assert has_grad(dts.head) and has_grad(blocks[0])
    assert not any(has_grad(b) for b in blocks[1:])  # the alignment reaches the student's block 1 only
    opt.zero_grad()
    (F.mse_loss(pred, noise - x0) + align).backward()
    assert all(has_grad(b) for b in blocks) and has_grad(dts.head)
    assert all(p.grad is None for p in dts.teacher.parameters())
    before = copy.deepcopy(dts.teacher.state_dict())
    opt.step()
    dts.update_teacher()
    assert any(not torch.equal(before[k], v) for k, v in dts.teacher.state_dict().items())


# ------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name, why", [
    ("flux2", "Flux2 is not Flux"), ("chroma", "Chroma is not Flux"), ("skyreels-v2", "SkyReelsV2 is not Wan"),
    ("hunyuanvideo", "not written"), ("auraflow", "not written"),
])
def test_other_diffusers_families_are_refused_by_name(name, why):
    model = CASES[name].build()
    cls, adapter = CASES[name].cls, CASES[name].adapter
    with pytest.raises(ValueError, match=rf"model={cls} \(adapter '{adapter}'\) cannot run SRADTS\(separate=True\): .*{why}"):
        SRADTS(model, student_layer=1, teacher_layer=2)


def test_models_whose_passes_are_not_defined_are_refused():
    wan = FAMILIES["wan"]
    i2v = replace(wan, config={**wan.config, "in_channels": 8}).build()
    with pytest.raises(ValueError, match=r"WanTransformer3DModel .*in_channels=8 but out_channels=4.*image-to-video"):
        SRADTS(i2v, student_layer=1, teacher_layer=2)
    qwen = FAMILIES["qwenimage"]
    edit = replace(qwen, config={**qwen.config, "zero_cond_t": True}).build()
    with pytest.raises(ValueError, match=r"QwenImageTransformer2DModel .*zero_cond_t=True"):
        SRADTS(edit, student_layer=1, teacher_layer=2)
    with pytest.raises(ValueError, match=r"DiTTransformer2DModel .*blocks \[0, 1\] drop class labels.*dropout_prob = 0.0"):
        SRADTS(CASES["dit"].build(), student_layer=1, teacher_layer=2)


def test_calls_a_group_pass_cannot_take_are_refused():
    def step(name, x0=None, **change):
        case = FAMILIES[name]
        model = case.build()
        dts = SRADTS(model, student_layer=1, teacher_layer=2)
        x, _, cond = noisy(case)
        x0 = x if x0 is None else x0
        cond = {k: v for k, v in {**cond, **change}.items() if v is not ...}
        return dts(model, x0, torch.randn_like(x0), **cond)

    with pytest.raises(TypeError, match=r"img_ids=NoneType is not accepted"):
        step("flux", img_ids=...)
    reference = CASES["flux"].cond(torch.Generator())["img_ids"].clone()
    reference[8:, 0] = 1  # the last 8 tokens: a reference image's (Kontext)
    with pytest.raises(ValueError, match=r"img_ids marks some of the 16 tokens .*reference"):
        step("flux", img_ids=reference)
    with pytest.raises(ValueError, match=r"controlnet_block_samples= is not accepted by SRADTS on FluxTransformer2DModel"):
        step("flux", controlnet_block_samples=[torch.zeros(B, 16, 32)])
    with pytest.raises(ValueError, match=r"img_shapes entry \[\(1, 4, 4\), \(1, 4, 4\)\] is not accepted"):
        step("qwenimage", img_shapes=[[(1, 4, 4), (1, 4, 4)]] * B)
    with pytest.raises(ValueError, match=r"attention_mask= is not accepted by SRADTS on PixArtTransformer2DModel"):
        step("pixart", attention_mask=torch.ones(B, 16))
    with pytest.raises(ValueError, match=r"skip_layers= is not accepted by SRADTS on SD3Transformer2DModel"):
        step("sd3", skip_layers=[0])
    with pytest.raises(TypeError, match=r"hidden_states= was passed"):
        step("sd3", hidden_states=torch.zeros(1))
    with pytest.raises(ValueError, match=r"x0 of shape \(2, 4, 7, 8\) is not accepted by SD3Transformer2DModel"):
        step("sd3", x0=torch.randn(B, 4, 7, 8))
    with pytest.raises(ValueError, match=r"x0 of shape \(2, 16, 3\) is not accepted by FluxTransformer2DModel: use packed tokens \(B, N, 4\)"):
        step("flux", x0=torch.randn(B, 16, 3))
    model = FAMILIES["sd3"].build()
    dts = SRADTS(model, student_layer=1, teacher_layer=2)
    x, _, cond = noisy(FAMILIES["sd3"])
    with pytest.raises(TypeError, match=r"SD3Transformer2DModel takes its conditioning by keyword"):
        dts(model, x, torch.randn_like(x), cond["encoder_hidden_states"])


# ------------------------------------------------------------------------------- teacher kinds, checkpointing
def one_step(name: str, model: nn.Module, dts: SRADTS):
    case = FAMILIES[name]
    x0, _, _, _, _, cond = inputs(case)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    pred, align = dts(model, x0, noise, generator=torch.Generator().manual_seed(0), **cond)
    (F.mse_loss(pred, noise - x0) + align).backward()
    return pred.detach(), align.detach()


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_user_and_lora_teachers(name):
    """The user's EMA module, and LoRA on the diffusers model (the owned EMA of the LoRA weights on the
    shared base): the step runs, the gradients reach the trainable weights only, the teacher takes none."""
    peft = pytest.importorskip("peft")
    case = FAMILIES[name]
    model = case.build().train()
    user = copy.deepcopy(model)
    dts = SRADTS(model, student_layer=1, teacher_layer=2, teacher=user)
    _, align = one_step(name, model, dts)
    assert torch.isfinite(align) and all(p.grad is None for p in user.parameters())

    model = case.build().train()
    model.requires_grad_(False)
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"]))
    dts = SRADTS(model, student_layer=1, teacher_layer=2, ema_decay=0.5)
    assert dts.ema.shared
    _, align = one_step(name, model, dts)
    trained = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert trained and all("lora" in n for n in trained)
    assert torch.isfinite(align) and align.item() > 0


@pytest.mark.parametrize("name", ["sd3", "wan", "flux"])
def test_gradient_checkpointing_gives_the_same_step(name):
    """diffusers' (non-reentrant) gradient checkpointing around the blocks: same prediction, alignment and
    gradients as without (the gathered tokens and positions enter the checkpointed blocks as their inputs)."""
    results = []
    for checkpointing in (False, True):
        model = FAMILIES[name].build().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        dts = SRADTS(model, student_layer=1, teacher_layer=2)
        pred, align = one_step(name, model, dts)
        results.append((pred, align, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (p0, a0, g0), (p1, a1, g1) = results
    assert gap(p0, p1) < 1e-6 and abs(a0.item() - a1.item()) < 1e-6
    assert g0.keys() == g1.keys() and len(g0) > 0
    assert max(gap(g0[k], g1[k]) for k in g0) < 1e-5


def test_flux_step_equals_the_step_by_hand():
    """The whole SRADTS step on Flux, recomputed with nothing of the adapter: for every sample and group, the
    model's ordinary forward on that group's tokens only (with their ``img_ids`` rows) at the group's time, the
    prediction put back in token order; the teacher (the user's EMA, other weights) likewise at ``s``; the
    alignment ``0.5 * mean(1 - cos)`` over the token axis of the head's output and the teacher's tokens."""
    case = FAMILIES["flux"]
    model = case.build().train()
    teacher = case.build()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    dts = SRADTS(model, student_layer=2, teacher_layer=3, teacher=teacher)
    x0, _, _, _, _, cond = inputs(case)
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(x0.shape, generator=g)
    groups = torch.ones(B, 16, dtype=torch.long).scatter(1, torch.rand(B, 16, generator=g).argsort(1)[:, :4], 0)
    t = torch.rand(B, 2, generator=g)
    s = (t - 0.2 * torch.rand(B, 2, generator=g)).clamp(0, 1)
    pred, align = dts(model, x0, noise, groups=groups, t=t, s=s, **cond)

    def by_hand(module, times, layer):
        out = torch.zeros(B, 16, 4)
        tokens = torch.zeros(B, 16, 32)
        for b in range(B):
            for group in range(2):
                rows = (groups[b] == group).nonzero().squeeze(1)
                time = times[b, group:group + 1]
                x = ((1 - time) * x0[b:b + 1] + time * noise[b:b + 1])[:, rows]
                alone = {**cond, "encoder_hidden_states": cond["encoder_hidden_states"][b:b + 1],
                         "pooled_projections": cond["pooled_projections"][b:b + 1], "img_ids": cond["img_ids"][rows]}
                o, k = forward(case, module, x, time, alone, (layer,))
                out[b, rows], tokens[b, rows] = o[0], k[layer][0]
        return out, tokens

    expected_pred, student = by_hand(model, t, 2)
    _, target = by_hand(teacher.eval(), s, 3)
    with torch.no_grad():
        expected_align = 0.5 * (1 - F.cosine_similarity(dts.head(student), target, dim=1)).mean()
    assert gap(pred.detach(), expected_pred) < ATOL
    assert abs(align.item() - expected_align.item()) < 1e-6 and align.item() > 1e-3
