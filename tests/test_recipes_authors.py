"""The authors' settings as ``recipe=`` (issue 30): each recipe against a hand computation of the authors'
formula on the right block, explicit arguments winning over a recipe, bad recipe names refused, and
where each recipe's docstring says it comes from."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sra_plugin import Dispersive
from sra_plugin import dispersive as dispersive_module
from tests._models import flow_batch, randomise_gates, tiny_sit


def lively_sit(depth: int = 6) -> nn.Module:
    """A tiny SiT whose blocks each change the features visibly (adaLN gates drawn with std 0.5), so
    that the loss of one block is told apart from its neighbours'."""
    return randomise_gates(tiny_sit(depth=depth), std=0.5)


def run_with_block_outputs(model: nn.Module, objective: nn.Module, x_t, t, y) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The objective's loss on one training forward, and every block's output (1-based) of that same
    forward, taken by our own hooks (with their graph)."""
    out: dict[int, torch.Tensor] = {}
    handles = [b.register_forward_hook(lambda m, a, o, k=k: out.__setitem__(k, o)) for k, b in enumerate(model.blocks, 1)]
    try:
        model(x_t, t, y)
    finally:
        for h in handles:
            h.remove()
    return objective(model, x_t, t, y), out


def params_of(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def hooks_on(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------- Dispersive
def hand_dispersive(tokens: torch.Tensor, weight: float, tau: float) -> torch.Tensor:
    """The authors' InfoNCE-L2 without positives, written out: ``weight * log(1/B^2 sum_ij exp(-d_ij / tau))``,
    ``d_ij`` the squared L2 distance of samples i and j's flattened features divided by their count F."""
    z = tokens.double().reshape(tokens.shape[0], -1)
    b, size = z.shape
    terms = [torch.exp(-(z[i] - z[j]).pow(2).sum() / size / tau) for i in range(b) for j in range(b)]
    return weight * torch.log(torch.stack(terms).sum() / (b * b))


def check_dispersive(model: nn.Module, disp: Dispersive, block: int, weight: float, tau: float) -> None:
    """The loss and its gradient equal the hand formula on block ``block``; no other block's value matches,
    and no block after it gets a gradient."""
    x_t, _, t, _, y, _ = flow_batch(n=5)
    loss, outputs = run_with_block_outputs(model, disp, x_t, t, y)
    want = hand_dispersive(outputs[block], weight, tau)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    others = [k for k in outputs if k != block
              and float(loss.detach()) == pytest.approx(float(hand_dispersive(outputs[k].detach(), weight, tau)), rel=1e-4)]
    assert others == []  # the value singles out the block
    params = params_of(*model.blocks[:block])
    got = torch.autograd.grad(loss, params, retain_graph=True)
    expected = torch.autograd.grad(want, params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e.to(g.dtype), rtol=1e-4, atol=1e-5 * float(e.abs().max()))
    assert all(float(g.abs().sum()) > 0 for g in got[-len(params_of(model.blocks[block - 1])):])  # the block itself trains
    later = params_of(*model.blocks[block:])
    if later:
        assert all(g is None for g in torch.autograd.grad(loss, later, allow_unused=True))


def test_dispersive_default_is_the_authors_release_last_block_weight_quarter_tau_one() -> None:
    model = lively_sit()  # 6 blocks
    disp = Dispersive(model)
    assert dispersive_module.DEFAULT_RECIPE == "release" and disp.recipe == "release"
    assert (disp.layer, disp.weight, disp.temperature) == (6, 0.25, 1.0)
    check_dispersive(model, disp, block=6, weight=0.25, tau=1.0)
    assert "recipe='release'" in repr(disp)


@pytest.mark.parametrize("depth, block", [(12, 3), (8, 2), (6, 2)])  # round half up: 6 / 4 = 1.5 -> block 2
def test_dispersive_paper_recipe_is_half_weight_tau_half_at_a_quarter_of_the_depth(depth: int, block: int) -> None:
    model = lively_sit(depth)
    disp = Dispersive(model, recipe="paper")
    assert (disp.layer, disp.weight, disp.temperature) == (block, 0.5, 0.5)
    check_dispersive(model, disp, block=block, weight=0.5, tau=0.5)


def test_dispersive_explicit_arguments_win_over_the_recipe() -> None:
    model = lively_sit(12)
    disp = Dispersive(model, recipe="paper", weight=0.1)  # tau and block still the paper's
    assert (disp.layer, disp.weight, disp.temperature) == (3, 0.1, 0.5)
    check_dispersive(model, disp, block=3, weight=0.1, tau=0.5)
    disp.remove()
    disp = Dispersive(model, recipe="paper", layer=-1, temperature=2.0)
    assert (disp.layer, disp.weight, disp.temperature) == (12, 0.5, 2.0)
    check_dispersive(model, disp, block=12, weight=0.5, tau=2.0)
    disp.remove()
    disp = Dispersive(model, layer=5, weight=0.7, temperature=0.3)  # every value given: no recipe value left
    check_dispersive(model, disp, block=5, weight=0.7, tau=0.3)


@pytest.mark.parametrize("recipe", ["Release", "pretraining", "", None, 3])
def test_dispersive_refuses_an_unknown_recipe_and_attaches_nothing(recipe) -> None:
    model = tiny_sit()
    before = hooks_on(model)
    with pytest.raises(ValueError, match=rf"recipe={recipe!r} is not accepted: use one of \['paper', 'release'\]"):
        Dispersive(model, recipe=recipe)
    assert hooks_on(model) == before


def test_dispersive_state_of_the_old_default_still_loads() -> None:
    """0.3.0's default had the release's block and temperature (only its weight differed), and the weight
    is not part of a saved state: its checkpoints load into the new default unchanged."""
    model = tiny_sit()
    saved = Dispersive(model, layer=-1, weight=0.5, temperature=1.0).state_dict()
    Dispersive(model).load_state_dict(saved)
    with pytest.raises(ValueError, match="layer: saved 6, here 2"):
        Dispersive(model, recipe="paper").load_state_dict(saved)



# ---------------------------------------------------------------- LayerSync
class CheckpointedSiT(type(tiny_sit())):
    """The tiny SiT with the blocks in ``checkpointed`` (0-based) run in a reentrant checkpoint, as
    LightningDiT's ``use_checkpoint=True`` does: inside it a block runs with gradients disabled."""

    checkpointed: frozenset[int] = frozenset()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for i, block in enumerate(self.blocks):
            x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=True) if i in self.checkpointed else block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def hand_layersync(student: torch.Tensor, target: torch.Tensor, weight: float, detach: bool) -> torch.Tensor:
    """The official per-token negative cosine, written out, plus 1: ``weight * mean(1 - <z_s/|z_s|, z_t/|z_t|>)``."""
    target = target.detach() if detach else target
    s = student / student.norm(dim=-1, keepdim=True)
    q = target / target.norm(dim=-1, keepdim=True)
    return weight * (1 - (s * q).sum(-1)).mean()


def layersync_step(model: nn.Module, ls, student: int = 2, target: int = 4):
    """(loss, block ``student``'s output, block ``target``'s output) of one training step, blocks 1-based."""
    x_t, _, t, _, y, _ = flow_batch()
    loss, outputs = run_with_block_outputs(model, ls, x_t, t, y)
    return loss, outputs[student], outputs[target]


def grads(loss: torch.Tensor, params: list) -> list:
    return list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))


def assert_same_grads(got: list, want: list) -> None:
    for g, w in zip(got, want):
        assert g is not None and w is not None
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()) + 1e-12)


def test_layersync_lora_recipe_sends_the_gradient_through_both_blocks() -> None:
    from sra_plugin import LayerSync

    model = lively_sit()
    ls = LayerSync(model, student_layer=2, target_layer=4, recipe="lora")
    assert (ls.weight, ls.detach_target, ls.recipe) == (0.002, False, "lora")
    loss, z_s, z_t = layersync_step(model, ls)
    want = hand_layersync(z_s, z_t, 0.002, detach=False)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-9)
    # Blocks 3 and 4 only shape the target: they train here, by exactly the gradient of the undetached formula.
    target_only = params_of(model.blocks[2], model.blocks[3])
    got = grads(loss, target_only)
    assert_same_grads(got, grads(want, target_only))
    assert all(float(g.abs().sum()) > 0 for g in got)
    # Blocks 1 and 2 get both paths' gradient: not the detached formula's.
    shared = params_of(model.blocks[0], model.blocks[1])
    got = grads(loss, shared)
    assert_same_grads(got, grads(want, shared))
    detached = grads(hand_layersync(z_s, z_t, 0.002, detach=True), shared)
    assert not all(torch.allclose(g, d, rtol=1e-3, atol=0) for g, d in zip(got, detached))
    assert all(g is None for g in grads(loss, params_of(*model.blocks[4:], model.final_layer)))
    assert "target not detached" in repr(ls) and "recipe='lora'" in repr(ls)


def test_layersync_pretraining_recipe_is_the_default_and_detaches_the_target() -> None:
    from sra_plugin import LayerSync, layersync

    model = lively_sit()
    ls = LayerSync(model, student_layer=2, target_layer=4)
    assert layersync.DEFAULT_RECIPE == "pretraining"
    assert (ls.weight, ls.detach_target, ls.recipe) == (0.2, True, "pretraining")
    loss, z_s, z_t = layersync_step(model, ls)
    want = hand_layersync(z_s, z_t, 0.2, detach=True)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-8)
    assert all(g is None for g in grads(loss, params_of(model.blocks[2], model.blocks[3])))  # no gradient through the target
    shared = params_of(model.blocks[0], model.blocks[1])
    assert_same_grads(grads(loss, shared), grads(want, shared))
    assert "target detached" in repr(ls) and "recipe='pretraining'" in repr(ls)


def test_layersync_explicit_arguments_win_over_the_recipe() -> None:
    from sra_plugin import LayerSync

    cases = [  # (recipe, given, weight, detached)
        ("lora", {"detach_target": True}, 0.002, True),
        ("lora", {"weight": 0.5}, 0.5, False),
        ("pretraining", {"detach_target": False}, 0.2, False),
        ("pretraining", {"weight": 0.05, "detach_target": True}, 0.05, True),
    ]
    for recipe, given, weight, detached in cases:
        model = lively_sit()
        ls = LayerSync(model, 2, 4, recipe=recipe, **given)
        assert (ls.weight, ls.detach_target) == (weight, detached)
        loss, z_s, z_t = layersync_step(model, ls)
        torch.testing.assert_close(loss, hand_layersync(z_s, z_t, weight, detached), rtol=1e-5, atol=1e-9)
        target_grads = grads(loss, params_of(model.blocks[2], model.blocks[3]))
        assert all(g is None for g in target_grads) if detached else all(float(g.abs().sum()) > 0 for g in target_grads)


@pytest.mark.parametrize("recipe", ["LoRA", "release", "", None, 1])
def test_layersync_refuses_an_unknown_recipe_and_attaches_nothing(recipe) -> None:
    from sra_plugin import LayerSync

    model = tiny_sit()
    before = hooks_on(model)
    with pytest.raises(ValueError, match=rf"recipe={recipe!r} is not accepted: use one of \['lora', 'pretraining'\]"):
        LayerSync(model, recipe=recipe)
    with pytest.raises(TypeError, match=r"detach_target='yes' is not accepted: use True .* False .* or None"):
        LayerSync(model, detach_target="yes")
    assert hooks_on(model) == before


def test_layersync_recipe_and_detach_are_the_saved_identity_and_old_states_still_load() -> None:
    from sra_plugin import LayerSync
    from sra_plugin.student import decode_state, encode_state

    model = tiny_sit()
    lora = LayerSync(model, 2, 4, recipe="lora").state_dict()
    assert set(lora) == {"_extra_state"}  # the same keys as 0.3.0's
    with pytest.raises(ValueError, match=r"detach_target: saved False, here True, recipe: saved 'lora', here 'pretraining'"):
        LayerSync(model, 2, 4).load_state_dict(lora)
    with pytest.raises(ValueError, match=r"detach_target: saved False, here True"):
        LayerSync(model, 2, 4, recipe="lora", detach_target=True).load_state_dict(lora)
    LayerSync(model, 2, 4, recipe="lora").load_state_dict(lora)
    # A state saved by 0.3.0 has neither key; it was the pretraining recipe (always detached).
    ls = LayerSync(model, 2, 4)
    for _ in range(3):
        x_t, _, t, _, y, _ = flow_batch()
        model(x_t, t, y)
        ls(model, x_t, t, y)
    old = decode_state(ls.state_dict()["_extra_state"])
    del old["recipe"], old["detach_target"]
    assert set(old) == {"step", "steps_from_updates", "student_layer", "target_layer", "depth", "head"}
    again = LayerSync(model, 2, 4)
    again.load_state_dict({"_extra_state": encode_state(old)})
    assert again.step == 3
    with pytest.raises(ValueError, match=r"detach_target: saved True, here False, recipe: saved 'pretraining', here 'lora'"):
        LayerSync(model, 2, 4, recipe="lora").load_state_dict({"_extra_state": encode_state(old)})


def test_layersync_refuses_a_target_without_gradient_only_when_the_target_trains() -> None:
    """A reentrant checkpoint around the target block leaves its tokens without gradient: harmless for a
    detached target, a silent loss of the target's gradient for ``lora``, which is refused."""
    from sra_plugin import LayerSync

    torch.manual_seed(0)
    model = randomise_gates(CheckpointedSiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=2,
                                            num_classes=10, class_dropout_prob=0.0), std=0.5)
    model.checkpointed = frozenset({3})  # block 4, the target
    x_t, _, t, _, y, _ = flow_batch()
    ls = LayerSync(model, 2, 4, recipe="lora")
    model(x_t, t, y)
    with pytest.raises(RuntimeError, match="ran with gradients disabled"):
        ls(model, x_t, t, y)
    ls.remove()
    ls = LayerSync(model, 2, 4)  # pretraining: the target is detached anyway (its tokens are read by a re-run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loss, z_s, z_t = layersync_step(model, ls)
    torch.testing.assert_close(loss, hand_layersync(z_s, z_t, 0.2, detach=True), rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- REPA's projector
def assert_xavier_uniform_zero_bias(head: nn.Module, large: int) -> None:
    """Every Linear: weights inside xavier's bound sqrt(6 / (fan_in + fan_out)) and reaching close to it
    (uniform), biases exactly zero; the layer with ``large`` weights has xavier's std."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for linear in linears:
        fan_out, fan_in = linear.weight.shape
        bound = (6 / (fan_in + fan_out)) ** 0.5
        w = linear.weight.detach()
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
        assert torch.equal(linear.bias.detach(), torch.zeros_like(linear.bias))
        if w.numel() == large:
            assert float(w.std()) == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.02)


def test_repa_projector_is_xavier_uniform_with_zero_biases_as_the_official_code() -> None:
    from sra_plugin import REPA
    from sra_plugin.repa import REPAProjector

    torch.manual_seed(0)
    assert_xavier_uniform_zero_bias(REPAProjector(32, 48, hidden=512), large=512 * 512)
    # Through REPA(head="mlp"), on a model of width 32 and an encoder of width 10.
    model = tiny_sit()
    encoder = nn.Linear(3, 10)
    repa = REPA(model, encoder, layer=2, encoder_tokens=lambda e, im: e(im), encoder_dim=10, projector_dim=256)
    assert isinstance(repa.head, REPAProjector)
    assert_xavier_uniform_zero_bias(repa.head, large=256 * 256)


def test_repa_projector_is_fixed_by_the_seed() -> None:
    from sra_plugin.repa import REPAProjector

    def draw(seed: int) -> dict:
        torch.manual_seed(seed)
        return REPAProjector(16, 8, hidden=64).state_dict()

    a, b, c = draw(3), draw(3), draw(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])


def test_recipe_docstrings_name_the_files_they_come_from() -> None:
    from sra_plugin import layersync
    from sra_plugin.repa import REPAProjector

    assert all(name in dispersive_module.__doc__ for name in ("raywang4/DispLoss", "train.py", "transport.py", "2506.09027"))
    assert all(name in Dispersive.__doc__ for name in ("train.py", "transport.py", "2506.09027"))
    sources = ("vita-epfl/LayerSync", "train.py", "transport/transport.py", "Finetuning-LoRA/loss.py")
    assert all(name in layersync.__doc__ for name in sources)
    assert all(name in layersync.LayerSync.__doc__ for name in ("train.py", "Finetuning-LoRA/loss.py"))
    assert all(name in REPAProjector.__doc__ for name in ("sihyun-yu/REPA", "models/sit.py"))
