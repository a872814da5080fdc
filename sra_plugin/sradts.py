"""SRA-DTS: Self-Representation Alignment with two token groups at their own times, attention separated
(the SRA authors' ``SiT-SRA_DTS_AS`` code, ``scripts/train.sh``), for an unmodified model.

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

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .config import MethodConfig, option, shown
from .groups import check_mask_ratio, check_separate, check_support, ddp_caller, draw_groups, group_sizes, refuse_distributed, token_passes
from .losses import build_loss
from .noise import NoiseGap
from .registry import Adapter, ModelCall
from .student import Objective, Weight, head_name, loss_name, resolve_objective
from .targets import SelfTeaching, Step

__all__ = ["SRADTS", "SRADTSConfig", "group_sizes", "TEACHER_LABELS"]

TEACHER_LABELS = ("given", "student")
"""``"given"``: the teacher gets the conditioning as passed to the call (in eval mode a DiT/SiT drops no
label), as the official code does. ``"student"``: the labels the student's passes used, after its CFG
dropout (what ``SelfRepresentationAlignment`` does)."""


@dataclass(frozen=True)
class SRADTSConfig(MethodConfig):
    """SRA-DTS's options as resolved (the teacher's kind adds its part of the saved identity)."""

    text = ("blocks {student_layer}->{teacher_layer} of {depth}, mask_ratio={mask_ratio}, max_gap={max_gap}, loss={loss!r}, "
            "head={head!r}, teacher_labels={teacher_labels!r}, separate={separate}")

    student_layer: int = option()
    teacher_layer: int = option()
    depth: int = option()
    head: str = option()
    mask_ratio: float = option()
    max_gap: float = option()
    teacher_labels: str = option()
    separate: bool = option(old=True)  # states saved before separate=False existed
    loss: str = shown()
    ema_decay: float = shown()


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

    ``separate=False`` (Self-Flow style, not the official recipe): the same groups, draws, head and loss, but
    ONE pass of the model in which every token has its group's time (``t_g`` for the student, ``s_g`` for the
    teacher) and all tokens attend to each other; the timestep embedding and every adaLN modulation act per
    token (``protocols.RunsPerTokenTime``). The adapter swaps the forwards of the modules concerned on the
    model instance for the pass and restores them after it.

    Several processes: with ``separate=False``, ``model = DDP(model)`` and ``dts = DDP(dts)`` (or ``dts`` bare: it
    then keeps its head the same on every rank itself), called as ``dts(model, ...)`` with the wrapper: the
    student's pass runs through the wrapper's forward, so the gradients are averaged.

    Families: with ``separate=True`` the DiT/SiT family and the diffusers Flux, SD3/SD3.5, QwenImage, Wan,
    PixArt and DiT transformers (``sra_plugin.adapters.diffusers``; conditioning by keyword, ``x0``/``noise``
    in the model's input layout); with ``separate=False`` the DiT/SiT family and diffusers Wan, Flux and
    SD3/SD3.5. Other families are refused by name, as are FSDP, and DDP with ``separate=True`` (the group
    passes run the model's modules, not its wrapper's forward).
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
            refuse_distributed(model, separate is not False)
        check_separate(separate)
        student, adapter, blocks, indices, weight = resolve_objective(
            model, adapter, weight, student_layer=student_layer, teacher_layer=teacher_layer)
        check_support(adapter, student, separate)
        student_index, teacher_index = self._block_pair(indices, student_layer, teacher_layer)
        check_mask_ratio(mask_ratio)
        gap = NoiseGap(max_gap, lo=0.0, hi=1.0)  # checks max_gap
        if teacher_labels not in TEACHER_LABELS:
            raise ValueError(f"teacher_labels={teacher_labels!r} is not accepted: use one of {TEACHER_LABELS}")
        build_loss(loss)
        dims = self._set_teacher(teacher, student, adapter, blocks, (student_index, teacher_index), ema_decay, ema_dtype, None)
        if self._user_teacher is not None:
            check_support(adapter, self._user_teacher, separate, "teacher")
        self.gap = gap
        self.last_draw: dict[str, Tensor] = {}
        config = SRADTSConfig(student_index, teacher_index, len(blocks), head_name(head), float(mask_ratio), gap.max_gap,
                              teacher_labels, separate, loss_name(loss), float(ema_decay))
        self._setup(student, adapter, config, {"student": student_index}, head=head, dims=dims, loss=loss, weight=weight,
                    check_finite=check_finite)

    taps_from_forward = False  # it runs the model's passes itself: no hooks
    compile_teacher = False

    # ------------------------------------------------------------------ the step
    def forward(self, model: nn.Module, x0: Tensor, noise: Tensor, *args: Any, groups: Tensor | None = None,
                t: Tensor | None = None, s: Tensor | None = None, generator: torch.Generator | None = None,
                sample_weight: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """One SRA-DTS step: ``(pred, align)``. ``pred``: the model's prediction for every token, in its own
        output layout (its diffusion loss is against ``noise - x0``); ``align``: the weighted alignment loss.
        ``args``/``kwargs``: the model's conditioning (a DiT/SiT's class labels ``y``)."""
        self._check_model(model)
        refuse_distributed(model, self.separate)
        caller = None if self.separate else ddp_caller(model, self._student, self._warned)
        student, adapter = self._student, self.adapter
        draw = draw_groups(adapter, student, x0, noise, groups, t, s, generator, self.mask_ratio, self.gap)
        self._check_sample_weight(sample_weight, x0.shape[0])
        weight = self._begin_call(model)

        passes = token_passes(adapter, student, x0, noise, draw.t, draw, args, kwargs, self.student_layer, True,
                              self.separate, caller)
        pred, student_tokens = passes.output, passes.taps[self.student_layer]
        self.last_draw = {"groups": draw.groups, "t": draw.t.detach(), "s": draw.s.detach()}

        if self._is_zero(weight):
            align = self._skipped(x0.device)
        else:
            t_args, t_kwargs = (passes.args, passes.kwargs) if self.teacher_labels == "student" else (args, kwargs)
            with self._source.running() as module:
                taught = token_passes(adapter, module, x0, noise, draw.s, draw, t_args, t_kwargs, self.teacher_layer,
                                      False, self.separate)
            target = taught.taps[self.teacher_layer]
            step = Step(model, student, x0, draw.t, ModelCall(args, kwargs), {"s": draw.s}, {"student": student_tokens})
            align = self._align(step, target, weight, sample_weight)
        self._count_training_call()
        return pred, align
