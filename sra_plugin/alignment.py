"""SelfRepresentationAlignment: capture the student's block, run the teacher, align through a head."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .capture import StudentCapture, run_until
from .heads import build_head
from .layers import resolve_layer
from .losses import alignment_loss, build_loss
from .registry import Adapter, resolve_adapter
from .teacher import check_same_structure, ema_copy, eval_mode, update_ema_
from .wrappers import unwrap

__all__ = ["SelfRepresentationAlignment"]


def _check_weight(weight: float, where: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{where}={weight!r} is not accepted: use a finite number >= 0")
    return float(weight)


def _batch_of(value: Any) -> int | None:
    return value.shape[0] if isinstance(value, Tensor) and value.dim() > 0 else None


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
        weight: float | Callable[[int], float] = 0.2,
        adapter: str | Adapter | None = None,
        check_finite: bool = False,
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
        if not callable(weight):
            weight = _check_weight(weight, "weight")
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
        # The owned teacher is copied before any hook is attached, so it carries none of ours.
        self.ema: nn.Module | None = ema_copy(student) if user_teacher is None else None
        object.__setattr__(self, "_student", student)
        object.__setattr__(self, "_user_teacher", user_teacher)
        # Plain attributes, not submodules: the student is the user's, and so are its blocks.
        object.__setattr__(self, "_student_block", blocks[student_index - 1])
        object.__setattr__(self, "_teacher_block", adapter.blocks(self.teacher)[teacher_index - 1])
        self._capture = StudentCapture(student, self._student_block, adapter)
        self._warned = False
        self._metrics: dict[str, Tensor | float] = {}

    # ------------------------------------------------------------------ properties
    @property
    def teacher(self) -> nn.Module:
        """The teacher: the owned EMA copy (also the model to sample from) or the user's EMA model."""
        return self.ema if self.ema is not None else self._user_teacher

    @property
    def student(self) -> nn.Module:
        return self._student

    @property
    def metrics(self) -> dict[str, float]:
        """The last call's figures as plain floats: loss, align_loss, cos_sim, gap, student_norm,
        teacher_norm, weight (converted on access, so a step costs no device sync)."""
        return {k: float(v) for k, v in self._metrics.items()}

    def current_weight(self) -> float:
        if callable(self.weight):
            return _check_weight(self.weight(self.step), f"weight({self.step})")
        return self.weight

    # ------------------------------------------------------------------ the step
    def _check_inputs(self, model: Any, x_t: Any, x_s: Any, t: Any, s: Any) -> None:
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
            if b is not None and b != batch:
                raise ValueError(f"{name} has batch size {b} but x_t has {batch}: give one time per sample")

    def _student_tokens(self, model: nn.Module, x_t: Tensor, t: Any, args: tuple, kwargs: dict) -> tuple[Tensor, dict]:
        pending = self._capture.record
        record = self._capture.take(x_t)
        if record is not None:
            return record["tokens"], record.get("watched", {})
        if not self._warned:
            self._warned = True
            hint = ""
            # A compiled model runs its top-level hooks eagerly but the blocks' hooks only if they
            # existed when it was traced: a forward seen without the block's tokens means that.
            block_skipped = pending is not None and "tokens" not in pending and not pending.get("no_grad_block")
            compiled = hasattr(model, "_orig_mod") or getattr(self._student, "_compiled_call_impl", None) is not None
            if compiled and (self._capture.forwards_seen == 0 or block_skipped):
                hint = (
                    " The model was compiled before SelfRepresentationAlignment was created, so the compiled "
                    "forward ignores its hooks: create sra first, then call torch.compile(model) "
                    "(or call torch._dynamo.reset() once after creating sra)."
                )
            warnings.warn(
                "SelfRepresentationAlignment found no student features from a training forward on this x_t "
                "(call model(x_t, ...) in training mode with grad enabled before sra(...)); running the student "
                f"up to block {self.student_layer} again, which costs an extra partial forward.{hint}",
                RuntimeWarning,
                stacklevel=3,
            )
        student = self._student
        self._capture.forced = True
        try:
            tokens = run_until(student, self._student_block, self.adapter, x_t, t, args, kwargs)
        finally:
            self._capture.forced = False
        record = self._capture.record or {}
        self._capture.record = None
        return tokens, record.get("watched", {})

    def forward(self, model: nn.Module, x_t: Tensor, x_s: Tensor, t: Any, s: Any, *args: Any, **kwargs: Any) -> Tensor:
        """The weighted SRA loss for one step. ``args``/``kwargs`` are the model's conditioning."""
        self._check_inputs(model, x_t, x_s, t, s)
        weight = self.current_weight()
        student_tokens, watched = self._student_tokens(model, x_t, t, args, kwargs)
        t_args, t_kwargs = self.adapter.teacher_inputs(self._student, args, kwargs, watched)
        teacher = self.teacher
        with torch.no_grad(), eval_mode(teacher):
            target = run_until(teacher, self._teacher_block, self.adapter, x_s, s, t_args, t_kwargs)
        target = target.detach()
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
        align = alignment_loss(self.loss_fn, pred, target)
        loss = weight * align
        with torch.no_grad():
            p, q = pred.detach().float(), target.float()
            self._metrics = {
                "loss": loss.detach(),
                "align_loss": align.detach(),
                "cos_sim": torch.nn.functional.cosine_similarity(p, q, dim=-1).mean(),
                "student_norm": student_tokens.detach().float().norm(dim=-1).mean(),
                "teacher_norm": q.norm(dim=-1).mean(),
                "weight": weight,
            }
            if isinstance(t, Tensor) or isinstance(s, Tensor):
                self._metrics["gap"] = (torch.as_tensor(t) - torch.as_tensor(s)).abs().float().mean()
            else:
                self._metrics["gap"] = abs(float(t) - float(s))
        return loss

    def update_teacher(self) -> None:
        """EMA step of an owned teacher (``decay * teacher + (1 - decay) * student``); always advances ``step``.

        Call it after each ``optimizer.step()``. With a teacher you keep yourself, update that EMA as usual.
        """
        if self.ema is not None:
            update_ema_(self.ema, self._student, self.ema_decay)
        self.step += 1

    # ------------------------------------------------------------------ state
    def _identity(self) -> dict[str, Any]:
        return {
            "student_layer": self.student_layer,
            "teacher_layer": self.teacher_layer,
            "depth": self.depth,
            "head": self.head_name,
            "owned_teacher": self.ema is not None,
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
        self._capture.remove()

    def __enter__(self) -> "SelfRepresentationAlignment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def extra_repr(self) -> str:
        return (
            f"adapter={self.adapter.name!r}, blocks {self.student_layer}->{self.teacher_layer} of {self.depth}, "
            f"loss={self.loss_name!r}, head={self.head_name!r}, teacher={'owned EMA' if self.ema is not None else 'user EMA'}"
        )
