"""SRA's recipes (paper / official) and their default; SRA 2's per-sample target normalization."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from examples.models import SiT
from sra_plugin import LatentAlignment, SelfRepresentationAlignment
from sra_plugin.alignment import DEFAULT_RECIPE, RECIPES
from tests._models import tiny_sit


def every_weight_normal(model: SiT) -> SiT:
    for p in model.parameters():  # no zero-initialised layer: every block does something
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model


def recipe_sit() -> SiT:
    return tiny_sit(0, init=every_weight_normal, in_channels=2, depth=4, num_classes=3)


def batch():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, 8, 8, generator=g)
    noise = torch.randn(4, 2, 8, 8, generator=g)
    t = torch.rand(4, generator=g)
    s = t * 0.8
    y = torch.tensor([0, 1, 2, 0])
    return x0, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise, (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise, t, s, y


def sra_loss(**kwargs) -> tuple[float, SelfRepresentationAlignment]:
    model = recipe_sit()
    torch.manual_seed(2)  # the same head for every construction
    sra = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=3, **kwargs)
    _, x_t, x_s, t, s, y = batch()
    model(x_t, t, y)
    return sra(model, x_t, x_s, t, s, y).item(), sra


def test_recipes_fill_in_loss_and_weight_and_explicit_values_win() -> None:
    assert RECIPES["paper"] == {"loss": "smooth_l1", "weight": 0.2}
    assert RECIPES["official"] == {"loss": "cosine_tokens", "weight": 0.5}
    paper, sra = sra_loss(recipe="paper")
    assert (sra.loss_name, sra.weight, sra.recipe) == ("smooth_l1", 0.2, "paper")
    assert paper == pytest.approx(sra_loss(loss="smooth_l1", weight=0.2)[0], rel=1e-6)
    official, sra = sra_loss(recipe="official")
    assert (sra.loss_name, sra.weight) == ("cosine_tokens", 0.5)
    assert official == pytest.approx(sra_loss(loss="cosine_tokens", weight=0.5)[0], rel=1e-6)
    assert official != pytest.approx(paper)
    # A recipe fills in only what is not given.
    mixed, sra = sra_loss(recipe="official", weight=0.1)
    assert (sra.loss_name, sra.weight) == ("cosine_tokens", 0.1) and mixed == pytest.approx(official / 5, rel=1e-5)


def test_paper_recipe_is_the_papers_formula() -> None:
    model = recipe_sit()
    sra = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=3, recipe="paper")
    _, x_t, x_s, t, s, y = batch()
    got = {}
    hooks = [model.blocks[0].register_forward_hook(lambda m, a, o: got.__setitem__("student", o)),
             sra.teacher.blocks[2].register_forward_hook(lambda m, a, o: got.__setitem__("teacher", o))]
    model(x_t, t, y)
    loss = sra(model, x_t, x_s, t, s, y)
    for h in hooks:
        h.remove()
    want = 0.2 * F.smooth_l1_loss(sra.head(got["student"]), got["teacher"], beta=0.05)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)


def test_default_recipe_is_the_documented_one() -> None:
    _, sra = sra_loss()
    assert sra.recipe == DEFAULT_RECIPE
    assert (sra.loss_name, sra.weight) == (RECIPES[DEFAULT_RECIPE]["loss"], RECIPES[DEFAULT_RECIPE]["weight"])


@pytest.mark.parametrize("recipe", ["Paper", "cosine", None, 3])
def test_unknown_recipe_is_refused_and_attaches_nothing(recipe) -> None:
    model = recipe_sit()
    hooks_before = [len(b._forward_hooks) for b in model.blocks]
    with pytest.raises(ValueError, match=f"recipe={recipe!r} is not accepted: use one of \\['official', 'paper'\\]"):
        SelfRepresentationAlignment(model, recipe=recipe)
    assert [len(b._forward_hooks) for b in model.blocks] == hooks_before


def test_sample_target_norm_z_scores_each_sample_whatever_the_latent_scale() -> None:
    model = recipe_sit()
    raw = LatentAlignment(model, layer=1, target_norm=None)
    normed = LatentAlignment(model, layer=1, target_norm="sample")
    x0 = batch()[0] * torch.tensor([1.0, 3.0, 0.5, 8.0]).view(-1, 1, 1, 1) + 2.0
    target = normed.target(x0)
    assert target.shape == raw.target(x0).shape == (4, 16, 8)
    flat = target.flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1), torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(normed.target(10 * x0 - 3), target, atol=1e-4, rtol=1e-4)  # scale and shift drop out
    torch.testing.assert_close(raw.target(10 * x0), 10 * raw.target(x0))  # None keeps the raw values
    # The loss uses the normalized target.
    _, x_t, _, t, _, y = batch()
    model(x_t, t, y)
    got = {}
    h = model.blocks[0].register_forward_hook(lambda m, a, o: got.__setitem__("tokens", o))
    model(x_t, t, y)
    h.remove()
    loss = normed(model, x_t, x0, t, y)
    want = normed.weight * F.smooth_l1_loss(normed.head(got["tokens"]), target, beta=0.05)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)


def test_target_norm_is_checked_and_part_of_the_saved_identity() -> None:
    model = recipe_sit()
    with pytest.raises(ValueError, match="target_norm='zscore' is not accepted"):
        LatentAlignment(model, target_norm="zscore")
    saved = LatentAlignment(model, layer=1, target_norm=None).state_dict()
    other = LatentAlignment(model, layer=1, target_norm="sample")
    head = {k: v.clone() for k, v in other.head.state_dict().items()}
    with pytest.raises(ValueError, match="target_norm: saved None, here 'sample'"):
        other.load_state_dict(saved)
    assert all(torch.equal(v, other.head.state_dict()[k]) for k, v in head.items())  # nothing loaded
