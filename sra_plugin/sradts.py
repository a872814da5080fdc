"""SRA-DTS: Self-Representation Alignment with two token groups at their own times, attention separated
(the SRA authors' ``SiT-SRA_DTS_AS`` code, ``scripts/train.sh``), for an unmodified DiT/SiT or diffusers
transformer (Flux, SD3/SD3.5, QwenImage, Wan, PixArt, DiT).

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

``separate=False`` drops the attention separation (Self-Flow style per-token timesteps, as in "From SRA to
Self-Flow"): one pass of the model over all tokens, each at its group's time, with the time embedding and the
adaLN modulation per token (``protocols.RunsPerTokenTime``; ``adapters/_pertoken.py``).
"""

from __future__ import annotations

import math
import warnings
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from . import capture as capture_module
from ._checks import is_real
from .headsync import HeadSync, distributed_world
from .losses import build_loss
from .noise import NoiseGap
from .protocols import RunsPerTokenTime, RunsTokenGroups, TokenPass
from .registry import Adapter
from .student import Objective, Weight, head_on_model, resolve_objective
from .teacher import EMATeacher, TeacherPass, check_teacher_options, eval_mode

__all__ = ["SRADTS", "group_sizes", "TEACHER_LABELS"]

TEACHER_LABELS = ("given", "student")
"""``"given"``: the teacher gets the conditioning as passed to the call (in eval mode a DiT/SiT drops no
label), as the official code does. ``"student"``: the labels the student's passes used, after its CFG
dropout (what ``SelfRepresentationAlignment`` does)."""


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


def _refuse_distributed(model: nn.Module, separate: bool = True) -> None:
    """The group passes run the model's modules, not its wrapper's forward: DDP would not synchronise the
    gradients (its reducer is armed in its forward) and FSDP would not gather the root's weights. The
    per-token pass (``separate=False``) runs the model's own forward, through a DDP wrapper when given one."""
    from torch.nn.parallel import DistributedDataParallel

    kinds = [DistributedDataParallel] if separate else []
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
            "weights; train on one process, or with the bare model (DDP works with separate=False)"
        )


class SRADTS(Objective):
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
    token (``protocols.RunsPerTokenTime``: the reference DiT/SiT, diffusers Wan natively, diffusers Flux and
    SD3/SD3.5, whose text tokens get the mean of the image tokens' time embedding). The adapter swaps the
    forwards of the modules concerned on the model instance for the pass and restores them after it.

    Several processes: with ``separate=False``, ``model = DDP(model)`` and ``dts = DDP(dts)`` (or ``dts`` bare: it
    then keeps its head the same on every rank itself), called as ``dts(model, ...)`` with the wrapper: the
    student's pass runs through the wrapper's forward, so the gradients are averaged.

    Families: with ``separate=True`` the DiT/SiT family and the diffusers Flux, SD3/SD3.5, QwenImage, Wan,
    PixArt and DiT transformers (``sra_plugin.adapters.diffusers``; conditioning by keyword, ``x0``/``noise``
    in the model's input layout); with ``separate=False`` the DiT/SiT family and diffusers Wan, Flux and
    SD3/SD3.5. Other families are refused by name, as are FSDP, and DDP with ``separate=True`` (the group
    passes run the model's modules, not its wrapper's forward).
    """

    metric_names = ("align_loss", "cos_sim", "student_norm", "teacher_norm", "gap")
    target_name = "teacher"
    _identity_defaults = {"separate": True}  # states saved before separate=False existed
    _transient = (*Objective._transient, "_teacher_pass")

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
            _refuse_distributed(model, separate is not False)
        if not isinstance(separate, bool):
            raise TypeError(
                f"separate={separate!r} is not accepted: use True (one pass per token group, attention separated: the "
                "official recipe) or False (one pass, every token at its group's time, full attention: Self-Flow style)"
            )
        student, adapter, blocks, indices, weight = resolve_objective(
            model, adapter, weight, student_layer=student_layer, teacher_layer=teacher_layer)
        family = f"model={type(student).__name__} (adapter {adapter.name!r})"
        support = self._support(adapter, family, separate)
        reason = support(student)
        if reason is not None:
            raise ValueError(f"{family} cannot run SRADTS(separate={separate}): {reason}")
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
        loss_fn = build_loss(loss)
        user_teacher = check_teacher_options(teacher, student, ema_decay, ema_dtype, None)
        if user_teacher is not None and support(user_teacher) is not None:
            raise ValueError(f"teacher={type(user_teacher).__name__} cannot run SRADTS(separate={separate}): {support(user_teacher)}")
        teacher_model = user_teacher if user_teacher is not None else student
        dim = adapter.dim(student, blocks[student_index - 1])
        target_dim = adapter.dim(teacher_model, adapter.blocks(teacher_model)[teacher_index - 1])
        head_module = head_on_model(head, dim, target_dim, student)

        self.adapter = adapter
        self.depth = len(blocks)
        self.taps = {"student": student_index}
        self.teacher_layer = teacher_index
        self.mask_ratio = float(mask_ratio)
        self.separate = separate
        self.gap = gap
        self.max_gap = gap.max_gap
        self.teacher_labels = teacher_labels
        self.ema_decay = float(ema_decay)
        self.last_draw: dict[str, Tensor] = {}
        self._set_objective(head, head_module, loss, loss_fn, weight, check_finite)
        self.ema: EMATeacher | None = EMATeacher(student, ema_decay, ema_dtype) if user_teacher is None else None
        object.__setattr__(self, "_user_teacher", user_teacher)
        self._init_student(student)

    @staticmethod
    def _support(adapter: Adapter, family: str, separate: bool) -> Callable[[nn.Module], str | None]:
        """The adapter's check for the passes ``separate`` asks for; an adapter without them is refused."""
        if separate:
            if not isinstance(adapter, RunsTokenGroups):
                raise TypeError(
                    f"{family} cannot run SRADTS: its adapter has no per-group pass (sra_plugin.protocols.RunsTokenGroups). "
                    "SRADTS supports the DiT/SiT family (adapter 'dit') and the diffusers Flux, SD3/SD3.5, QwenImage, Wan, "
                    "PixArt and DiT transformers; other families (U-ViT, MMDiT, timm ViTs, ...) are not supported"
                )
            return adapter.group_support
        if not isinstance(adapter, RunsPerTokenTime):
            raise TypeError(
                f"{family} cannot run SRADTS(separate=False): its adapter has no per-token time pass "
                "(sra_plugin.protocols.RunsPerTokenTime); supported: the DiT/SiT family, diffusers Wan, Flux and SD3"
            )
        return adapter.per_token_support

    # ------------------------------------------------------------------ no hooks: this objective runs its passes
    def _attach(self) -> None:
        object.__setattr__(self, "_capture", None)
        object.__setattr__(self, "_warned", set())
        object.__setattr__(self, "_finalizer", lambda: None)
        # Several processes without DDP(self): rank 0's head, and head gradients averaged over the ranks.
        object.__setattr__(self, "_head_sync", HeadSync(self))
        object.__setattr__(self, "_teacher_pass", TeacherPass(
            self._student, self.adapter, self.teacher_layer, self.ema, self._user_teacher, False, None, eval_mode))

    @property
    def teacher(self) -> nn.Module:
        """The teacher module: the owned EMA copy or the user's EMA model (with LoRA the owned EMA shares the
        model's frozen weights and has no module: use ``teacher_weights()``)."""
        return self._teacher_pass.teacher_module()

    def teacher_weights(self) -> AbstractContextManager[nn.Module]:
        """Make the user's model compute with the teacher's weights (sampling, evaluation); the training
        weights come back exactly on exit."""
        return self._uncounted(self._teacher_pass.weights_on_student())

    def update_teacher(self) -> None:
        """EMA step of an owned teacher and one ``step``, after an optimizer step; a call with none since the
        last one (every micro-batch under gradient accumulation) does nothing (the step rule of ``Objective``)."""
        self._teacher_pass.check_update()
        self._count_update(self._teacher_pass.update)

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
        _refuse_distributed(model, self.separate)
        caller = None if self.separate else self._ddp_caller(model)
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
            self._head_sync.begin_call(self, model)
        self._teacher_pass.begin()

        passes = self._passes(student, x0, noise, t, groups, sizes, args, kwargs, self.student_layer, output=True,
                              caller=caller)
        pred = passes.output
        student_tokens = passes.taps[self.student_layer]
        self.last_draw = {"groups": groups, "t": t.detach(), "s": s.detach()}

        if self._is_zero(weight):
            align = sum((p.sum() for p in self.head.parameters()), torch.zeros((), device=device)) * 0.0
            nan = float("nan")
            self._metrics = {"loss": 0.0, **{name: nan for name in self.metric_names}, "weight": 0.0}
        else:
            t_args, t_kwargs = (passes.args, passes.kwargs) if self.teacher_labels == "student" else (args, kwargs)
            with torch.no_grad(), self._teacher_module() as module, eval_mode(module):
                taught = self._passes(module, x0, noise, s, groups, sizes, t_args, t_kwargs, self.teacher_layer, output=False)
            target = taught.taps[self.teacher_layer]
            if self.check_finite:
                self._check_finite(student_tokens, target)
            align = self._loss({"student": student_tokens}, target, weight, sample_weight)
            self._metrics["gap"] = (t - s).abs().float().mean().detach()
        self._count_training_call()
        return pred, align

    def _passes(self, module: nn.Module, x0: Tensor, noise: Tensor, times: Tensor, groups: Tensor,
                sizes: tuple[int, int], args: tuple, kwargs: dict, tap: int, output: bool,
                caller: nn.Module | None = None) -> TokenPass:
        """The step's passes of ``module`` at the groups' ``times`` ``(B, 2)``, on the linear path (t = 1 noise):
        with ``separate``, one pass per group on the inputs ``(1 - t_g) x0 + t_g noise``, its tokens put back in
        token order; without, one pass on every token's own ``(1 - t) x0 + t noise``, with per-token time
        (called through ``caller``, the model's DDP wrapper, when there is one)."""
        model_time = x0.dtype if x0.dtype in (torch.float32, torch.float64) else torch.float32
        adapter = self.adapter
        if not self.separate:
            per_token = times.gather(1, groups)  # (B, T): each token its group's time
            mix = adapter.token_values(module, per_token.to(x0.dtype), x0)
            with _captures_paused(module):
                return adapter.per_token_forward(module, (1 - mix) * x0 + mix * noise, per_token.to(model_time),
                                                 args, kwargs, (tap,), output, caller=caller)
        # Each group's token positions, ascending; ``order`` puts the groups' concatenated tokens back in place.
        ranked = groups.argsort(dim=1, stable=True)
        index = [ranked[:, : sizes[0]], ranked[:, sizes[0]:]]
        order = ranked.argsort(dim=1)
        shape = (x0.shape[0],) + (1,) * (x0.dim() - 1)
        inputs, group_times = [], []
        for g in range(2):
            tg = times[:, g]
            mix = tg.to(x0.dtype).reshape(shape)
            inputs.append((1 - mix) * x0 + mix * noise)
            group_times.append(tg.to(model_time))
        with _captures_paused(module):
            passes = adapter.group_forward(module, inputs, group_times, index, args, kwargs, (tap,), output)
        pred = adapter.unpatchify(module, self._in_order(passes.outputs, order), x0) if output else None
        return TokenPass(pred, {k: self._in_order(v, order) for k, v in passes.taps.items()}, passes.args, passes.kwargs)

    def _ddp_caller(self, model: nn.Module) -> nn.Module | None:
        """The DDP wrapper ``model`` if it is one, to run the student's per-token pass through (its forward arms
        the gradient reduction); it must wrap the bare model, whose modules the pass gives per-token forwards."""
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel):
            if torch.is_grad_enabled() and distributed_world() > 1 and "bare-model" not in self._warned:
                self._warned.add("bare-model")
                warnings.warn(
                    f"SRADTS(separate=False) was called with the bare {type(model).__name__} on {distributed_world()} "
                    "processes: the student's pass then averages no gradients. If the model is wrapped in DDP, pass "
                    "the wrapper: dts(ddp_model, x0, noise, ...)", stacklevel=3)
            return None
        if model.module is not self._student:
            raise ValueError(
                f"model=DistributedDataParallel({type(model.module).__name__}) is not accepted by SRADTS(separate=False): "
                f"wrap the bare {type(self._student).__name__} (DDP(model), not DDP(torch.compile(model)) or another wrapper)"
            )
        return model

    @staticmethod
    def _in_order(parts: list[Tensor], order: Tensor) -> Tensor:
        """The groups' tokens ``[(B, n_0, X), (B, n_1, X)]`` back in token order ``(B, T, X)``."""
        joined = torch.cat(parts, dim=1)
        return joined.gather(1, order.unsqueeze(-1).expand(-1, -1, joined.shape[-1]))

    @contextmanager
    def _teacher_module(self) -> Iterator[nn.Module]:
        if self._user_teacher is not None:
            yield self._user_teacher
            return
        with self.ema.module_for_pass() as module:
            yield module

    # ------------------------------------------------------------------ state
    def _identity(self) -> dict[str, Any]:
        return {
            "student_layer": self.student_layer,
            "teacher_layer": self.teacher_layer,
            "depth": self.depth,
            "head": self.head_name,
            "mask_ratio": self.mask_ratio,
            "max_gap": self.max_gap,
            "teacher_labels": self.teacher_labels,
            "separate": self.separate,
            "owned_teacher": self.ema is not None,
            "shared_teacher": self.ema is not None and self.ema.shared,
        }

    def extra_repr(self) -> str:
        return (
            f"adapter={self.adapter.name!r}, blocks {self.student_layer}->{self.teacher_layer} of {self.depth}, "
            f"mask_ratio={self.mask_ratio}, max_gap={self.max_gap}, loss={self.loss_name!r}, head={self.head_name!r}, "
            f"teacher_labels={self.teacher_labels!r}, separate={self.separate}, "
            f"teacher={'user EMA' if self.ema is None else ('shared-weight EMA' if self.ema.shared else 'owned EMA')}"
        )
