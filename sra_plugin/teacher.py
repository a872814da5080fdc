"""The EMA teacher's kinds: one small class per kind, each answering the same calls (``TeacherKind``).

- ``UserEMA``: the EMA model the user already keeps (and updates), passed as ``teacher=``;
- ``OwnedCopy``: an owned EMA that is a full copy of the model (every parameter trains, as in the paper's code);
- ``SharedEMA``: an owned EMA of the trainable parameters only (LoRA, partial training); frozen parameters and
  buffers are the student's own tensors, and the teacher pass runs the student's modules with the EMA values
  in place of the trainable parameters (swapped as module attributes for the pass, never written into the
  student's tensors);
- ``ShardedEMA``: under DeepSpeed ZeRO-3, each rank's slice of an owned EMA. An owned EMA built before
  ``deepspeed.initialize`` becomes one at its next use (``adopted()`` returns the new object).

An owned EMA (``EMATeacher``, picked by ``owned_ema``) follows the fine-tuning world's constraints: its
state is float32 (``ema_dtype``) whatever the model's dtype, cast to each parameter's dtype for the pass
(a bf16 EMA with decay 0.9999 barely moves, since most updates round away); it starts from the weights in
use at its first use (ema-pytorch's ``initted``), so weights loaded into the model after SRA was built are
the teacher's starting point; ``initted`` is a buffer, so it survives checkpoints. The teacher pass itself
is a target (``targets.TeacherTarget``).
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from . import zero
from ._checks import is_real
from .wrappers import unwrap

__all__ = ["TeacherKind", "UserEMA", "EMATeacher", "OwnedCopy", "SharedEMA", "ShardedEMA", "owned_ema",
           "check_teacher_options", "ema_copy", "update_ema_", "check_same_structure", "eval_mode", "swap_in",
           "merged_lora_layers", "refuse_merged_lora"]


def _drop_forward_wrappers(module: nn.Module) -> None:
    """Give ``module`` and its submodules back the ``forward`` they had before accelerate's mixed
    precision wrapped it in autocast (``prepare`` stores the previous one as ``_original_forward``)."""
    for m in module.modules():
        original = m.__dict__.pop("_original_forward", None)
        if original is None or "forward" not in m.__dict__:
            continue
        if getattr(original, "__self__", None) is m and getattr(original, "__func__", None) is type(m).forward:
            del m.__dict__["forward"]
        else:
            m.forward = original


def ema_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen copy of ``model`` in eval mode (floating parameters in ``dtype`` if given), to be an EMA teacher.

    The copy runs the forward of its class: an autocast wrapper that accelerate's ``mixed_precision``
    put on the model instance is not copied, so the teacher is the same whether SRA was built before or
    after ``accelerator.prepare``, and its pass runs under the autocast around the ``sra(...)`` call."""
    teacher = copy.deepcopy(model)
    _drop_forward_wrappers(teacher)
    teacher.requires_grad_(False)
    if dtype is not None:
        for p in teacher.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    return teacher.eval()


def _ema_pairs(teacher: nn.Module, student: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    avg_t, avg_s, copy_t, copy_s = [], [], [], []
    for (_, t), (_, s) in zip(teacher.named_parameters(), student.named_parameters()):
        avg_t.append(t)
        avg_s.append(s)
    for (_, t), (_, s) in zip(teacher.named_buffers(), student.named_buffers()):
        (avg_t if t.is_floating_point() else copy_t).append(t)
        (avg_s if t.is_floating_point() else copy_s).append(s)
    return avg_t, avg_s, copy_t, copy_s


def _lerp_(targets: list[Tensor], sources: list[Tensor], decay: float) -> None:
    """``target = decay * target + (1 - decay) * source``, in the targets' dtype, vectorized."""
    if targets and decay != 1.0:
        # One pass over the weights (lerp) instead of two (mul_ then add_): ~30% less time per update.
        torch._foreach_lerp_(targets, [s.detach().to(t.dtype) for t, s in zip(targets, sources)], 1 - decay)


@torch.no_grad()
def update_ema_(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``teacher = decay * teacher + (1 - decay) * student`` over parameters and floating buffers
    (other buffers are copied), vectorized with ``torch._foreach_*``."""
    avg_t, avg_s, copy_t, copy_s = _ema_pairs(teacher, student)
    _lerp_(avg_t, avg_s, decay)
    for t, s in zip(copy_t, copy_s):
        t.copy_(s)


def check_same_structure(teacher: nn.Module, student: nn.Module) -> None:
    """Raise ``ValueError`` unless the teacher has the student's parameters and buffers, name for name."""
    t_state = {k: zero.full_shape(v) for k, v in [*teacher.named_parameters(), *teacher.named_buffers()]}
    s_state = {k: zero.full_shape(v) for k, v in [*student.named_parameters(), *student.named_buffers()]}
    if t_state == s_state:
        return
    missing = sorted(set(s_state) - set(t_state))
    extra = sorted(set(t_state) - set(s_state))
    shape = sorted(k for k in set(s_state) & set(t_state) if s_state[k] != t_state[k])
    detail = []
    if missing:
        detail.append(f"missing {missing[:3]}")
    if extra:
        detail.append(f"unexpected {extra[:3]}")
    if shape:
        k = shape[0]
        detail.append(f"{k} has shape {t_state[k]} in the teacher and {s_state[k]} in the student")
    raise ValueError(
        f"teacher={type(teacher).__name__} does not match the student's structure ({'; '.join(detail)}): "
        "pass an EMA copy of the same model, or teacher='ema'"
    )


def merged_lora_layers(model: nn.Module) -> list[str]:
    """Names of the layers whose LoRA is merged into the base weights (peft's ``merge_adapter()``,
    diffusers' ``fuse_lora()``): peft's tuner layers list the merged adapters in ``merged_adapters``."""
    # Read from the instance dict, where peft keeps it: a getattr that misses costs ~5 us per module.
    return [name for name, m in model.named_modules() if isinstance(vars(m).get("merged_adapters"), (list, tuple))
            and vars(m)["merged_adapters"]]


def refuse_merged_lora(model: nn.Module, what: str) -> None:
    """Raise ``ValueError`` if ``model`` has merged LoRA layers: the EMA values of the LoRA parameters
    would be swapped into layers whose forward no longer reads them (the base weight holds the
    training LoRA), so ``what`` would silently compute with the training weights."""
    merged = merged_lora_layers(model)
    if merged:
        raise ValueError(
            f"{what} needs the LoRA unmerged, but {len(merged)} layers of {type(model).__name__} have it merged into "
            f"their base weights (e.g. {merged[0]!r}, after peft's merge_adapter() or diffusers' fuse_lora()), so it would "
            "compute with the training weights, not the teacher's: call model.unmerge_adapter() (peft) or "
            "model.unfuse_lora() (diffusers) first, and merge again afterwards if needed"
        )


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode and restore every submodule's mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def swap_in(model: nn.Module, values: dict[str, Tensor]) -> Iterator[nn.Module]:
    """Write ``values`` into ``model``'s parameters in place (cast to each one's dtype) and restore the
    originals exactly on exit. For evaluation and sampling only: never while a graph through the
    model is alive (its backward would see the swapped values, and raise). Under ZeRO-3 each rank
    puts its slice of the values in place of its own slices instead (``zero.swapped_shards``)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise ValueError(f"the teacher's weights name parameters the model does not have: {unknown[:3]}")
    if any(zero.is_partitioned(p) for p in params.values()):
        with zero.swapped_shards(model, {n: zero.local_shard(params[n], v) for n, v in values.items()}):
            yield model
        return
    with torch.no_grad():
        saved = {name: params[name].detach().clone() for name in values}
        try:
            for name, value in values.items():
                params[name].copy_(value)
            yield model
        finally:
            for name, value in saved.items():
                params[name].copy_(value)


SHARED_ABOVE = 0.1
"""The owned EMA shares the student's weights once frozen parameters hold more than this share of all
elements. LoRA freezes 90-99.9% of them; a fixed positional table (DiT/SiT's frozen ``pos_embed``)
holds 1-2% of a small model at 32x32 latents and is no reason to give up the teacher module."""


def _copy_into(target: Tensor, source: Tensor) -> None:
    """``target.copy_(source)``, also when FSDP2 has the target sharded (a DTensor) and the source
    unsharded (a student root keeps its parameters gathered between its forward and backward)."""
    placements = getattr(target, "placements", None)
    if placements is not None and getattr(source, "placements", None) is None:
        from torch.distributed.tensor import distribute_tensor

        source = distribute_tensor(source.detach(), target.device_mesh, placements)
    target.copy_(source.detach())


def _key(name: str) -> str:
    # Buffer names cannot contain "."; parameter names are dotted identifiers, which never contain "-".
    return name.replace(".", "-")


class TeacherKind:
    """What every kind of teacher answers; one small class per kind, no branching on the kind elsewhere.

    ``begin()`` before a step's pass (an owned EMA starts at first use); ``check_update()`` and ``update()``
    for ``update_teacher()``; ``pass_module()`` the module a teacher pass runs on, with the teacher's
    weights; ``on_student()`` the user's model computing with them (``teacher_weights()``); ``module()``
    the teacher module, where there is one; ``identity()`` its part of the saved identity; ``adopted()``
    the kind to use now (an owned EMA becomes ``ShardedEMA`` once ZeRO-3 partitions the model: a new
    object, this one is left as it was)."""

    owned = False
    shared = False
    sharded = False
    label = "user EMA"

    def adopted(self) -> "TeacherKind":
        return self

    def begin(self) -> None:
        """Before a step's teacher pass."""

    def check_update(self) -> None:
        """Raise if an EMA step could not be right now, whether or not one is due."""

    def update(self) -> None:
        """The EMA step (a teacher the user keeps is theirs to update)."""

    def compiled_blocks(self, adapter: Any, layer: int) -> list[nn.Module]:
        """The blocks before ``layer`` that may run compiled in the teacher pass (those of an owned copy)."""
        return []

    def identity(self) -> dict[str, Any]:
        return {"owned_teacher": self.owned, "shared_teacher": self.shared}


class UserEMA(TeacherKind):
    """The EMA model the user keeps (and updates) passed as ``teacher=``."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        self.student, self.teacher = student, teacher

    def pass_module(self) -> AbstractContextManager[nn.Module]:
        return nullcontext(self.teacher)

    @contextmanager
    def on_student(self) -> Iterator[nn.Module]:
        for model in (self.student, self.teacher):
            refuse_merged_lora(model, "sra.teacher_weights()")
        with swap_in(self.student, dict(self.teacher.named_parameters())):
            yield self.student

    def module(self) -> nn.Module:
        return self.teacher


def _no_module(why: str) -> ValueError:
    return ValueError(f"sra.teacher: {why}, so there is no separate teacher module; use `with sra.teacher_weights(): model(...)`")


class EMATeacher(nn.Module, TeacherKind):
    """Base of the owned EMAs: an EMA of the student's trainable parameters in ``dtype``, started at first
    use (``initted``, a buffer, survives checkpoints). ``owned_ema()`` picks the kind: ``OwnedCopy``,
    ``SharedEMA`` or ``ShardedEMA``."""

    owned = True

    def __init__(self, student: nn.Module, decay: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.decay = float(decay)
        self.dtype = dtype
        self.names = [n for n, p in student.named_parameters() if p.requires_grad]
        object.__setattr__(self, "_student", student)  # the user's model: not a submodule
        self.register_buffer("initted", torch.tensor(False))
        self._ready = False  # mirrors ``initted`` without a device sync per step

    def adopted(self) -> TeacherKind:
        return ShardedEMA.of(self) if zero.any_partitioned(self._student) else self

    def _trainable(self) -> list[tuple[str, Tensor]]:
        return [(n, p) for n, p in self._student.named_parameters() if p.requires_grad]

    def check_structure(self) -> None:
        """Raise ``ValueError`` if the student's trainable parameters are not those the EMA was built on."""
        now = [n for n, _ in self._trainable()]
        before = self.names
        if now == before:
            return
        added, gone = [n for n in now if n not in set(before)], [n for n in before if n not in set(now)]
        if any("_fsdp_wrapped_module" in n for n in added):
            raise ValueError(
                "the model was wrapped in FSDP1 (FullyShardedDataParallel) after SelfRepresentationAlignment was created: "
                "FSDP1 renames and flattens the parameters the owned EMA teacher follows. Use FSDP2 (fully_shard, or "
                "accelerate's fsdp_version=2) or DeepSpeed, or pass teacher= an EMA model you keep yourself"
            )
        name = (added or gone or [now[0] if now else "?"])[0]
        what = "appeared" if added else ("is gone or frozen" if gone else "changed order")
        raise ValueError(
            f"the model's trainable parameters changed after SelfRepresentationAlignment was created: {name!r} {what} "
            f"({len(added)} added, {len(gone)} removed or frozen). Create SelfRepresentationAlignment after adding "
            "adapters (e.g. peft's get_peft_model) and choosing what to freeze"
        )

    def begin(self) -> None:
        refuse_merged_lora(self._student, "the teacher pass of an owned EMA")
        self.init_if_needed()

    def check_update(self) -> None:
        refuse_merged_lora(self._student, "update_teacher()")

    @torch.no_grad()
    def init_if_needed(self) -> None:
        """At first use: check the structure, then start the EMA from the student's current weights."""
        self.check_structure()
        if self._ready:
            return
        self._start()
        self.initted.fill_(True)
        self._ready = True

    @torch.no_grad()
    def update(self) -> None:
        """``ema = decay * ema + (1 - decay) * student`` (after initialising at first use)."""
        if not self._ready:
            self.init_if_needed()
            return
        self.check_structure()
        self._step()

    @contextmanager
    def on_student(self) -> Iterator[nn.Module]:
        refuse_merged_lora(self._student, "sra.teacher_weights()")
        self.init_if_needed()
        with self._swapped(self._student, self.values()) as module:
            yield module

    _swapped = staticmethod(swap_in)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "initted" in state_dict:
            self._ready = bool(state_dict[prefix + "initted"])


class OwnedCopy(EMATeacher):
    """Every parameter trains (or frozen ones hold at most ``SHARED_ABOVE`` of the elements): ``model`` is
    a full copy of the student, the teacher module, as in the paper's code."""

    label = "owned EMA"

    def __init__(self, student: nn.Module, decay: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(student, decay, dtype)
        self.model = ema_copy(student, dtype)

    def _start(self) -> None:
        for (_, t), (_, s) in zip([*self.model.named_parameters(), *self.model.named_buffers()],
                                  [*self._student.named_parameters(), *self._student.named_buffers()]):
            _copy_into(t, s)

    def _step(self) -> None:
        update_ema_(self.model, self._student, self.decay)

    def values(self) -> dict[str, Tensor]:
        """The EMA value of every parameter, by the student's parameter name."""
        return dict(self.model.named_parameters())

    def module(self) -> nn.Module:
        return self.model

    def compiled_blocks(self, adapter: Any, layer: int) -> list[nn.Module]:
        return adapter.blocks(self.model)[: layer - 1]

    @contextmanager
    def pass_module(self) -> Iterator[nn.Module]:
        params = dict(self._student.named_parameters())
        values = {n: v.to(params[n].dtype) for n, v in self.values().items() if v.dtype != params[n].dtype}
        with _reparametrize_module(self.model, values, tie_weights=True, strict=False) if values else nullcontext():
            yield self.model


class SharedEMA(EMATeacher):
    """Frozen parameters hold more than ``SHARED_ABOVE`` of the elements (LoRA, partial fine-tuning): the
    buffers ``ema.<name>`` hold the EMA of each trainable parameter; the teacher pass runs the student's
    own modules with those values swapped in as attributes (never written into the student's tensors)."""

    shared = True
    label = "shared-weight EMA"

    def __init__(self, student: nn.Module, decay: float, dtype: torch.dtype = torch.float32,
                 values: dict[str, Tensor] | None = None) -> None:
        super().__init__(student, decay, dtype)
        self.ema = nn.Module()
        params = dict(student.named_parameters())
        for name in self.names:
            start = self._source(params[name]) if values is None else values[name]
            self.ema.register_buffer(_key(name), start.detach().to(dtype=dtype, copy=True))

    @staticmethod
    def _source(param: Tensor) -> Tensor:
        """What the EMA averages of a trainable parameter."""
        return param

    def _start(self) -> None:
        for name, p in self._trainable():
            _copy_into(getattr(self.ema, _key(name)), self._source(p))

    def _step(self) -> None:
        _lerp_([getattr(self.ema, _key(n)) for n in self.names], [self._source(p) for _, p in self._trainable()], self.decay)

    def values(self) -> dict[str, Tensor]:
        """The EMA value of every averaged parameter, by the student's parameter name."""
        return {n: getattr(self.ema, _key(n)) for n in self.names}

    def module(self) -> nn.Module:
        raise _no_module("with frozen parameters the owned EMA keeps only the trainable ones and shares the rest with the model")

    @contextmanager
    def pass_module(self) -> Iterator[nn.Module]:
        params = dict(self._student.named_parameters())
        values = {n: v.to(params[n].dtype) for n, v in self.values().items()}
        with _reparametrize_module(self._student, values, tie_weights=True, strict=False):
            yield self._student


class ShardedEMA(SharedEMA):
    """The student is partitioned by DeepSpeed ZeRO-3: the buffers ``ema.<name>`` hold this rank's slice of
    each EMA (``sra_plugin.zero``), the pass gathers them through the engine's hooks, no rank holds a copy."""

    sharded = True

    def __init__(self, student: nn.Module, decay: float, dtype: torch.dtype = torch.float32,
                 values: dict[str, Tensor] | None = None) -> None:
        zero.check_supported(student)
        params = dict(student.named_parameters())
        slices = None if values is None else {n: zero.local_shard(params[n], v) for n, v in values.items()}
        super().__init__(student, decay, dtype, slices)

    @classmethod
    @torch.no_grad()
    def of(cls, kind: EMATeacher) -> "ShardedEMA":
        """The ZeRO-3 kind of an owned EMA built before ``deepspeed.initialize``: its values sliced exactly."""
        sharded = cls(kind._student, kind.decay, kind.dtype, kind.values())
        sharded.initted.copy_(kind.initted)
        sharded._ready = kind._ready
        return sharded

    def adopted(self) -> TeacherKind:
        return self

    _source = staticmethod(zero.shard_of)
    _swapped = staticmethod(zero.swapped_shards)

    def module(self) -> nn.Module:
        raise _no_module("under DeepSpeed ZeRO-3 the owned EMA keeps this rank's slice of each weight")

    def pass_module(self) -> AbstractContextManager[nn.Module]:
        return zero.swapped_shards(self._student, self.values())

    def slice_owner(self) -> str:
        """``"rank r of w"``: whose slices a ZeRO-3 state holds (a rank must load its own)."""
        first = next(p for p in self._student.parameters() if zero.is_partitioned(p))
        return "rank {} of {}".format(*zero.rank_and_world(first))

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "zero3_slice_of_rank": self.slice_owner()}


def owned_ema(student: nn.Module, decay: float, dtype: torch.dtype = torch.float32) -> EMATeacher:
    """The owned EMA's kind for ``student`` as it is now."""
    if zero.any_partitioned(student):
        return ShardedEMA(student, decay, dtype)
    total = sum(p.numel() for p in student.parameters())
    frozen = sum(p.numel() for p in student.parameters() if not p.requires_grad)
    # A full copy when (nearly) everything trains; a fixed positional table (DiT's frozen pos_embed) is no
    # reason to give up the teacher module.
    return SharedEMA(student, decay, dtype) if frozen > SHARED_ABOVE * total else OwnedCopy(student, decay, dtype)


def check_teacher_options(teacher: str | nn.Module, student: nn.Module, ema_decay: float, ema_dtype: torch.dtype,
                          compile_teacher: bool | dict | None) -> nn.Module | None:
    """Check SRA's teacher arguments; the user's EMA model (unwrapped) if ``teacher`` is one, else None."""
    if not is_real(ema_decay) or not 0.0 <= ema_decay <= 1.0:
        raise ValueError(f"ema_decay={ema_decay!r} is not accepted: use a number in [0, 1]")
    if not isinstance(ema_dtype, torch.dtype) or not ema_dtype.is_floating_point:
        raise TypeError(f"ema_dtype={ema_dtype!r} is not accepted: use a floating torch.dtype (torch.float32 is the default)")
    if not (compile_teacher is None or isinstance(compile_teacher, (bool, dict))):
        raise TypeError(
            f"compile_teacher={compile_teacher!r} is not accepted: use None (compile when the model is compiled), "
            "True, False, or a dict of torch.compile options"
        )
    if isinstance(teacher, str):
        if teacher != "ema":
            raise ValueError(f"teacher={teacher!r} is not accepted: use 'ema' or an nn.Module (the EMA model you keep)")
        return None
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher={type(teacher).__name__} is not accepted: use 'ema' or an nn.Module")
    user_teacher = unwrap(teacher)
    if user_teacher is student:
        raise ValueError("teacher is the model itself: pass its EMA copy, or teacher='ema'")
    check_same_structure(user_teacher, student)
    return user_teacher
