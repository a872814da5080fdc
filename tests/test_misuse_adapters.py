"""No silent misuse, adapter side (issue 19, points 3 and 4 and the bare-conv crash).

- ``LatentAlignment`` on models whose input stacks conditioning channels onto the noisy latent (Wan /
  CogVideoX / HunyuanVideo image-to-video, Flux Fill, any in != out channels): the target is the clean
  latent of the channels the model predicts, checked against the model's own unpatchify.
- Edit models that append reference-image tokens after the generated image's (Flux Kontext, Flux2,
  QwenImage-Edit): SRA's tokens and SRA 2's target are the generated image's tokens only; a layout the
  adapter cannot tell is a ValueError.
- A DiT-like model whose patch embedder is a bare ``nn.Conv2d`` (kernel == stride).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples.models.dit import DiT, FinalLayer
from sra_plugin import LatentAlignment, SelfRepresentationAlignment, resolve_adapter
from sra_plugin.registry import ModelCall
from tests._models import TINY, randomise_gates
from tests.test_diffusers_families import CASES, B, G, call, ids, submodule

# ------------------------------------------------------------------ 3. in != out channels
# (family, input channels, predicted channels): a tiny image-to-video / fill variant of each family.
STACKED = {
    "wan-i2v": ("wan", 12, 4),            # Wan I2V: in 36 = 16 noisy + 20 image/mask, out 16
    "skyreels-v2-i2v": ("skyreels-v2", 12, 4),
    "cogvideox-i2v": ("cogvideox", 8, 4),  # CogVideoX I2V: in 32, out 16, channels on axis 2
    "hunyuanvideo-i2v": ("hunyuanvideo", 9, 4),  # HunyuanVideo I2V: in 33, out 16
    "flux-fill": ("flux", 12, 4),          # Flux Fill: in 384 = 64 + 320 packed, out 64
    "sd3": ("sd3", 8, 4),
    "pixart": ("pixart", 8, 4),
}


def stacked_case(name: str):
    family, c_in, c_out = STACKED[name]
    case = CASES[family]
    axis = 1 if family == "cogvideox" else (-1 if len(case.x) == 2 else 0)  # channel axis of case.x (no batch)
    x_in, x_out = list(case.x), list(case.x)
    x_in[axis], x_out[axis] = c_in, c_out
    config = {**case.config, "in_channels": c_in, "out_channels": c_out}
    return dataclasses.replace(case, config=config, x=tuple(x_in)), tuple(x_out)


def stacked_inputs(case, out_shape, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(B, *case.x, generator=g)
    x0 = torch.randn(B, *out_shape, generator=g)
    t = (torch.rand(B, generator=g) * 0.6 + 0.3) * case.t_scale
    return x_t, x0, t, case.cond(g)


@pytest.mark.parametrize("name", list(STACKED))
def test_latent_alignment_on_stacked_input_channels_targets_the_predicted_channels(name: str) -> None:
    """target_dim is out_channels * patch; x0 of the model's output shape is accepted, and patchify(x0) fed
    in place of the final projection's tokens makes the model's own unpatchify return exactly x0."""
    case, out_shape = stacked_case(name)
    model = case.build().train()
    x_t, x0, t, cond = stacked_inputs(case, out_shape)
    align = LatentAlignment(model, layer=1, head="linear", weight=1.0)
    target = align.adapter.patchify(model, x0)
    assert align.target_dim == target.shape[-1] == submodule(model, case.proj).out_features
    assert align.adapter.target_shape(model, x_t, ModelCall((), cond)) == (B, *out_shape)

    handle = submodule(model, case.proj).register_forward_hook(lambda m, a, out: target)
    with torch.no_grad():
        out = case.sample(call(case, model.eval(), x_t, t, cond))
    handle.remove()
    assert out.shape == x0.shape and torch.equal(out, x0)

    model.train()
    with pytest.warns(RuntimeWarning, match="found no student features"):  # no training forward before this call: a re-run, warned
        loss = align(model, x_t, x0, t, **cond)
    assert loss.shape == () and bool(torch.isfinite(loss))
    loss.backward()
    assert align.head.weight.grad is not None


@pytest.mark.parametrize("name", ["wan-i2v", "cogvideox-i2v", "flux-fill"])
def test_latent_alignment_refuses_x0_with_the_conditioning_channels_stacked(name: str) -> None:
    """cat([clean, conditioning]) (x_t's shape) was the only x0 accepted before: now a clear error naming the shape wanted."""
    case, out_shape = stacked_case(name)
    model = case.build().train()
    x_t, _, t, cond = stacked_inputs(case, out_shape)
    align = LatentAlignment(model, layer=1)
    with pytest.raises(ValueError) as info:
        align(model, x_t, torch.randn_like(x_t), t, **cond)
    message = str(info.value)
    assert f"x0 has shape {tuple(x_t.shape)}" in message and f"{(B, *out_shape)}" in message and "conditioning" in message


def test_patchify_refuses_stacked_channels_naming_both_counts() -> None:
    case, out_shape = stacked_case("wan-i2v")
    model = case.build()
    with pytest.raises(ValueError, match=r"predicts 4 latent channels \(its input takes 12"):
        resolve_adapter(model).patchify(model, torch.randn(B, *case.x))


def test_learned_sigma_dit_still_targets_the_latent_channels() -> None:
    """diffusers DiT with out_channels == 2 * in_channels predicts a variance too: the target is the latent's 4 channels."""
    case = dataclasses.replace(CASES["dit"], config={**CASES["dit"].config, "out_channels": 8})
    model = case.build()
    align = LatentAlignment(model, layer=1)
    assert align.target_dim == 4 * 2 * 2
    assert align.adapter.target_shape(model, torch.randn(B, 4, 8, 8), ModelCall()) == (B, 4, 8, 8)


def reference_dit_with_stacked_channels() -> DiT:
    """The reference DiT taking 8 channels (4 noisy + 4 conditioning) and predicting 4: what an I2V-style DiT does."""
    torch.manual_seed(0)
    model = DiT(**{**TINY, "in_channels": 8, "learn_sigma": False})
    model.out_channels = 4
    model.final_layer = FinalLayer(TINY["hidden_size"], TINY["patch_size"], 4)
    return randomise_gates(model)


def test_latent_alignment_on_a_reference_dit_with_stacked_channels() -> None:
    model = reference_dit_with_stacked_channels()
    x_t, x0 = torch.randn(B, 8, 8, 8), torch.randn(B, 4, 8, 8)
    t, y = torch.tensor([10, 500]), torch.tensor([1, 2])
    align = LatentAlignment(model, layer=2, head="linear", weight=1.0)
    target = align.adapter.patchify(model, x0)
    assert align.target_dim == 16 and target.shape == (B, 16, 16)
    assert torch.equal(model.unpatchify(target), x0)  # the model's own unpatchify inverts it
    with pytest.warns(RuntimeWarning, match="found no student features"):  # no training forward before this call: a re-run, warned
        loss = align(model, x_t, x0, t, y)
    assert bool(torch.isfinite(loss))
    with pytest.raises(ValueError, match=r"wants the clean latent of shape \(2, 4, 8, 8\)"):
        align(model, x_t, x_t, t, y)


# ------------------------------------------------------------------ 4. edit models: reference tokens after the target's
def reference_ids(columns: int, first: float) -> torch.Tensor:
    grid = ids(*range(columns))
    grid[:, 0] = first
    return grid


EDIT = {"flux": (3, 1.0), "flux2": (4, 10.0)}  # id columns; a reference image's first coordinate (Kontext: 1, Flux2: 10)


def edit_inputs(name: str, seed: int = 1):
    """hidden_states = [generated image (G tokens); reference image (G tokens)], img_ids telling them apart."""
    case = CASES[name]
    columns, ref = EDIT[name]
    g = torch.Generator().manual_seed(seed)
    x0, noise, reference = (torch.randn(B, G, 4, generator=g) for _ in range(3))
    t = torch.rand(B, generator=g) * 0.6 + 0.3
    s = t - 0.1
    cond = case.cond(g)
    cond["img_ids"] = torch.cat([cond["img_ids"], reference_ids(columns, ref)])
    make = lambda tt: torch.cat([(1 - tt.view(-1, 1, 1)) * x0 + tt.view(-1, 1, 1) * noise, reference], 1)  # noqa: E731
    return case, x0, make(t), make(s), t, s, cond


@pytest.mark.parametrize("name", list(EDIT))
def test_flux_edit_call_aligns_the_generated_tokens_only(name: str) -> None:
    """SRA with an identity head and MSE: the loss is the one of the generated image's G tokens, by hand."""
    case, _, x_t, x_s, t, s, cond = edit_inputs(name)
    model = case.build().train()
    blocks = resolve_adapter(model).blocks(model)
    first: list[torch.Tensor] = []
    second: list[torch.Tensor] = []
    image = lambda o: o[1] if isinstance(o, tuple) else o[:, -2 * G:]  # noqa: E731  (text, image) or one [text; image]
    hooks = [blocks[0].register_forward_hook(lambda m, a, o: first.append(image(o))),
             blocks[1].register_forward_hook(lambda m, a, o: second.append(image(o)))]
    with torch.no_grad():
        model(hidden_states=x_t, timestep=t, **cond)
        model(hidden_states=x_s, timestep=s, **cond)
    for h in hooks:
        h.remove()
    student, teacher = first[0], second[1]  # block 1 on x_t, block 2 on x_s
    assert student.shape[1] == 2 * G  # the block's image stream holds both images
    want = F.mse_loss(student[:, :G], teacher[:, :G])

    sra = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=2, head="identity", loss="mse", weight=1.0)
    model(hidden_states=x_t, timestep=t, **cond)
    loss = sra(model, x_t, x_s, t, s, **cond)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert sra.student_reruns == 0


@pytest.mark.parametrize("name", list(EDIT))
def test_flux_edit_latent_alignment_targets_the_generated_image(name: str) -> None:
    case, x0, x_t, _, t, _, cond = edit_inputs(name)
    model = case.build().train()
    align = LatentAlignment(model, layer=1, head="linear", weight=1.0)
    kept: list[torch.Tensor] = []
    handle = align.adapter.blocks(model)[0].register_forward_hook(lambda m, a, o: kept.append(o[1]))
    model(hidden_states=x_t, timestep=t, **cond)
    handle.remove()
    loss = align(model, x_t, x0, t, **cond)
    want = F.smooth_l1_loss(align.head(kept[0][:, :G]), x0, beta=0.05)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=rf"wants the clean latent of shape \(2, {G}, 4\).*reference tokens"):
        align(model, x_t, x_t, t, **cond)  # [target; reference] as x0: the reference half is the input itself


@pytest.mark.parametrize("layout", ["reference first", "interleaved", "no generated rows"])
def test_flux_edit_call_with_a_layout_the_adapter_cannot_tell_is_refused(layout: str) -> None:
    case, _, x_t, x_s, t, s, cond = edit_inputs("flux")
    first = cond["img_ids"][:, 0]
    if layout == "reference first":
        first[:] = torch.cat([torch.ones(G), torch.zeros(G)])
    elif layout == "interleaved":
        first[:] = torch.arange(2 * G) % 2
    else:
        first[:] = 2.0
    model = case.build().train()
    sra = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=2)
    with pytest.raises(ValueError, match=r"img_ids does not say which of the 32 image tokens.*generated image's"), pytest.warns(RuntimeWarning, match="found no student features"):
        sra(model, x_t, x_s, t, s, **cond)


def test_flux_img_ids_that_do_not_fit_the_tokens_are_refused() -> None:
    case, _, x_t, x_s, t, s, cond = edit_inputs("flux")
    cond["img_ids"] = cond["img_ids"][:G]  # ids of the generated image only, reference tokens still in x_t
    model = case.build().train()
    adapter = resolve_adapter(model)
    with pytest.raises(ValueError, match=r"img_ids of shape \(16, 3\) does not fit hidden_states' 32 tokens"):
        adapter.tokens((None, torch.randn(B, 2 * G, 8)), model, ModelCall((), {"hidden_states": x_t, **cond}))


def test_batched_img_ids_are_read_like_the_model_reads_them() -> None:
    """diffusers accepts (deprecated) img_ids with a batch axis and uses img_ids[0]."""
    case, _, x_t, _, _, _, cond = edit_inputs("flux")
    model = case.build()
    adapter = resolve_adapter(model)
    batched = {**cond, "img_ids": cond["img_ids"][None].expand(B, -1, -1)}
    stream = torch.randn(B, 2 * G, 8)
    assert torch.equal(adapter.tokens((None, stream), model, ModelCall((), {"hidden_states": x_t, **batched})), stream[:, :G])


def test_qwenimage_edit_latent_alignment_targets_the_generated_image() -> None:
    """QwenImage-Edit: img_shapes lists the target then the reference; x0 is the target's packed latent."""
    case = CASES["qwenimage"]
    model = case.build().train()
    g = torch.Generator().manual_seed(2)
    x0, reference = torch.randn(B, G, 16, generator=g), torch.randn(B, G, 16, generator=g)
    cond = {**case.cond(g), "img_shapes": [[(1, 4, 4), (1, 4, 4)]] * B}
    x_t = torch.cat([0.5 * x0 + 0.5 * torch.randn(B, G, 16, generator=g), reference], 1)
    t = torch.full((B,), 0.5)
    align = LatentAlignment(model, layer=1, head="linear", weight=1.0)
    assert align.adapter.target_shape(model, x_t, ModelCall((), cond)) == (B, G, 16)
    with pytest.warns(RuntimeWarning, match="found no student features"):  # no training forward before this call: a re-run, warned
        loss = align(model, x_t, x0, t, **cond)
    assert bool(torch.isfinite(loss)) and align.metrics["target_norm"] > 0


# ------------------------------------------------------------------ bare Conv2d patch embedder
class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.norm(x) + c[:, None])
        return x + self.mlp(x)


class ConvDiT(nn.Module):
    """DiT-like: blocks, x_embedder a bare Conv2d (kernel == stride), t_embedder; unpatchify ``(p, q, C)``."""

    def __init__(self, channels: int = 4, patch: int = 2, d: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.patch = patch
        self.x_embedder = nn.Conv2d(channels, d, kernel_size=patch, stride=patch)
        self.t_embedder = nn.Linear(1, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.out = nn.Linear(d, patch * patch * channels)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p = self.patch
        b, _, _ = tokens.shape
        x = tokens.reshape(b, h // p, w // p, p, p, -1)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, -1, h, w)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2)
        c = self.t_embedder(t[:, None].float())
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.out(tokens), *x.shape[-2:])


def test_latent_alignment_on_a_dit_like_model_with_a_bare_conv_patch_embedder() -> None:
    torch.manual_seed(0)
    model = ConvDiT()
    x0 = torch.randn(B, 4, 8, 12)
    align = LatentAlignment(model, layer=2, head="linear", weight=1.0)
    target = align.adapter.patchify(model, x0)
    assert align.adapter.name == "dit" and align.target_dim == 16 and target.shape == (B, 24, 16)
    assert torch.equal(model.unpatchify(target, 8, 12), x0)
    x_t, t = x0 + torch.randn_like(x0), torch.rand(B)
    model(x_t, t)
    loss = align(model, x_t, x0, t)
    assert bool(torch.isfinite(loss)) and align.student_reruns == 0


def test_bare_conv_embedder_whose_kernel_is_not_its_stride_is_refused() -> None:
    """Overlapping patches (kernel 3, stride 2) have no patchify: say so instead of guessing."""
    model = ConvDiT()
    model.x_embedder = nn.Conv2d(4, 32, kernel_size=3, stride=2, padding=1)
    with pytest.raises(ValueError, match="cannot tell the patch size of Conv2d"):
        resolve_adapter(model).patchify(model, torch.randn(B, 4, 8, 8))


# ------------------------------------------------------------------ more misuses of the same features
def test_target_dim_of_the_input_width_on_a_stacked_model_is_refused_at_the_first_call() -> None:
    """The old habit, target_dim = in_channels * patch, no longer matches the target: loud, naming target_dim."""
    case, out_shape = stacked_case("wan-i2v")
    model = case.build().train()
    x_t, x0, t, cond = stacked_inputs(case, out_shape)
    align = LatentAlignment(model, layer=1, target_dim=12 * 4)
    with pytest.raises(ValueError, match=r"head outputs 48 values per token.*target_dim="), pytest.warns(RuntimeWarning, match="found no student features"):
        align(model, x_t, x0, t, **cond)


def test_flux_edit_with_reference_ids_not_offset_is_refused() -> None:
    """Reference ids made like the generated image's (first coordinate 0): the same positions twice, no way to tell."""
    case, _, x_t, x_s, t, s, cond = edit_inputs("flux")
    cond["img_ids"][G:, 0] = 0.0
    model = case.build().train()
    sra = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=2)
    with pytest.raises(ValueError, match=r"the same position.*reference tokens img_ids\[:, 0\] != 0"), pytest.warns(RuntimeWarning, match="found no student features"):
        sra(model, x_t, x_s, t, s, **cond)


@pytest.mark.slow
def test_flux_edit_under_torch_compile_gives_the_eager_loss() -> None:
    """Reading img_ids' values inside the hooks is a graph break under torch.compile, not an error or a rerun."""
    case, _, x_t, x_s, t, s, cond = edit_inputs("flux")
    model = case.build().train()
    sra = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=2, head="identity", loss="mse", weight=1.0)
    model(hidden_states=x_t, timestep=t, **cond)
    eager = sra(model, x_t, x_s, t, s, **cond)
    compiled = torch.compile(model, backend="eager")
    compiled(hidden_states=x_t, timestep=t, **cond)
    torch.testing.assert_close(sra(compiled, x_t, x_s, t, s, **cond), eager, rtol=1e-5, atol=1e-7)
    assert sra.student_reruns == 0
