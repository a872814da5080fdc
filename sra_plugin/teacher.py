"""The EMA teacher: an EMA that SRA owns, or the EMA model the user already keeps.

The owned EMA (``EMATeacher``) follows the fine-tuning world's constraints:

- it averages only the parameters that require grad. When every parameter trains (training from
  scratch), it is a full copy of the model, as in the paper's code. When some are frozen (LoRA,
  partial training), it holds only the trainable ones; frozen parameters and buffers are the
  student's own tensors, and the teacher pass runs the student's modules with the EMA values in place
  of the trainable parameters (swapped as module attributes for the pass, never written into the
  student's tensors);
- its state is float32 (``ema_dtype``) whatever the model's dtype, cast to each parameter's dtype
  for the pass: a bf16 EMA with decay 0.9999 barely moves, since most updates round away;
- it starts from the weights in use at its first use (ema-pytorch's ``initted``), so weights loaded
  into the model after SRA was built are the teacher's starting point; ``initted`` is a buffer, so it
  survives checkpoints.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from . import zero
from ._checks import is_real
from .capture import run_until
from .wrappers import unwrap

__all__ = ["EMATeacher", "TeacherPass", "check_teacher_options", "ema_copy", "update_ema_", "check_same_structure",
           "eval_mode", "swap_in", "merged_lora_layers", "refuse_merged_lora"]


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


class EMATeacher(nn.Module):
    """An EMA of the student's trainable parameters, in ``dtype``, started at first use.

    ``shared=False`` (every parameter trains, or frozen ones hold at most 10% of the elements):
    ``self.model`` is a full copy of the student, the teacher module. ``shared=True`` (more frozen:
    LoRA, partial fine-tuning): buffers ``ema.<name>`` hold the EMA of each trainable parameter; the
    teacher pass uses the student's modules with those values.

    ``sharded`` (the student is partitioned by DeepSpeed ZeRO-3, at construction or by the first use):
    the buffers ``ema.<name>`` hold this rank's slice of each EMA (``sra_plugin.zero``), the teacher
    pass gathers them through the engine's hooks, and no rank holds a full copy.
    """

    def __init__(self, student: nn.Module, decay: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        self.decay = float(decay)
        self.dtype = dtype
        total = sum(p.numel() for p in student.parameters())
        frozen = total - sum(p.numel() for _, p in trainable)
        # A full copy when (nearly) everything trains; a fixed positional table (DiT's frozen
        # pos_embed) is no reason to give up the teacher module.
        self.shared = frozen > SHARED_ABOVE * total
        self.names = [n for n, _ in trainable]
        object.__setattr__(self, "_student", student)  # the user's model: not a submodule
        self.register_buffer("initted", torch.tensor(False))
        self._ready = False  # mirrors ``initted`` without a device sync per step
        self.sharded = False
        if zero.any_partitioned(student):
            self.model, self.ema = None, None
            self._to_shards()
        elif self.shared:
            self.model = None
            self.ema = nn.Module()
            for name, p in trainable:
                self.ema.register_buffer(_key(name), p.detach().to(dtype=dtype, copy=True))
        else:
            self.model = ema_copy(student, dtype)

    # -------------------------------------------------------------- ZeRO-3
    def adopt_partitioning(self) -> None:
        """Switch to this rank's slices once the student is partitioned by ZeRO-3 (built before
        ``deepspeed.initialize``): an EMA already started keeps its values, sliced exactly."""
        if not self.sharded and zero.any_partitioned(self._student):
            self._to_shards()

    @torch.no_grad()
    def _to_shards(self) -> None:
        zero.check_supported(self._student)
        params = dict(self._student.named_parameters())
        started = self.values() if self.model is not None or self.ema is not None else {}
        shards = nn.Module()
        for name in self.names:
            value = started.get(name)
            piece = zero.local_shard(params[name], value) if value is not None else zero.shard_of(params[name])
            shards.register_buffer(_key(name), piece.to(dtype=self.dtype, copy=True))
        self.model = None
        self.ema = shards
        self.shared = True  # the teacher pass runs the student's own modules
        self.sharded = True

    def slice_owner(self) -> str:
        """``"rank r of w"``: whose slices a ZeRO-3 state holds (a rank must load its own)."""
        first = next(p for p in self._student.parameters() if zero.is_partitioned(p))
        return "rank {} of {}".format(*zero.rank_and_world(first))

    # -------------------------------------------------------------- state
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

    @torch.no_grad()
    def init_if_needed(self) -> None:
        """At first use: check the structure, then start the EMA from the student's current weights."""
        self.adopt_partitioning()
        self.check_structure()
        if self._ready:
            return
        if self.sharded:
            for name, p in self._trainable():
                getattr(self.ema, _key(name)).copy_(zero.shard_of(p))
        elif self.shared:
            for name, p in self._trainable():
                _copy_into(getattr(self.ema, _key(name)), p)
        else:
            for (_, t), (_, s) in zip([*self.model.named_parameters(), *self.model.named_buffers()],
                                      [*self._student.named_parameters(), *self._student.named_buffers()]):
                _copy_into(t, s)
        self.initted.fill_(True)
        self._ready = True

    @torch.no_grad()
    def update(self) -> None:
        """``ema = decay * ema + (1 - decay) * student`` (after initialising at first use)."""
        if not self._ready:
            self.init_if_needed()
            return
        self.check_structure()
        if self.sharded:
            _lerp_([getattr(self.ema, _key(n)) for n in self.names], [zero.shard_of(p) for _, p in self._trainable()], self.decay)
        elif self.shared:
            _lerp_([getattr(self.ema, _key(n)) for n in self.names], [p for _, p in self._trainable()], self.decay)
        else:
            update_ema_(self.model, self._student, self.decay)

    def values(self) -> dict[str, Tensor]:
        """The EMA value of every averaged parameter, by the student's parameter name (under ZeRO-3:
        this rank's slice of it)."""
        if self.shared:
            return {n: getattr(self.ema, _key(n)) for n in self.names}
        return dict(self.model.named_parameters())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "initted" in state_dict:
            self._ready = bool(state_dict[prefix + "initted"])

    # -------------------------------------------------------------- the teacher pass
    @contextmanager
    def module_for_pass(self) -> Iterator[nn.Module]:
        """The module to run the teacher pass on, with the EMA values cast to the student's dtypes."""
        self.adopt_partitioning()
        if self.sharded:
            with zero.swapped_shards(self._student, self.values()) as module:
                yield module
            return
        module = self._student if self.shared else self.model
        params = dict(self._student.named_parameters())
        values = {n: v.to(params[n].dtype) for n, v in self.values().items() if v.dtype != params[n].dtype or self.shared}
        if not values:
            yield module
            return
        with _reparametrize_module(module, values, tie_weights=True, strict=False):
            yield module

    @contextmanager
    def student_with_teacher_weights(self) -> Iterator[nn.Module]:
        """The student computing with the EMA weights (sampling, evaluation); its own come back on exit."""
        self.init_if_needed()
        if self.sharded:
            with zero.swapped_shards(self._student, self.values()) as module:
                yield module
            return
        with swap_in(self._student, self.values()) as module:
            yield module


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


class TeacherPass:
    """The target of SRA: the tokens of block ``layer`` of the EMA teacher on ``(x_s, s)``, no gradient,
    eval mode, the pass stopped after that block. One implementation for the three teacher kinds: the
    user's EMA model, an owned full copy, and the owned shared-weight EMA (the student's own modules
    with EMA values, its capture paused meanwhile).

    With ``compile_teacher`` (or a compiled model when it is ``None``) an owned copy's blocks before
    ``layer`` run compiled; block ``layer`` stays eager: the hook that ends the pass is on it. The
    compiled calls live here, not on the modules, so a copy or a pickle of the teacher carries none.
    """

    def __init__(self, student: nn.Module, adapter, layer: int, ema: EMATeacher | None,
                 user_teacher: nn.Module | None, compile_teacher: bool | dict | None, capture, mode=eval_mode) -> None:
        self.student, self.adapter, self.layer = student, adapter, layer
        self.ema, self.user_teacher, self.compile_teacher = ema, user_teacher, compile_teacher
        self.capture = capture
        self.mode = mode
        self.module = student if ema is not None and ema.shared else (user_teacher if user_teacher is not None else ema.model)
        self.block = adapter.blocks(self.module)[layer - 1]
        self._compiled_blocks: list | None = None  # built at the first compiled pass

    def teacher_module(self) -> nn.Module:
        if self.user_teacher is not None:
            return self.user_teacher
        self.ema.adopt_partitioning()
        if self.ema.sharded:
            raise ValueError(
                "sra.teacher: under DeepSpeed ZeRO-3 the owned EMA keeps this rank's slice of each weight, so there is "
                "no separate teacher module; use `with sra.teacher_weights(): model(...)`"
            )
        if self.ema.shared:
            raise ValueError(
                "sra.teacher: with frozen parameters the owned EMA keeps only the trainable ones and shares the rest "
                "with the model, so there is no separate teacher module; use `with sra.teacher_weights(): model(...)`"
            )
        return self.ema.model

    def begin(self) -> None:
        """Before a step's pass: an owned EMA starts at first use, and refuses merged LoRA."""
        if self.ema is not None:
            refuse_merged_lora(self.student, "the teacher pass of an owned EMA")
            self.ema.init_if_needed()

    def check_update(self) -> None:
        """Raise if an EMA step could not be right now (merged LoRA under an owned teacher), whether or not
        an optimizer step makes one due."""
        if self.ema is not None:
            refuse_merged_lora(self.student, "update_teacher()")

    def update(self) -> None:
        """The EMA step of an owned teacher, after ``check_update`` (a teacher the user keeps is theirs to update)."""
        if self.ema is not None:
            self.ema.update()

    @contextmanager
    def weights_on_student(self) -> Iterator[nn.Module]:
        """The student computing with the teacher's weights; the training weights come back exactly on exit."""
        refuse_merged_lora(self.student, "sra.teacher_weights()")
        if self.user_teacher is not None:
            refuse_merged_lora(self.user_teacher, "sra.teacher_weights()")
            with swap_in(self.student, dict(self.user_teacher.named_parameters())):
                yield self.student
            return
        with self.ema.student_with_teacher_weights():
            yield self.student

    def tokens(self, model: nn.Module, x_s: Tensor, s, args: tuple, kwargs: dict, watched: dict) -> Tensor:
        t_args, t_kwargs = self.adapter.teacher_inputs(self.student, args, kwargs, watched)
        if self.user_teacher is not None:
            with torch.no_grad(), self.mode(self.user_teacher):
                return run_until(self.user_teacher, self.block, self.adapter, x_s, s, t_args, t_kwargs)
        with torch.no_grad(), self.ema.module_for_pass() as module, self.mode(module), self._compiled(model):
            with self.capture.pausing():  # a shared-weight pass runs the student's own hooked modules
                return run_until(module, self._block_of(module), self.adapter, x_s, s, t_args, t_kwargs)

    def _block_of(self, module: nn.Module) -> nn.Module:
        """Block ``layer`` of the module the pass runs on. It is not always the module seen at construction:
        ZeRO-3's first use replaces an owned copy built before ``deepspeed.initialize`` by the student's modules."""
        if module is not self.module:
            self.module, self.block = module, self.adapter.blocks(module)[self.layer - 1]
        return self.block

    def _wants_compiled(self, model: nn.Module) -> bool:
        if self.compile_teacher is None:
            return hasattr(model, "_orig_mod") or getattr(self.student, "_compiled_call_impl", None) is not None
        return bool(self.compile_teacher) or self.compile_teacher == {}

    @contextmanager
    def _compiled(self, model: nn.Module) -> Iterator[None]:
        if self.ema is None or self.ema.shared or not self._wants_compiled(model):
            yield
            return
        blocks = self.adapter.blocks(self.ema.model)[: self.layer - 1]
        if self._compiled_blocks is None:
            options = self.compile_teacher if isinstance(self.compile_teacher, dict) else {}
            self._compiled_blocks = [torch.compile(b._call_impl, **options) for b in blocks]
        for block, call in zip(blocks, self._compiled_blocks):
            block._compiled_call_impl = call
        try:
            yield
        finally:
            for block in blocks:
                block._compiled_call_impl = None
