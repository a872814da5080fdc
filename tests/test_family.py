"""The family of objectives on one machinery (issue 21): LayerSync and Dispersive against hand
computations on a model used nowhere else, where their gradients go, composition on one forward (the
student's blocks run once, at most one teacher pass), bad input, misuse and resume."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sra_plugin import Dispersive, LatentAlignment, LayerSync, SelfRepresentationAlignment
from sra_plugin.registry import DeclaredAdapter
from tests._models import flow_batch, tiny_sit


class ToyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.time = nn.Linear(1, dim)

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm(h) + self.time(t.view(-1, 1, 1)))


class ToyDenoiser(nn.Module):
    """A made-up denoiser: 2x2 patches of a 1-channel 8x8 image, 5 residual MLP blocks in ``layers``."""

    def __init__(self, dim: int = 12, depth: int = 5, seed: int = 3) -> None:
        torch.manual_seed(seed)
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.layers = nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.out = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.embed(x.reshape(b, 1, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, 16, 4))
        for layer in self.layers:
            h = layer(h, t)
        return self.out(h).reshape(b, 4, 4, 2, 2, 1).permute(0, 5, 1, 3, 2, 4).reshape(b, 1, 8, 8)


def toy_width(model: ToyDenoiser, block: nn.Module) -> int:
    return model.embed.out_features


TOY = DeclaredAdapter("toy-denoiser", matches=ToyDenoiser, blocks="layers", dim=toy_width)  # passed as adapter=, not registered


def toy_batch(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g)


def block_outputs(model: nn.Module, blocks, x, t) -> dict[int, torch.Tensor]:
    """Every block's output of one forward, 1-based, taken by our own hooks (not the package's)."""
    out: dict[int, torch.Tensor] = {}
    handles = [b.register_forward_hook(lambda m, a, o, k=k: out.__setitem__(k, o)) for k, b in enumerate(blocks, 1)]
    try:
        model(x, t)
    finally:
        for h in handles:
            h.remove()
    return out


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a re-run of the student would warn
        return fn(*args, **kwargs)


def grads(module: nn.Module) -> bool:
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters())


# ---------------------------------------------------------------- LayerSync
def test_layersync_equals_the_hand_computed_negative_cosine_of_two_blocks():
    model = ToyDenoiser()
    ls = LayerSync(model, student_layer=2, target_layer=4, adapter=TOY)
    x, t = toy_batch()
    hand = block_outputs(model, model.layers, x, t)
    model(x, t)
    loss = quiet(ls, model, x, t)
    cos = F.cosine_similarity(hand[2], hand[4], dim=-1)  # (B, N): per token, over the feature axis
    torch.testing.assert_close(loss, 0.2 * (1 - cos).mean(), rtol=1e-5, atol=1e-7)
    # The official code's value is -cos; the same gradient, 1 lower.
    torch.testing.assert_close(loss / 0.2 - 1, -cos.mean(), rtol=1e-5, atol=1e-6)
    assert ls.metrics["student_reruns"] == 0 and ls.metrics["cos_sim"] == pytest.approx(float(cos.mean().detach()), rel=1e-5)


def test_layersync_target_block_gets_no_gradient():
    model = ToyDenoiser()
    ls = LayerSync(model, student_layer=2, target_layer=4, adapter=TOY)
    x, t = toy_batch()
    model(x, t)
    quiet(ls, model, x, t).backward()
    assert grads(model.embed) and grads(model.layers[0]) and grads(model.layers[1])
    # Blocks 3 and 4 only shape the (detached) target; block 5 and the output run after it.
    assert not any(grads(m) for m in (model.layers[2], model.layers[3], model.layers[4], model.out))


def test_layersync_with_mlp_head_trains_the_head_and_resumes_exactly():
    model = ToyDenoiser()
    ls = LayerSync(model, 2, 5, head="mlp", loss="mse", weight=lambda step: 0.1 * (step + 1), adapter=TOY)
    x, t = toy_batch()
    opt = torch.optim.SGD([*model.parameters(), *ls.parameters()], lr=0.1)
    for _ in range(2):
        model(x, t)
        loss = quiet(ls, model, x, t)
        loss.backward()
        assert grads(ls.head)
        opt.step(), opt.zero_grad()
    state = copy.deepcopy(ls.state_dict())
    assert ls.step == 2 and set(state) >= {"head.0.weight", "_extra_state"}
    model2 = copy.deepcopy(model)
    again = LayerSync(model2, 2, 5, head="mlp", loss="mse", weight=lambda step: 0.1 * (step + 1), adapter=TOY)
    again.load_state_dict(state)
    model(x, t), model2(x, t)
    torch.testing.assert_close(quiet(again, model2, x, t), quiet(ls, model, x, t), rtol=0, atol=0)
    with pytest.raises(ValueError, match="target_layer: saved 5, here 4"):
        LayerSync(copy.deepcopy(model), 2, 4, head="mlp", adapter=TOY).load_state_dict(state)


@pytest.mark.parametrize("layers, words", [((3, 3), "target_layer=3 (block 3) is not deeper"),
                                           ((4, 2), "target_layer=2 (block 2) is not deeper"),
                                           ((2, 9), "target_layer=9 is out of range")])
def test_layersync_refuses_a_target_that_is_not_deeper(layers, words):
    model = ToyDenoiser()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        LayerSync(model, *layers, adapter=TOY)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


def test_layersync_misuse_another_forward_or_an_in_place_edit_reruns_and_stays_right():
    model = ToyDenoiser()
    ls = LayerSync(model, 1, 3, adapter=TOY)
    x, t = toy_batch()
    hand = block_outputs(model, model.layers, x, t)
    want = 0.2 * (1 - F.cosine_similarity(hand[1], hand[3], dim=-1)).mean()
    model(x, t)
    model(x + 1, t)  # another forward in between
    with pytest.warns(RuntimeWarning, match="different 'x'") as caught:
        torch.testing.assert_close(ls(model, x, t), want, rtol=1e-5, atol=1e-7)
    assert caught[0].filename == __file__  # the warning points at the user's call
    model(x, t)
    ls._capture.record.taps["target"].mul_(2)  # the deeper block's output edited in place
    with pytest.warns(RuntimeWarning, match="changed in place"):
        torch.testing.assert_close(ls(model, x, t), want, rtol=1e-5, atol=1e-7)
    assert ls.metrics["student_reruns"] == 2


# ---------------------------------------------------------------- Dispersive
def test_dispersive_equals_the_hand_computed_log_mean_exp_over_all_pairs():
    model = ToyDenoiser()
    disp = Dispersive(model, layer=3, weight=0.7, temperature=0.5, adapter=TOY)
    x, t = toy_batch(n=5)
    z = block_outputs(model, model.layers, x, t)[3].detach().reshape(5, -1).double()
    size = z.shape[1]
    terms = [math.exp(-float((z[i] - z[j]).pow(2).sum()) / size / 0.5) for i in range(5) for j in range(5)]
    want = 0.7 * math.log(sum(terms) / 25)
    model(x, t)
    loss = quiet(disp, model, x, t)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    assert disp.metrics["disp_loss"] == pytest.approx(want / 0.7, rel=1e-5)


def test_dispersive_gradient_reaches_blocks_up_to_its_layer_only():
    model = ToyDenoiser()
    disp = Dispersive(model, layer=2, adapter=TOY)
    x, t = toy_batch()
    model(x, t)
    quiet(disp, model, x, t).backward()
    assert grads(model.layers[0]) and grads(model.layers[1])
    assert not any(grads(m) for m in (model.layers[2], model.layers[4], model.out))
    assert list(disp.parameters()) == []  # no head


def test_dispersive_refuses_sample_weight_and_changes_nothing():
    model = ToyDenoiser()
    disp = Dispersive(model, adapter=TOY)
    x, t = toy_batch()
    model(x, t)
    record = disp._capture.record
    with pytest.raises(ValueError, match=r"sample_weight=Tensor is not accepted by Dispersive: its loss is one number for the whole batch"):
        disp(model, x, t, sample_weight=torch.ones(5))
    assert disp._capture.record is record and disp.step == 0
    quiet(disp, model, x, t)


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), "1"])
def test_dispersive_refuses_a_bad_temperature(temperature):
    with pytest.raises(ValueError, match=f"temperature={temperature!r} is not accepted: use a finite number > 0"):
        Dispersive(ToyDenoiser(), temperature=temperature, adapter=TOY)


def test_dispersive_of_one_sample_is_zero_so_the_class_refuses_a_batch_of_one():
    from sra_plugin.dispersive import dispersive_loss

    assert float(dispersive_loss(torch.randn(1, 5, 8), 1.0)) == 0.0  # log mean exp(0): nothing to push apart
    model = ToyDenoiser()
    disp = Dispersive(model, adapter=TOY)
    x, t = toy_batch(n=1)
    model(x, t)
    with pytest.raises(ValueError, match="batch of 1"):
        quiet(disp, model, x, t)


# ---------------------------------------------------------------- composition
def count_calls(blocks) -> tuple[list[int], list]:
    counts = [0] * len(blocks)
    handles = [b.register_forward_hook(lambda m, a, o, i=i: counts.__setitem__(i, counts[i] + 1)) for i, b in enumerate(blocks)]
    return counts, handles


def test_sra_layersync_dispersive_share_one_forward_and_one_teacher_pass():
    model = tiny_sit(class_dropout_prob=0.0)
    sra = SelfRepresentationAlignment(model, 2, 4)
    ls = LayerSync(model, 2, 5)
    disp = Dispersive(model, layer=3)
    sra2 = LatentAlignment(model, layer=2)
    x_t, x_s, t, s, y, v = flow_batch()
    x0 = torch.randn_like(x_t)
    student, h1 = count_calls(model.blocks)
    teacher, h2 = count_calls(sra.teacher.blocks)
    out = model(x_t, t, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = (out - v).pow(2).mean() + sra(model, x_t, x_s, t, s, y) + ls(model, x_t, t, y) + disp(model, x_t, t, y) \
            + sra2(model, x_t, x0, t, y)
    assert student == [1] * 6  # the student's blocks ran once: the user's forward
    assert teacher == [1] * 4 + [0, 0]  # one teacher pass, stopped after block 4
    loss.backward()
    assert [o.metrics["student_reruns"] for o in (sra, ls, disp, sra2)] == [0, 0, 0, 0]
    assert sra.metrics["loss"] != ls.metrics["loss"] and "disp_loss" in disp.metrics and "teacher_norm" in sra.metrics
    assert sra._capture.record is None and ls._capture.record is None  # everyone took it: forgotten
    # One set of hooks: each tapped block carries one hook of the package, whatever the number of objectives.
    assert [len(b._forward_hooks) for b in model.blocks] == [1, 2, 2, 1, 2, 1]  # the counter + ours on blocks 2, 3, 5
    for h in h1 + h2:
        h.remove()


def test_without_a_user_forward_the_student_reruns_once_for_everyone():
    model = tiny_sit(class_dropout_prob=0.0)
    disp = Dispersive(model, layer=2)
    ls = LayerSync(model, 2, 4)
    x_t, x_s, t, s, y, _ = flow_batch()
    student, handles = count_calls(model.blocks)
    with pytest.warns(RuntimeWarning, match="found no student features"):
        a = disp(model, x_t, t, y)
    b = quiet(ls, model, x_t, t, y)  # shares the re-run, which went up to block 4 (the deepest tap)
    assert student == [1, 1, 1, 1, 0, 0]
    assert (disp.student_reruns, ls.student_reruns) == (1, 0)
    (a + b).backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    for h in handles:
        h.remove()


def test_removing_one_objective_keeps_the_others_hooks():
    model = tiny_sit(class_dropout_prob=0.0)
    ls = LayerSync(model, 2, 4)
    disp = Dispersive(model, layer=4)
    x_t, _, t, _, y, _ = flow_batch()
    ls.remove()
    assert [len(b._forward_hooks) for b in model.blocks] == [0, 0, 0, 1, 0, 0]
    model(x_t, t, y)
    quiet(disp, model, x_t, t, y)
    del disp
    import gc

    gc.collect()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_no_activation_outlives_the_step():
    import gc
    import weakref

    model = tiny_sit(class_dropout_prob=0.0)
    sra, ls, disp = SelfRepresentationAlignment(model, 2, 4), LayerSync(model, 2, 5), Dispersive(model, layer=3)
    x_t, x_s, t, s, y, v = flow_batch()
    kept = []
    for k in (1, 2, 4):
        model.blocks[k].register_forward_hook(lambda m, a, o: kept.append(weakref.ref(o)))
    out = model(x_t, t, y)
    for objective in (sra, ls, disp):  # every view of the record is read, as tests and users may do
        assert objective._capture.record.tokens is not None
    loss = (out - v).pow(2).mean() + sra(model, x_t, x_s, t, s, y) + ls(model, x_t, t, y) + disp(model, x_t, t, y)
    loss.backward()
    del out, loss
    gc.collect()
    assert len(kept) == 3 and all(ref() is None for ref in kept)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_model_with_its_objectives_works_alone(how):
    import pickle

    model = ToyDenoiser()
    ls, disp = LayerSync(model, 1, 4, head="linear", adapter=TOY), Dispersive(model, layer=2, adapter=TOY)
    x, t = toy_batch()
    group = (model, ls, disp)
    model2, ls2, disp2 = copy.deepcopy(group) if how == "deepcopy" else pickle.loads(pickle.dumps(group))
    assert ls2._capture.capture is disp2._capture.capture  # the copies share one capture, on the copy
    assert ls2._capture.capture is not ls._capture.capture
    model2(x, t)
    assert ls._capture.record is None and disp._capture.record is None  # the copy's forward feeds the copy only
    a2, b2 = quiet(ls2, model2, x, t), quiet(disp2, model2, x, t)
    model(x, t)
    torch.testing.assert_close((a2, b2), (quiet(ls, model, x, t), quiet(disp, model, x, t)), rtol=0, atol=0)


def test_layer_report_suggests_a_layersync_pair_from_the_probes():
    import numpy as np

    from sra_plugin.report import LayerReport

    def report(probe):
        return LayerReport(cka=np.eye(len(probe)), student_probe=np.array(probe), teacher_probe=np.array(probe),
                           pool="mean", n_images=8, t_mean=0.5, s_mean=0.4)

    rep = report([0.2, 0.3, 0.5, 0.6, 0.9, 0.7, 0.4, 0.3])  # the probe at t peaks at block 5
    assert rep.layersync_pair() == (2, 5)
    assert rep.layersync_pair()[1] == 5 and "LayerSync(model, " in rep.table() and rep.to_dict()["layersync_pair"][1] == 5
    assert report([0.9, 0.1]).layersync_pair() == (1, 2)  # a peak at block 1 leaves no earlier block: the next one
    assert LayerReport(cka=np.eye(3), student_probe=None, teacher_probe=None, pool="mean", n_images=8,
                       t_mean=0.5, s_mean=0.4).layersync_pair() is None


def test_dispersive_state_carries_the_step_and_refuses_another_configuration():
    model = ToyDenoiser()
    disp = Dispersive(model, layer=2, temperature=0.5, weight=lambda step: 0.1 * step, adapter=TOY)
    x, t = toy_batch()
    for _ in range(3):
        model(x, t)
        quiet(disp, model, x, t)
    state = disp.state_dict()
    again = Dispersive(copy.deepcopy(model), layer=2, temperature=0.5, weight=lambda step: 0.1 * step, adapter=TOY)
    again.load_state_dict(state)
    assert again.step == 3 and again.current_weight() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="temperature: saved 0.5, here 1.0"):
        Dispersive(copy.deepcopy(model), layer=2, adapter=TOY).load_state_dict(state)
