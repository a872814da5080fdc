"""Guards of the core, each shown to catch its deliberately wrong version (issue 10; the idea of
``tests/broken_noisegap.py`` applied to the core).

Each guard is a plain check (``check_*``) run by its own test. ``test_broken_core_is_caught`` runs the
same check again with one piece of the core replaced (monkeypatched) by a broken version from
``BROKEN`` and requires the check to fail: a test that passed there would be one that cannot fail.

- ``eval_mode`` must restore every module's train/eval mode after the teacher pass (with a shared-weight
  teacher the pass runs on the student's own modules; a user's EMA may be kept in train mode);
- an ``ema_pytorch.EMA``-like wrapper (class ``EMA`` with ``.ema_model``) and
  ``torch.optim.swa_utils.AveragedModel`` passed as ``teacher=`` are unwrapped to the model inside;
- integer buffers (here a token order used in forward) are copied into the owned teacher at first use
  and at every update;
- the loss runs with autocast off: a custom loss doing a matmul under CPU bf16 autocast sees float32
  and computes in float32.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

import sra_plugin.losses as losses_module
import sra_plugin.targets as targets_module
import sra_plugin.teacher as teacher_module
import sra_plugin.wrappers as wrappers_module
from examples.models import SiT
from sra_plugin import SelfRepresentationAlignment
from tests._models import TINY, flow_batch, optimizer_step, randomise_gates, tiny_sit


def block_output(model: nn.Module, k: int, x, t, y) -> torch.Tensor:
    out = []
    handle = model.blocks[k - 1].register_forward_hook(lambda m, a, o: out.append(o.clone()))
    try:
        model(x, t, y)
    finally:
        handle.remove()
    return out[0]


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


# ---------------------------------------------------------------- eval_mode restores modes
def check_modes_are_restored() -> None:
    x_t, x_s, t, s, y, _ = flow_batch()
    # A shared-weight teacher (most parameters frozen, as with LoRA): the teacher pass runs on the
    # student's own modules, which must come back in training mode (and a submodule the user keeps
    # in eval mode, in eval mode).
    model = tiny_sit(class_dropout_prob=0.0)
    model.requires_grad_(False)
    model.blocks[0].requires_grad_(True)
    model.t_embedder.eval()
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    assert sra.ema.shared
    mode_in_pass = []
    model.blocks[3].register_forward_pre_hook(lambda m, a: mode_in_pass.append(m.training))
    before = modes(model)
    model(x_t, t, y)
    sra(model, x_t, x_s, t, s, y)
    assert mode_in_pass == [True, False]  # the student's forward trains, the teacher pass is in eval mode
    assert modes(model) == before

    # The user's own EMA, kept in train mode with one submodule in eval mode.
    model = tiny_sit(class_dropout_prob=0.0)
    ema = copy.deepcopy(model)
    ema.blocks[1].eval()
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, teacher=ema)
    before = modes(ema)
    model(x_t, t, y)
    sra(model, x_t, x_s, t, s, y)
    assert modes(ema) == before


def test_teacher_pass_restores_every_modules_mode():
    check_modes_are_restored()


@contextmanager
def eval_mode_without_restore(module: nn.Module):
    module.eval()
    yield module


# ---------------------------------------------------------------- EMA wrappers as teacher=
class EMA(nn.Module):
    """The shape of ``ema_pytorch.EMA``: the online model kept out of the module tree, the average in
    ``.ema_model``, bookkeeping buffers of its own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.online_model = [model]
        self.ema_model = copy.deepcopy(model)
        self.ema_model.requires_grad_(False)
        self.register_buffer("initted", torch.tensor(True))
        self.register_buffer("step", torch.tensor(0))

    def forward(self, *args, **kwargs):
        return self.ema_model(*args, **kwargs)


def check_ema_wrappers_are_unwrapped() -> None:
    model = tiny_sit(class_dropout_prob=0.0)
    averaged = copy.deepcopy(model)
    with torch.no_grad():  # an EMA that has moved away from the model, so that using it is visible
        for p in averaged.parameters():
            p.add_(0.05 * torch.randn_like(p))
    wrappers = {"ema_pytorch.EMA": EMA(averaged), "AveragedModel": AveragedModel(averaged)}
    inners = {"ema_pytorch.EMA": wrappers["ema_pytorch.EMA"].ema_model, "AveragedModel": wrappers["AveragedModel"].module}
    x_t, x_s, t, s, y, _ = flow_batch()

    def loss_with(teacher) -> torch.Tensor:
        torch.manual_seed(3)  # the same head each time
        sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, teacher=teacher)
        model(x_t, t, y)
        loss = sra(model, x_t, x_s, t, s, y)
        sra.remove()
        return loss

    want = loss_with(averaged)
    assert not torch.allclose(want, loss_with("ema"))  # the user's EMA, not the model's weights
    for name, wrapper in wrappers.items():
        torch.manual_seed(3)
        sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, teacher=wrapper)
        assert sra.teacher is inners[name], name
        sra.remove()
        torch.testing.assert_close(loss_with(wrapper), want, rtol=0, atol=0, msg=name)


def test_ema_pytorch_and_averaged_model_teachers_are_unwrapped():
    check_ema_wrappers_are_unwrapped()


def inner_without_ema_wrappers(module: nn.Module) -> nn.Module | None:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(module, (DistributedDataParallel, DataParallel)):
        return module.module
    orig = getattr(module, "_orig_mod", None)
    return orig if isinstance(orig, nn.Module) else None


# ---------------------------------------------------------------- integer buffers in the owned teacher
class OrderedSiT(SiT):
    """SiT with an integer buffer that matters: the order in which patches become tokens."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("token_order", torch.arange(self.x_embedder.num_patches))

    def forward(self, x, t, y):
        x = self.x_embedder(x)[:, self.token_order] + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def check_integer_buffers_reach_the_owned_teacher() -> None:
    torch.manual_seed(0)
    model = randomise_gates(OrderedSiT(**{**TINY, "class_dropout_prob": 0.0}))
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, ema_decay=0.5)
    assert not sra.ema.shared
    n = model.token_order.numel()
    g = torch.Generator().manual_seed(1)
    model.token_order.copy_(torch.randperm(n, generator=g))  # e.g. a checkpoint loaded after sra was built
    x_t, x_s, t, s, y, _ = flow_batch()
    model(x_t, t, y)
    loss = sra(model, x_t, x_s, t, s, y)
    assert torch.equal(sra.teacher.token_order, model.token_order)
    # First use: the teacher is the model itself (weights and token order), in eval mode.
    student = block_output(model, sra.student_layer, x_t, t, y)
    model.eval()
    with torch.no_grad():
        target = block_output(model, sra.teacher_layer, x_s, s, y)
    model.train()
    torch.testing.assert_close(loss, 0.2 * F.smooth_l1_loss(sra.head(student), target, beta=0.05), rtol=1e-5, atol=1e-7)
    # The order changes during training: the next update copies it.
    model.token_order.copy_(torch.randperm(n, generator=g))
    optimizer_step(model)
    sra.update_teacher()
    assert torch.equal(sra.teacher.token_order, model.token_order)


def test_integer_buffers_are_copied_into_the_owned_teacher():
    check_integer_buffers_reach_the_owned_teacher()


@torch.no_grad()
def update_ema_floats_only(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    params = list(teacher.parameters())
    floats = [b for b in teacher.buffers() if b.is_floating_point()]
    sources = [*student.parameters(), *(b for b in student.buffers() if b.is_floating_point())]
    for target, source in zip([*params, *floats], sources):
        target.lerp_(source.to(target.dtype), 1 - decay)


@torch.no_grad()
def init_floats_only(self) -> None:
    self.check_structure()
    if self._ready:
        return
    mine = [*self.model.parameters(), *(b for b in self.model.buffers() if b.is_floating_point())]
    theirs = [*self._student.parameters(), *(b for b in self._student.buffers() if b.is_floating_point())]
    for target, source in zip(mine, theirs):
        target.copy_(source)
    self.initted.fill_(True)
    self._ready = True


# ---------------------------------------------------------------- the loss runs without autocast
def matmul_loss(seen: list):
    """A custom per-token loss built on a matmul (an op autocast runs in bf16): squared error via a dot product."""

    def loss(pred, target):
        diff = pred - target
        per_token = (diff.unsqueeze(-2) @ diff.unsqueeze(-1)).reshape(diff.shape[:-1]) / diff.shape[-1]
        seen.append((pred.dtype, target.dtype, per_token.dtype))
        return per_token

    return loss


def check_loss_runs_without_autocast() -> None:
    seen: list = []
    model = tiny_sit(class_dropout_prob=0.0)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, loss=matmul_loss(seen))
    x_t, x_s, t, s, y, _ = flow_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x_t, t, y)
        loss = sra(model, x_t, x_s, t, s, y)
    assert seen == [(torch.float32, torch.float32, torch.float32)]
    assert loss.dtype == torch.float32


def test_custom_loss_sees_float32_under_autocast():
    check_loss_runs_without_autocast()


# ---------------------------------------------------------------- the mutants
BROKEN = {
    "eval_mode does not restore modes": (check_modes_are_restored, targets_module, "eval_mode", eval_mode_without_restore),
    "EMA / AveragedModel not unwrapped": (check_ema_wrappers_are_unwrapped, wrappers_module, "_inner", inner_without_ema_wrappers),
    "update skips integer buffers": (check_integer_buffers_reach_the_owned_teacher, teacher_module, "update_ema_", update_ema_floats_only),
    "first-use init skips integer buffers": (check_integer_buffers_reach_the_owned_teacher, teacher_module.EMATeacher,
                                             "init_if_needed", init_floats_only),
    "no autocast guard in the loss": (check_loss_runs_without_autocast, losses_module, "no_autocast", lambda device_type: nullcontext()),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_core_is_caught(name, monkeypatch):
    check, owner, attribute, broken = BROKEN[name]
    assert hasattr(owner, attribute), f"{owner.__name__}.{attribute} is gone: update this mutant"
    monkeypatch.setattr(owner, attribute, broken)
    with pytest.raises(Exception):  # an assertion of the check, or the error the broken code causes
        check()
