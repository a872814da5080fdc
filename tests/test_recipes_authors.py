"""The authors' settings as ``recipe=`` (issue 30): each recipe against a hand computation of the authors'
formula on the right block, explicit arguments winning over a recipe, bad recipe names refused, and
where each recipe's docstring says it comes from."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
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

