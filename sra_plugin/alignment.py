"""SelfRepresentationAlignment: capture the student's block, run the teacher, align through a head."""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Union

import torch
from torch import Tensor, nn

from .capture import Decision, StudentCapture, probe_call, run_until
from .heads import build_head
from .layers import resolve_layer
from . import losses
from .losses import build_loss
from .registry import Adapter, resolve_adapter
from .teacher import EMATeacher, check_same_structure, eval_mode, swap_in
from .wrappers import unwrap

__all__ = ["SelfRepresentationAlignment"]

Weight = Union[float, Tensor, Callable[[int], Union[float, Tensor]]]


def check_weight(weight: Any, where: str) -> float | Tensor:
    """A loss weight: a real number >= 0 or a 0-dim floating tensor (checked for value only on the CPU,
    so that a GPU weight costs no device sync)."""
    if isinstance(weight, Tensor):
        if weight.dim() != 0 or not weight.is_floating_point():
            raise ValueError(f"{where}={weight!r} is not accepted: use a number >= 0 or a 0-dim floating tensor")
        if weight.device.type == "cpu" and not (bool(torch.isfinite(weight)) and float(weight) >= 0):
            raise ValueError(f"{where}={weight!r} is not accepted: use a finite number >= 0")
        return weight.detach()
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{where}={weight!r} is not accepted: use a finite number >= 0 or a 0-dim floating tensor")
    return float(weight)


def _batch_of(value: Any) -> int | None:
    return value.shape[0] if isinstance(value, Tensor) and value.dim() > 0 else None


def first_float_parameter(model: nn.Module) -> Tensor | None:
    return next((p for p in model.parameters() if p.is_floating_point()), None)


class SelfRepresentationAlignment(nn.Module):
    """Self-Representation Alignment (SRA, arXiv 2505.02831) for an unmodified diffusion transformer.

    Paper, Sec. 3.2: "the representation of the earlier layer with higher noise [is aligned] to that
    of the later layer with lower noise", with the later layer read from an EMA copy of the model
    (the teacher) and the earlier one passed through a small projection head.

    Usage, in an existing loop::

        sra = SelfRepresentationAlignment(model)
        pred = model(x_t, t, y)                            # the student's tokens are kept by a hook
        loss = diff_loss + sra(model, x_t, x_s, t, s, y=y)   # teacher on (x_s, s), stopped after L_t
        loss.backward(); opt.step(); opt.zero_grad()
        sra.update_teacher()

    Layers are 1-based block numbers, negative from the end, or fractions of depth (see
    ``sra_plugin.layers``). ``sra(...)`` returns the weighted loss; ``metrics`` holds the last call's
    figures as floats.
    """

    def __init__(
        self,
        model: nn.Module,
        student_layer: int | float = 0.3,
        teacher_layer: int | float = 0.7,
        teacher: str | nn.Module = "ema",
        ema_decay: float = 0.9999,
        head: str | nn.Module = "mlp",
        loss: str | Callable[[Tensor, Tensor], Tensor] = "smooth_l1",
        weight: Weight = 0.2,
        adapter: str | Adapter | None = None,
        check_finite: bool = False,
        ema_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        # Everything is validated before anything is created or attached.
        if not isinstance(model, nn.Module):
            raise TypeError(f"model={type(model).__name__} is not accepted: use an nn.Module")
        student = unwrap(model)
        adapter = resolve_adapter(student, adapter)
        blocks = adapter.blocks(student)
        if not blocks:
            raise ValueError(f"adapter {adapter.name!r} found no blocks in {type(student).__name__}")
        depth = len(blocks)
        student_index = resolve_layer(student_layer, depth, "student_layer")
        teacher_index = resolve_layer(teacher_layer, depth, "teacher_layer")
        if teacher_index < student_index:
            raise ValueError(
                f"teacher_layer={teacher_layer!r} (block {teacher_index}) comes before student_layer={student_layer!r} "
                f"(block {student_index}): the teacher's block must be the same or a later one"
            )
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, numbers.Real) or not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay={ema_decay!r} is not accepted: use a number in [0, 1]")
        if not isinstance(ema_dtype, torch.dtype) or not ema_dtype.is_floating_point:
            raise TypeError(f"ema_dtype={ema_dtype!r} is not accepted: use a floating torch.dtype (torch.float32 is the default)")
        if not callable(weight):
            weight = check_weight(weight, "weight")
        loss_fn = build_loss(loss)
        if isinstance(teacher, str):
            if teacher != "ema":
                raise ValueError(f"teacher={teacher!r} is not accepted: use 'ema' or an nn.Module (the EMA model you keep)")
            user_teacher = None
        elif isinstance(teacher, nn.Module):
            user_teacher = unwrap(teacher)
            if user_teacher is student:
                raise ValueError("teacher is the model itself: pass its EMA copy, or teacher='ema'")
            check_same_structure(user_teacher, student)
        else:
            raise TypeError(f"teacher={type(teacher).__name__} is not accepted: use 'ema' or an nn.Module")
        teacher_model = user_teacher if user_teacher is not None else student
        dim = adapter.dim(student, blocks[student_index - 1])
        target_dim = adapter.dim(teacher_model, adapter.blocks(teacher_model)[teacher_index - 1])
        head_module = build_head(head, dim, target_dim)
        if not isinstance(head, nn.Module):
            # The head computes on the student's tokens: create it on the model's device, in its dtype.
            like = first_float_parameter(student)
            if like is not None:
                head_module = head_module.to(device=like.device, dtype=like.dtype)

        self.adapter = adapter
        self.depth = depth
        self.student_layer = student_index
        self.teacher_layer = teacher_index
        self.ema_decay = float(ema_decay)
        self.weight = weight
        self.loss_fn = loss_fn
        self.loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
        self.head_name = head if isinstance(head, str) else type(head).__name__
        self.check_finite = bool(check_finite)
        self.step = 0
        self.head = head_module
        # The owned teacher is built before any hook is attached, so a copy carries none of ours.
        self.ema: EMATeacher | None = EMATeacher(student, ema_decay, ema_dtype) if user_teacher is None else None
        object.__setattr__(self, "_student", student)
        object.__setattr__(self, "_user_teacher", user_teacher)
        self.student_reruns = 0
        self._metrics: dict[str, Tensor | float] = {}
        self._attach()

    def _attach(self) -> None:
        """Hook the student (again, after a copy or unpickling) and tie the hooks' lifetime to this object."""
        blocks = self.adapter.blocks(self._student)
        # Plain attributes, not submodules: the student is the user's, and so are its blocks.
        object.__setattr__(self, "_student_block", blocks[self.student_layer - 1])
        teacher_module = self._student if self.ema is not None and self.ema.shared else self.teacher
        object.__setattr__(self, "_teacher_block", self.adapter.blocks(teacher_module)[self.teacher_layer - 1])
        object.__setattr__(self, "_capture", StudentCapture(self._student, self._student_block, self.adapter))
        object.__setattr__(self, "_warned", set())
        # Dropped without remove(): the hooks go with this object, holding no activations.
        object.__setattr__(self, "_finalizer", weakref.finalize(self, StudentCapture.remove, self._capture))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        for key in ("_capture", "_finalizer", "_student_block", "_teacher_block", "_warned"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._attach()

    # ------------------------------------------------------------------ properties
    @property
    def teacher(self) -> nn.Module:
        """The teacher module: the owned EMA copy (also the model to sample from) or the user's EMA model.

        With frozen parameters (LoRA) the owned EMA holds only the trainable ones and has no module of
        its own: use ``with sra.teacher_weights(): model(...)`` to compute with the teacher's weights."""
        if self._user_teacher is not None:
            return self._user_teacher
        if self.ema.shared:
            raise ValueError(
                "sra.teacher: with frozen parameters the owned EMA keeps only the trainable ones and shares the rest "
                "with the model, so there is no separate teacher module; use `with sra.teacher_weights(): model(...)`"
            )
        return self.ema.model

    @property
    def metrics(self) -> dict[str, float]:
        """The last call's figures as plain floats: loss, align_loss, cos_sim, gap, student_norm,
        teacher_norm, weight, student_reruns (converted on access, so a step costs no device sync)."""
        return {k: float(v) for k, v in self._metrics.items()}

    def current_weight(self) -> float | Tensor:
        if callable(self.weight):
            return check_weight(self.weight(self.step), f"weight({self.step})")
        return self.weight

    @contextmanager
    def teacher_weights(self) -> Iterator[nn.Module]:
        """Make the user's model compute with the teacher's weights (sampling, evaluation); the training
        weights come back exactly on exit. Not while a training graph through the model is alive."""
        if self._user_teacher is not None:
            values = dict(self._user_teacher.named_parameters())
        else:
            self.ema.init_if_needed()
            values = self.ema.values()
        with swap_in(self._student, values):
            yield self._student

    # ------------------------------------------------------------------ the step
    def _check_inputs(self, model: Any, x_t: Any, x_s: Any, t: Any, s: Any, sample_weight: Any) -> None:
        if not isinstance(model, nn.Module) or unwrap(model) is not self._student:
            raise ValueError(
                f"model={type(model).__name__} is not the model this SelfRepresentationAlignment was built on "
                f"({type(self._student).__name__}): pass that model (wrapped or not)"
            )
        for name, value in (("x_t", x_t), ("x_s", x_s)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if x_t.shape != x_s.shape:
            raise ValueError(f"x_t has shape {tuple(x_t.shape)} and x_s {tuple(x_s.shape)}: they must match")
        if x_s.dtype != x_t.dtype or x_s.device != x_t.device:
            raise ValueError(
                f"x_s has dtype {x_s.dtype} on {x_s.device} but x_t has {x_t.dtype} on {x_t.device}: "
                "build both from the same x0 and noise"
            )
        for name, value in (("t", t), ("s", s)):
            if not isinstance(value, (Tensor, numbers.Real)) or isinstance(value, bool):
                raise TypeError(f"{name} must be a tensor or a number, got {type(value).__name__}")
        batch = x_t.shape[0] if x_t.dim() else None
        for name, value in (("t", t), ("s", s)):
            b = _batch_of(value)
            if b is not None and b not in (batch, 1):
                raise ValueError(f"{name} has batch size {b} but x_t has {batch}: give one time per sample, or one for all")
        if sample_weight is not None:
            if not isinstance(sample_weight, Tensor) or sample_weight.shape != (batch,) or not sample_weight.is_floating_point():
                shape = tuple(sample_weight.shape) if isinstance(sample_weight, Tensor) else type(sample_weight).__name__
                raise ValueError(f"sample_weight={shape} is not accepted: use a floating tensor of shape ({batch},), one weight per sample")

    def _student_tokens(self, model: nn.Module, x_t: Tensor, t: Any, args: tuple, kwargs: dict) -> tuple[Tensor, dict]:
        pending = self._capture.record
        decision = self._capture.take(lambda: probe_call(self._student, self.adapter, x_t, t, args, kwargs))
        if decision.captured is not None:
            return decision.captured.tokens, decision.captured.watched
        self.student_reruns += 1
        self._warn(model, decision, pending)
        capture = self._capture
        capture.forced = True
        try:
            tokens = run_until(self._student, self._student_block, self.adapter, x_t, t, args, kwargs)
        finally:
            capture.forced = False
        record, capture.record = capture.record, None
        return tokens, record.watched if record is not None else {}

    def _warn(self, model: nn.Module, decision: Decision, pending: Any) -> None:
        """One warning per cause, so that a validation call does not hide a later mis-wired training step."""
        if decision.cause in self._warned:
            return
        self._warned.add(decision.cause)
        hint = ""
        # A compiled model runs its top-level hooks eagerly but the blocks' hooks only if they
        # existed when it was traced: a forward seen without the block's tokens means that.
        compiled = hasattr(model, "_orig_mod") or getattr(self._student, "_compiled_call_impl", None) is not None
        if compiled and decision.cause in ("no-forward", "no-tokens") and (self._capture.forwards_seen == 0 or decision.cause == "no-tokens"):
            hint = (
                " The model was compiled before SelfRepresentationAlignment was created, so the compiled "
                "forward ignores its hooks: create sra first, then call torch.compile(model) "
                "(or call torch._dynamo.reset() once after creating sra)."
            )
        warnings.warn(
            f"SelfRepresentationAlignment found no student features from a training forward on this x_t: {decision.reason} "
            "(call model(x_t, t, ...) in training mode with grad enabled, with the same inputs as sra(...), right before it). "
            f"Running the student up to block {self.student_layer} again, which costs an extra partial forward; "
            f"sra.metrics['student_reruns'] counts these.{hint}",
            RuntimeWarning,
            stacklevel=4,
        )

    def _teacher_tokens(self, x_s: Tensor, s: Any, args: tuple, kwargs: dict, watched: dict) -> Tensor:
        t_args, t_kwargs = self.adapter.teacher_inputs(self._student, args, kwargs, watched)
        if self._user_teacher is not None:
            with torch.no_grad(), eval_mode(self._user_teacher):
                return run_until(self._user_teacher, self._teacher_block, self.adapter, x_s, s, t_args, t_kwargs)
        capture = self._capture
        with torch.no_grad(), self.ema.module_for_pass() as module, eval_mode(module):
            capture.paused = True  # a shared-weight pass runs the student's own hooked modules
            try:
                return run_until(module, self._teacher_block, self.adapter, x_s, s, t_args, t_kwargs)
            finally:
                capture.paused = False

    def forward(self, model: nn.Module, x_t: Tensor, x_s: Tensor, t: Any, s: Any, *args: Any,
                sample_weight: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The weighted SRA loss for one step. ``args``/``kwargs`` are the model's conditioning.

        ``sample_weight`` (``(B,)``, optional): the loss is ``weight * mean_b(sample_weight_b * l_b)``,
        ``l_b`` being sample b's alignment loss."""
        self._check_inputs(model, x_t, x_s, t, s, sample_weight)
        weight = self.current_weight()
        if self.ema is not None:
            self.ema.init_if_needed()
        if isinstance(weight, float) and weight == 0.0:
            # No teacher pass; the head stays in the graph (with zero gradient) so DDP(sra) sees it used.
            self._capture.record = None
            zero = sum((p.sum() for p in self.head.parameters()), torch.zeros((), device=x_t.device)) * 0.0
            nan = float("nan")  # not computed at this step
            self._metrics = {"loss": 0.0, "align_loss": nan, "cos_sim": nan, "student_norm": nan, "teacher_norm": nan,
                             "gap": nan, "weight": 0.0, "student_reruns": self.student_reruns}
            return zero
        student_tokens, watched = self._student_tokens(model, x_t, t, args, kwargs)
        target = self._teacher_tokens(x_s, s, args, kwargs, watched)
        if self.check_finite:
            for side, layer, value in (("student", self.student_layer, student_tokens), ("teacher", self.teacher_layer, target)):
                if not bool(torch.isfinite(value).all()):
                    raise FloatingPointError(f"non-finite {side} features at block {layer} (the {side} side of SRA)")
        pred = self.head(student_tokens)
        if pred.shape != target.shape:
            raise ValueError(
                f"head output {tuple(pred.shape)} and teacher tokens {tuple(target.shape)} differ: "
                "the adapter's tokens or the head do not fit this model"
            )
        device_type = pred.device.type
        autocast_off = torch.autocast(device_type=device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else nullcontext()
        with autocast_off:
            p, q = pred.float(), target.float()  # once: the loss and the metrics share them
            per_sample = losses.per_sample(self.loss_fn, p, q)
            align = per_sample.mean() if sample_weight is None else (sample_weight.float() * per_sample).mean()
            loss = weight * align
            with torch.no_grad():
                pd = p.detach()
                self._metrics = {
                    "loss": loss.detach(),
                    "align_loss": align.detach(),
                    "cos_sim": torch.nn.functional.cosine_similarity(pd, q, dim=-1).mean(),
                    "student_norm": student_tokens.detach().float().norm(dim=-1).mean(),
                    "teacher_norm": q.norm(dim=-1).mean(),
                    "weight": weight,
                    "student_reruns": self.student_reruns,
                }
                if isinstance(t, Tensor) or isinstance(s, Tensor):
                    self._metrics["gap"] = (torch.as_tensor(t) - torch.as_tensor(s)).abs().float().mean()
                else:
                    self._metrics["gap"] = abs(float(t) - float(s))
        return loss

    def update_teacher(self) -> None:
        """EMA step of an owned teacher (``decay * teacher + (1 - decay) * student``); always advances ``step``.

        Call it after each ``optimizer.step()``. The first call (or the first ``sra(...)``) starts the
        EMA from the model's weights at that moment. With a teacher you keep yourself, update that EMA as usual.
        """
        if self.ema is not None:
            self.ema.update()
        self.step += 1

    # ------------------------------------------------------------------ state
    def _identity(self) -> dict[str, Any]:
        return {
            "student_layer": self.student_layer,
            "teacher_layer": self.teacher_layer,
            "depth": self.depth,
            "head": self.head_name,
            "owned_teacher": self.ema is not None,
            "shared_teacher": self.ema is not None and self.ema.shared,
        }

    def get_extra_state(self) -> dict[str, Any]:
        return {"step": self.step, **self._identity()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._check_extra_state(state)
        self.step = int(state["step"])

    def _check_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"state dict has no SRA extra state (got {type(state).__name__})")
        mine = self._identity()
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            diff = ", ".join(f"{k}: saved {theirs[k]!r}, here {mine[k]!r}" for k in mine if theirs[k] != mine[k])
            raise ValueError(f"cannot load this SRA state dict into a differently configured one ({diff})")

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # torch sets this module's extra state before loading its children (so a wrong layer pair
        # or head name raises before the head or teacher change) but reports shape mismatches only
        # after copying everything else: check every shape first, so a wrong state changes nothing.
        if prefix + "_extra_state" in state_dict:
            self._check_extra_state(state_dict[prefix + "_extra_state"])
        wrong = [
            f"{key[len(prefix):]}: saved {tuple(state_dict[key].shape)}, here {tuple(value.shape)}"
            for key, value in self.state_dict(prefix=prefix).items()
            if isinstance(value, Tensor) and isinstance(state_dict.get(key), Tensor) and state_dict[key].shape != value.shape
        ]
        if wrong:
            raise ValueError(f"cannot load this SRA state dict: shapes differ ({'; '.join(wrong[:4])})")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ hooks
    def remove(self) -> None:
        """Remove every hook this object added to the model."""
        self._finalizer()

    def __enter__(self) -> "SelfRepresentationAlignment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def extra_repr(self) -> str:
        return (
            f"adapter={self.adapter.name!r}, blocks {self.student_layer}->{self.teacher_layer} of {self.depth}, "
            f"loss={self.loss_name!r}, head={self.head_name!r}, "
            f"teacher={'user EMA' if self.ema is None else ('shared-weight EMA' if self.ema.shared else 'owned EMA')}"
        )
