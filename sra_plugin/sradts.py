"""SRA-DTS: Self-Representation Alignment with two token groups at their own times, attention separated
(the SRA authors' ``SiT-SRA_DTS_AS`` code, ``scripts/train.sh``), for an unmodified DiT/SiT.

The official step, restated (``loss.py`` ``SRALoss`` with ``--mask-ratio 0.25 --dual-time-scheduling
--attention-separation --teacher-mask --teacher-t sra --loss-type cos --align-weight 0.5``, ``model.py``,
``train.py``):

- each sample's T tokens are split by a random permutation into group 0 of ``round(0.25 T)`` tokens (the
  official count: ``floor`` of each group's share, the remainder to the larger fractional part; 64 of 256)
  and group 1, the rest;
- each group draws its own ``t_g ~ U(0, 1)`` per sample; one noise ``eps``; a token's input is
  ``(1 - t_g) x0 + t_g eps`` of its group; the target of every token is ``eps - x0``;
- in every block a token attends only to its own group's tokens (student and teacher passes);
- the teacher, the EMA model in eval mode without gradient, sees the same groups at
  ``s_g = clamp(t_g - 0.2 u_g, 0, 1)``, ``u_g ~ U(0, 1)`` per sample and group, and the class labels as the
  data loader gave them (the EMA is in eval mode: it drops none, while the student's forward dropped 10%
  for classifier-free guidance);
- the student's block 3 (of SiT-B/2's 12) goes through ``Linear(D, 2D) -> SiLU -> Linear(2D, D)``; the
  teacher's block 8 is raw; both are in the full token order (positions kept);
- alignment ``1 - F.cosine_similarity(student, teacher)`` with torch's default ``dim=1`` on ``(B, T, D)``
  (over the token axis, per channel), averaged, weight 0.5; the denoising loss is the MSE of every
  token's prediction against ``eps - x0``; EMA decay 0.9999 from an exact copy.

Attention separated between groups with per-token time is the same as one pass of the model per group
on that group's tokens only, at that group's time (adaLN modulation and the output layer act per token).
Here the adapter runs those passes on the user's unmodified model (``protocols.RunsTokenGroups``) and
the outputs are put back in token order.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from . import capture as capture_module
from ._checks import is_real
from dataclasses import dataclass

from .config import MethodConfig, option, shown
from .losses import build_loss
from .noise import NoiseGap
from .protocols import RunsTokenGroups
from .registry import Adapter, ModelCall
from .student import Objective, Weight, head_name, loss_name, resolve_objective
from .targets import SelfTeaching, Step, TeacherTarget

__all__ = ["SRADTS", "SRADTSConfig", "group_sizes", "TEACHER_LABELS"]

TEACHER_LABELS = ("given", "student")
"""``"given"``: the teacher gets the conditioning as passed to the call (in eval mode a DiT/SiT drops no
label), as the official code does. ``"student"``: the labels the student's passes used, after its CFG
dropout (what ``SelfRepresentationAlignment`` does)."""


@dataclass(frozen=True)
class SRADTSConfig(MethodConfig):
    """SRA-DTS's options as resolved (the teacher's kind adds its part of the saved identity)."""

    student_layer: int = option()
    teacher_layer: int = option()
    depth: int = option()
    head: str = option()
    mask_ratio: float = option()
    max_gap: float = option()
    teacher_labels: str = option()
    loss: str = shown()
    ema_decay: float = shown()


def group_sizes(mask_ratio: float, tokens: int) -> tuple[int, int]:
    """The two groups' token counts for ``tokens`` tokens, as the official ``_compute_group_counts``:
    the floor of each share, the token left over to the group with the larger fractional part (a tie,
    which the official code leaves to ``torch.topk``, to group 0)."""
    expected = (mask_ratio * tokens, (1.0 - mask_ratio) * tokens)
    counts = [math.floor(e) for e in expected]
    if sum(counts) < tokens:
        fractions = [e - c for e, c in zip(expected, counts)]
        counts[0 if fractions[0] >= fractions[1] else 1] += tokens - sum(counts)
    return counts[0], counts[1]


@contextmanager
def _captures_paused(model: nn.Module) -> Iterator[None]:
    """The passes here run the model's blocks outside its forward: another objective's capture on the same
    model must not take their tokens for a training forward's."""
    with ExitStack() as stack:
        for capture in list(capture_module._CAPTURES.values()):
            if capture.model is model:
                stack.enter_context(capture.pausing())
        yield


def _refuse_distributed(model: nn.Module) -> None:
    """The passes run the model's modules, not its wrapper's forward: DDP would not synchronise the
    gradients (its reducer is armed in its forward) and FSDP would not gather the root's weights."""
    from torch.nn.parallel import DistributedDataParallel

    kinds = [DistributedDataParallel]
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        kinds += [FSDPModule, FullyShardedDataParallel]
    except ImportError:  # torch without FSDP
        pass
    found = [m for m in (model, getattr(model, "module", None)) if isinstance(m, tuple(kinds))]
    if found:
        raise ValueError(
            f"model={type(found[0]).__name__} is not supported by SRADTS yet: its per-group passes run the model's "
            "modules outside the wrapper's forward, so DDP would not synchronise gradients and FSDP would not gather "
            "weights; train on one process, or with the bare model"
        )


class SRADTS(SelfTeaching, Objective):
    """SRA-DTS (the SRA authors' ``SiT-SRA_DTS_AS``): two token groups per sample at their own times,
    attention separated, the student's block aligned through a head to the EMA teacher's later block on
    the same groups at less noisy times.

    Usage (this objective runs the step's forward itself; ``pred`` is the model's prediction for every token
    in its own output layout)::

        dts = SRADTS(model)                         # SiT-B/2 defaults: blocks 3 -> 8 of 12, cosine over tokens x 0.5
        pred, align = dts(model, x0, noise, y)      # groups, t, s drawn here (or given: groups=, t=, s=)
        loss = ((pred - (noise - x0)) ** 2).mean() + align
        loss.backward(); opt.step(); opt.zero_grad()
        dts.update_teacher()

    Layers are 1-based block numbers, negative from the end, or fractions of depth (defaults 0.25 and 2/3:
    3 and 8 of 12). ``groups``: ``(B, T)`` integer ids 0/1 with exactly ``group_sizes(mask_ratio, T)[0]``
    zeros per row; ``t``, ``s``: ``(B, 2)`` times in [0, 1] per sample and group (t = 1 is noise). Left out,
    they are drawn as the official code does (``generator=`` makes the draw reproducible); the last draw is
    in ``last_draw``. ``teacher_labels`` (``TEACHER_LABELS``): ``"given"`` (the official behaviour) or
    ``"student"``. The teacher: ``"ema"`` (an owned EMA: a full copy, or shared weights with an EMA of the
    trainable ones for LoRA) or the EMA module the user keeps.

    Not supported in this version: models outside the DiT/SiT family (refused by name), per-token time
    without separation (``separate=False``), DDP/FSDP wrapping (the passes run the model's modules, not
    its wrapper's forward).
    """

    def __init__(
        self,
        model: nn.Module,
        student_layer: int | float = 0.25,
        teacher_layer: int | float = 2 / 3,
        teacher: str | nn.Module = "ema",
        mask_ratio: float = 0.25,
        max_gap: float = 0.2,
        loss: str | Callable[[Tensor, Tensor], Tensor] = "cosine_tokens",
        weight: Weight = 0.5,
        head: str | nn.Module = "mlp",
        ema_decay: float = 0.9999,
        teacher_labels: str = "given",
        separate: bool = True,
        adapter: str | Adapter | None = None,
        check_finite: bool = False,
        ema_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if isinstance(model, nn.Module):
            _refuse_distributed(model)
        if separate is not True:
            raise ValueError(
                f"separate={separate!r} is not supported: SRADTS runs each token group in a pass of its own "
                "(attention separated, the official recipe); per-token time in one shared pass is not implemented"
            )
        student, adapter, blocks, indices, weight = resolve_objective(
            model, adapter, weight, student_layer=student_layer, teacher_layer=teacher_layer)
        family = f"model={type(student).__name__} (adapter {adapter.name!r})"
        if not isinstance(adapter, RunsTokenGroups):
            raise TypeError(
                f"{family} cannot run SRADTS: its adapter has no per-group pass (sra_plugin.protocols.RunsTokenGroups). "
                "SRADTS supports the DiT/SiT family (adapter 'dit'); other families (Flux, SD3, Wan, U-ViT, ...) are not supported"
            )
        reason = adapter.group_support(student)
        if reason is not None:
            raise ValueError(f"{family} cannot run SRADTS: {reason}")
        student_index, teacher_index = indices["student_layer"], indices["teacher_layer"]
        if teacher_index < student_index:
            raise ValueError(
                f"teacher_layer={teacher_layer!r} (block {teacher_index}) comes before student_layer={student_layer!r} "
                f"(block {student_index}): the teacher's block must be the same or a later one"
            )
        if not is_real(mask_ratio) or not 0.0 < float(mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio!r} is not accepted: use a number in (0, 1), group 0's share of the tokens")
        gap = NoiseGap(max_gap, lo=0.0, hi=1.0)  # checks max_gap
        if teacher_labels not in TEACHER_LABELS:
            raise ValueError(f"teacher_labels={teacher_labels!r} is not accepted: use one of {TEACHER_LABELS}")
        build_loss(loss)
        teacher_model = self._set_teacher(teacher, student, ema_decay, ema_dtype, None)
        if teacher_model is not student and adapter.group_support(teacher_model) is not None:
            raise ValueError(f"teacher={type(teacher_model).__name__} cannot run SRADTS: {adapter.group_support(teacher_model)}")
        dims = (adapter.dim(student, blocks[student_index - 1]),
                adapter.dim(teacher_model, adapter.blocks(teacher_model)[teacher_index - 1]))
        self.gap = gap
        self.last_draw: dict[str, Tensor] = {}
        config = SRADTSConfig(student_index, teacher_index, len(blocks), head_name(head), float(mask_ratio), gap.max_gap,
                              teacher_labels, loss_name(loss), float(ema_decay))
        self._setup(student, adapter, config, {"student": student_index}, head=head, dims=dims, loss=loss, weight=weight,
                    check_finite=check_finite)

    # ------------------------------------------------------------------ no hooks: this objective runs its passes
    def _attach(self) -> None:
        object.__setattr__(self, "_capture", None)
        object.__setattr__(self, "_warned", set())
        object.__setattr__(self, "_finalizer", lambda: None)
        object.__setattr__(self, "_source", self._make_target())

    def _make_target(self) -> TeacherTarget:
        return self._teacher_target(False)

    # ------------------------------------------------------------------ inputs
    def _check_pair(self, x0: Any, noise: Any) -> None:
        for name, value in (("x0", x0), ("noise", noise)):
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise TypeError(f"{name}={type(value).__name__ if not isinstance(value, Tensor) else value.dtype} is not accepted: use a floating torch.Tensor (B, C, H, W)")
        if noise.shape != x0.shape or noise.dtype != x0.dtype or noise.device != x0.device:
            raise ValueError(
                f"noise of shape {tuple(noise.shape)} ({noise.dtype}, {noise.device}) does not match x0 of shape "
                f"{tuple(x0.shape)} ({x0.dtype}, {x0.device}): use one noise tensor like x0"
            )

    @staticmethod
    def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
        return generator.device if generator is not None else device

    def _groups(self, groups: Any, batch: int, tokens: int, sizes: tuple[int, int], device: torch.device,
                generator: torch.Generator | None) -> Tensor:
        accepted = (f"use an integer tensor of shape ({batch}, {tokens}) holding 0 and 1, with {sizes[0]} zeros "
                    f"(group 0) and {sizes[1]} ones per row (mask_ratio={self.mask_ratio} of {tokens} tokens)")
        if groups is None:
            draw = self._draw_device(generator, device)
            order = torch.rand(batch, tokens, generator=generator, device=draw).argsort(dim=1)
            drawn = torch.ones(batch, tokens, dtype=torch.long, device=draw)
            drawn.scatter_(1, order[:, : sizes[0]], 0)
            return drawn.to(device)
        if not isinstance(groups, Tensor) or groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
            what = type(groups).__name__ if not isinstance(groups, Tensor) else f"a tensor of dtype {groups.dtype}"
            raise TypeError(f"groups={what} is not accepted: {accepted}")
        if tuple(groups.shape) != (batch, tokens):
            raise ValueError(f"groups of shape {tuple(groups.shape)} is not accepted: {accepted}")
        groups = groups.to(device=device, dtype=torch.long)
        bad = (groups != 0) & (groups != 1)
        if bool(bad.any()):
            b, n = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"groups[{b}, {n}]={int(groups[b, n])} is not accepted: {accepted}")
        zeros = (groups == 0).sum(dim=1)
        wrong = (zeros != sizes[0]).nonzero()
        if wrong.numel():
            b = int(wrong[0, 0])
            raise ValueError(f"groups[{b}] has {int(zeros[b])} zeros is not accepted: {accepted}")
        return groups

    @staticmethod
    def _times(name: str, value: Any, batch: int, device: torch.device) -> Tensor:
        accepted = f"use a floating tensor of shape ({batch}, 2): one time in [0, 1] per sample and group (1 = noise)"
        if not isinstance(value, Tensor) or not value.is_floating_point():
            what = type(value).__name__ if not isinstance(value, Tensor) else f"a tensor of dtype {value.dtype}"
            raise TypeError(f"{name}={what} is not accepted: {accepted}")
        if tuple(value.shape) != (batch, 2):
            raise ValueError(f"{name} of shape {tuple(value.shape)} is not accepted: {accepted}")
        bad = ~torch.isfinite(value) | (value < 0) | (value > 1)
        if bool(bad.any()):
            b, g = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name}[{b}, {g}]={float(value[b, g])!r} is not accepted: {accepted}")
        return value.to(device)

    # ------------------------------------------------------------------ the step
    def forward(self, model: nn.Module, x0: Tensor, noise: Tensor, *args: Any, groups: Tensor | None = None,
                t: Tensor | None = None, s: Tensor | None = None, generator: torch.Generator | None = None,
                sample_weight: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """One SRA-DTS step: ``(pred, align)``. ``pred``: the model's prediction for every token, in its own
        output layout (its diffusion loss is against ``noise - x0``); ``align``: the weighted alignment loss.
        ``args``/``kwargs``: the model's conditioning (a DiT/SiT's class labels ``y``)."""
        self._check_model(model)
        _refuse_distributed(model)
        self._check_pair(x0, noise)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator={type(generator).__name__} is not accepted: use a torch.Generator or None")
        student, adapter = self._student, self.adapter
        batch, device = x0.shape[0], x0.device
        tokens = adapter.num_tokens(student, x0)
        sizes = group_sizes(self.mask_ratio, tokens)
        if min(sizes) < 1:
            raise ValueError(f"mask_ratio={self.mask_ratio} leaves a group empty on {tokens} tokens ({sizes}): use more tokens or another ratio")
        groups = self._groups(groups, batch, tokens, sizes, device, generator)
        draw = self._draw_device(generator, device)
        t = self._times("t", t, batch, device) if t is not None else torch.rand(batch, 2, generator=generator, device=draw)
        s = self._times("s", s, batch, device) if s is not None else self.gap.sample(t.to(draw), generator=generator)
        t, s = t.to(device), s.to(device)
        self._check_sample_weight(sample_weight, batch)
        weight = self.current_weight()
        if torch.is_grad_enabled():
            self._optimizer_steps().start(self._student)  # the first look, for the first update_teacher()
        self._source.begin()

        # Each group's token positions, ascending; ``order`` puts the groups' concatenated tokens back in place.
        ranked = groups.argsort(dim=1, stable=True)
        index = [ranked[:, : sizes[0]], ranked[:, sizes[0]:]]
        order = ranked.argsort(dim=1)

        passes = self._passes(student, x0, noise, t, index, args, kwargs, self.student_layer, output=True)
        pred = adapter.unpatchify(student, self._in_order(passes.outputs, order))
        student_tokens = self._in_order(passes.taps[self.student_layer], order)
        self.last_draw = {"groups": groups, "t": t.detach(), "s": s.detach()}

        if self._is_zero(weight):
            align = sum((p.sum() for p in self.head.parameters()), torch.zeros((), device=device)) * 0.0
            nan = float("nan")
            self._metrics = {"loss": 0.0, **{name: nan for name in self.metric_names}, "weight": 0.0}
        else:
            t_args, t_kwargs = (passes.args, passes.kwargs) if self.teacher_labels == "student" else (args, kwargs)
            with self._source.running() as module:
                taught = self._passes(module, x0, noise, s, index, t_args, t_kwargs, self.teacher_layer, output=False)
            target = self._in_order(taught.taps[self.teacher_layer], order)
            if self.check_finite:
                self._check_finite(student_tokens, target)
            step = Step(model, student, x0, t, ModelCall(args, kwargs), {}, {"student": student_tokens})
            align = self._loss(step, target, weight, sample_weight)
            self._metrics["gap"] = (t - s).abs().float().mean().detach()
        self._count_training_call()
        return pred, align

    def _passes(self, module: nn.Module, x0: Tensor, noise: Tensor, times: Tensor, index: list[Tensor],
                args: tuple, kwargs: dict, tap: int, output: bool):
        """One pass per group: inputs ``(1 - t_g) x0 + t_g noise`` (the linear path, t = 1 noise)."""
        shape = (x0.shape[0],) + (1,) * (x0.dim() - 1)
        model_time = x0.dtype if x0.dtype in (torch.float32, torch.float64) else torch.float32
        inputs, group_times = [], []
        for g in range(2):
            tg = times[:, g]
            mix = tg.to(x0.dtype).reshape(shape)
            inputs.append((1 - mix) * x0 + mix * noise)
            group_times.append(tg.to(model_time))
        with _captures_paused(module):
            return self.adapter.group_forward(module, inputs, group_times, index, args, kwargs, (tap,), output)

    @staticmethod
    def _in_order(parts: list[Tensor], order: Tensor) -> Tensor:
        """The groups' tokens ``[(B, n_0, X), (B, n_1, X)]`` back in token order ``(B, T, X)``."""
        joined = torch.cat(parts, dim=1)
        return joined.gather(1, order.unsqueeze(-1).expand(-1, -1, joined.shape[-1]))
