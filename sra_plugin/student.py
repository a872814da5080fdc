"""The objective base every method shares: the taps' tokens from the user's own forward (or one re-run
when they cannot be reused, shared with the other objectives on the model), the loss weight and its
schedule, the one ``_run`` template (inputs -> taps -> target -> head -> loss -> metrics), the
reduction of a loss to one number per sample, and the lifetime of the hooks."""

from __future__ import annotations

import json
import math
import warnings
import weakref
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Iterator, Union

import torch
from torch import Tensor, nn

from . import losses as loss_module
from ._checks import is_real
from .capture import Decision, Subscription, probe_call, subscribe
from .config import MethodConfig
from .heads import build_head
from .headsync import HeadSync
from .layers import resolve_layer
from .registry import Adapter, ModelCall, resolve_blocks
from .steps import OptimizerSteps
from .targets import Step, Target, check_times
from .wrappers import unwrap

__all__ = [
    "Objective", "StudentAligner", "Weight", "check_weight", "first_float_parameter", "head_name", "head_on_model",
    "loss_name", "placed_like", "resolve_objective",
]

Weight = Union[float, Tensor, Callable[[int], Union[float, Tensor]]]

STILL_STEP_CALLS = 1000
"""Training calls at one step, after ``update_teacher()`` was called once, that make a warning: far
more micro-batches than any gradient accumulation accumulates."""


STATE_BYTES = 1024
"""The extra state's length: JSON padded with spaces, so that its shape does not change as ``step``
grows (torch.distributed.checkpoint loads in place and needs the saved shape)."""


def encode_state(state: dict[str, Any]) -> Tensor:
    """A dict of plain values (numbers, strings, booleans, None) as JSON bytes in a 1-D uint8 tensor of
    ``STATE_BYTES`` (longer if the JSON is)."""
    data = json.dumps(state, sort_keys=True).encode()
    return torch.tensor(list(data.ljust(STATE_BYTES)), dtype=torch.uint8)


def decode_state(state: Any) -> dict[str, Any] | None:
    """The dict ``encode_state`` wrote (or a dict, as states saved by 0.2 hold), else None."""
    if isinstance(state, dict):
        return state
    if not isinstance(state, Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
        return None
    try:
        decoded = json.loads(state.cpu().numpy().tobytes())
    except ValueError:
        return None
    return decoded if isinstance(decoded, dict) else None


def check_weight(weight: Any, where: str) -> float | Tensor:
    """A loss weight: a real number >= 0 or a 0-dim floating tensor (checked for value only on the CPU,
    so that a GPU weight costs no device sync). A tensor that requires grad (an ``nn.Parameter``, or one
    computed from parameters, as in uncertainty weighting) keeps its graph: it gets a gradient."""
    if isinstance(weight, Tensor):
        if weight.dim() != 0 or not weight.is_floating_point():
            raise ValueError(f"{where}={weight!r} is not accepted: use a number >= 0 or a 0-dim floating tensor")
        value = weight.detach()  # reading a learnable weight's value is no use of its graph
        if value.device.type == "cpu" and not (bool(torch.isfinite(value)) and float(value) >= 0):
            raise ValueError(f"{where}={weight!r} is not accepted: use a finite number >= 0")
        return weight if weight.requires_grad else weight.detach()
    if not is_real(weight) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{where}={weight!r} is not accepted: use a finite number >= 0 or a 0-dim floating tensor")
    return float(weight)


def resolve_objective(model: nn.Module, adapter: Any, weight: Any, **layers: int | float) -> tuple[nn.Module, Adapter, list[nn.Module], dict[str, int], Weight]:
    """What every objective's constructor checks first, before it creates anything: the model's blocks
    (through its adapter), each named layer argument as a 1-based block number, and the weight (a
    schedule ``step -> weight`` is kept as given and checked at each call)."""
    student, adapter, blocks = resolve_blocks(model, adapter)
    indices = {name: resolve_layer(value, len(blocks), name) for name, value in layers.items()}
    return student, adapter, blocks, indices, weight if callable(weight) else check_weight(weight, "weight")


def head_name(head: str | nn.Module) -> str:
    """The name a head is saved and shown by: its name, or its module's class name."""
    return head if isinstance(head, str) else type(head).__name__


def loss_name(loss: Any) -> str:
    """The name a loss is shown by: its name, or its function's name."""
    return loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")


def first_float_parameter(model: nn.Module) -> Tensor | None:
    """The model's first floating parameter that trains (its device and dtype are the head's), else its
    first floating one: a bf16 base with float32 LoRA gets a float32 head, which AdamW can update."""
    floating = [p for p in model.parameters() if p.is_floating_point()]
    return next((p for p in floating if p.requires_grad), floating[0] if floating else None)


def head_on_model(head: str | nn.Module, dim: int, target_dim: int, student: nn.Module) -> nn.Module:
    """``build_head``, placed where it computes: a named head on the student's device, in the dtype of its
    trainable parameters (``first_float_parameter``); a module of the user's as given."""
    module = build_head(head, dim, target_dim)
    return module if isinstance(head, nn.Module) else placed_like(module, student)


def placed_like(module: nn.Module, student: nn.Module) -> nn.Module:
    """A head the package builds, on the student's device, in the dtype of its trainable parameters."""
    like = first_float_parameter(student)
    return module if like is None else module.to(device=like.device, dtype=like.dtype)


class Objective(nn.Module):
    """Base of every objective (SRA, SRA 2, LayerSync, Dispersive, REPA, iREPA, SRA-DTS); not used on its own.

    An objective is taps + target + head + loss + weight. One template, ``_run``: check the inputs, read
    the weight (a weight of 0 skips the work), take the student's taps from the user's forward (or re-run it
    once), ask the target (``targets.Target``) for its tokens with one ``targets.Step``, then ``_loss``: head,
    loss, reduction per sample (``weight * mean_b(w_b * l_b)``) and metrics.

    A method's ``__init__`` checks its own arguments, then calls ``_setup`` once with its config
    (``config.MethodConfig``: the saved identity and the ``repr``), its taps (name -> 1-based block;
    ``"student"`` is the one the head reads), head, loss and weight; it implements ``_make_target()`` and
    ``forward``. ``build_head`` may be overridden (REPA's projector); a head module whose ``takes_grid`` is
    true is called with the tokens' ``(h, w)`` grid as well.
    """

    _transient: tuple[str, ...] = ("_capture", "_finalizer", "_warned", "_steps_seen", "_head_sync", "_source")
    average_head_grads = True  # several processes, called bare (no DDP): average the head's gradients (headsync)
    grad_taps: tuple[str, ...] = ("student",)  # taps whose tokens must carry gradient
    taps_from_forward = True  # False: the method runs its own passes (SRA-DTS), no hooks on the user's forward

    @property
    def student_layer(self) -> int:
        return self.taps["student"]

    @property
    def metric_names(self) -> tuple[str, ...]:
        source = self._source
        return ("align_loss", "cos_sim", "student_norm", f"{source.name}_norm", *source.extra_metrics)

    # The step rule's bookkeeping (class defaults, so objects pickled by 0.2 load too).
    _steps_from_updates = False  # True once update_teacher() was called: from then on it counts the steps
    _counted_calls = 0  # steps counted by training calls before that (the first update replaces them)
    _counted_until = 0  # the step those calls left
    _calls_since_update = 0

    def _setup(self, student: nn.Module, adapter: Adapter, config: MethodConfig, taps: dict[str, int], *,
               head: str | nn.Module, dims: tuple[int, int], loss: Any, weight: Weight, check_finite: bool,
               loss_label: str | None = None) -> None:
        """The objective's one initialisation, after its constructor checked its own arguments: the loss and
        the head (``build_head``, on ``dims``: the student's and the target's token widths) are built, then
        the hooks attached."""
        loss_fn = loss_module.build_loss(loss)
        self.config = config
        self.head = self.build_head(head, *dims, student)
        # Set past nn.Module's __setattr__: a learnable weight (an nn.Parameter) is the user's, not a
        # parameter of this module (not in its state dict, nor synchronised by DDP as ours).
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "_student", student)  # the user's model: not a submodule of ours
        self.adapter, self.taps, self.loss_fn = adapter, dict(taps), loss_fn
        self.loss_name = loss_label or loss_name(loss)
        self.head_name = head_name(head)
        self.check_finite = bool(check_finite)
        self.step = 0
        self.student_reruns = 0
        self._metrics: dict[str, Tensor | float] = {}
        self._attach()

    def build_head(self, head: str | nn.Module, dim: int, target_dim: int, student: nn.Module) -> nn.Module:
        """The head from student tokens of width ``dim`` to target tokens of ``target_dim``: a named head
        (``heads.build_head``) on the student's device and dtype, or the user's module as given."""
        return head_on_model(head, dim, target_dim, student)

    def _make_target(self) -> Target:
        """The method's target source (built at construction and again after a copy or unpickling)."""
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            config = self.__dict__.get("config")
            if config is not None and name in getattr(config, "__dataclass_fields__", {}):
                return getattr(config, name)  # the method's options: sra.teacher_layer, ls.detach_target, ...
            raise

    def _attach(self) -> None:
        """Subscribe to the student's shared capture (again, after a copy or unpickling), tie the
        subscription's lifetime to this object, and build the target. These are the transient attributes
        (``_transient``): not pickled, not copied, rebuilt here."""
        capture = subscribe(self._student, self.adapter, dict(self.taps), frozenset(self.grad_taps)) if self.taps_from_forward else None
        # Dropped without remove(): the hooks go with this object, holding no activations.
        finalizer = weakref.finalize(self, Subscription.close, capture) if capture is not None else (lambda: None)
        # Several processes without DDP(self): rank 0's head, and head gradients averaged over the ranks.
        self.__dict__.update(_capture=capture, _warned=set(), _finalizer=finalizer, _head_sync=HeadSync(self))
        self.__dict__["_source"] = self._make_target()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        for key in self._transient:
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._attach()

    # ------------------------------------------------------------------ weight and metrics
    @property
    def metrics(self) -> dict[str, float]:
        """The last call's figures as plain floats (converted on access, so a step costs no device sync)."""
        return {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in self._metrics.items()}

    def current_weight(self) -> float | Tensor:
        if callable(self.weight):
            return check_weight(self.weight(self.step), f"weight({self.step})")
        return self.weight

    # The step rule, one for every objective: ``step`` counts training steps. A training step ends at
    # each ``update_teacher()`` (SRA's); until that is first called on this object (a teacher the user
    # updates, or an objective without a teacher) each call with gradients enabled ends one.
    def _count_training_call(self) -> None:
        """After a call's weight was read: the step advances if calls count the steps; a step that
        has stood still for ``STILL_STEP_CALLS`` training calls warns once."""
        if not torch.is_grad_enabled():
            return
        if not self._steps_from_updates:
            self.step += 1
            self._counted_calls += 1
            self._counted_until = self.step
            return
        self._calls_since_update += 1
        if self._calls_since_update == STILL_STEP_CALLS and "still-step" not in self._warned:
            self._warned.add("still-step")
            warnings.warn(
                f"{type(self).__name__}.step has stayed at {self.step} for {STILL_STEP_CALLS} training calls: "
                "once update_teacher() has been called, only update_teacher() advances the step (and the owned "
                "EMA), so a weight schedule and the teacher stand still. Call update_teacher() after every "
                "optimizer step, or never (then every training call counts as a step)",
                RuntimeWarning,
                stacklevel=3,
            )

    def _count_update(self, update: Callable[[], None] = lambda: None) -> None:
        """``update_teacher()``: run ``update`` (the EMA step) and advance the step, if an optimizer step
        happened since the last call. From the first call on, only this advances the step; the steps that
        this object's training calls counted before it are replaced by that one. A call with no optimizer
        step since the last one (every micro-batch under gradient accumulation) does nothing (said once)."""
        steps = self._optimizer_steps()
        stepped, look = steps.look(self._student)
        if stepped:
            update()  # first: if it raises, nothing here changed
            steps.keep(look)
        if not self._steps_from_updates:
            self._steps_from_updates = True
            if self._counted_calls and self.step == self._counted_until:
                self.step -= self._counted_calls
        self._calls_since_update = 0
        if stepped:
            self.step += 1
        elif "no-optimizer-step" not in self._warned:
            self._warned.add("no-optimizer-step")
            warnings.warn(
                f"{type(self).__name__}.update_teacher() was called with no optimizer step since its last call (no "
                "torch optimizer stepped and no trainable parameter changed): under gradient accumulation the line "
                "after optimizer.step() runs at every micro-batch. Such calls are ignored, so the EMA and the step "
                "move once per optimizer step. (Said once. If your update writes the weights through .data outside "
                "a torch optimizer, update them under torch.no_grad() without .data instead.)",
                RuntimeWarning,
                stacklevel=3,
            )

    @contextmanager
    def _uncounted(self, manager: AbstractContextManager) -> Iterator[Any]:
        """``manager``'s context, whose writes into the trainable parameters (the teacher's weights swapped
        in and back, for sampling) are not an optimizer step for ``update_teacher()``."""
        steps = self._optimizer_steps()
        stepped_before, _ = steps.look(self._student)
        with manager as value:
            yield value
        if not stepped_before:
            steps.keep(steps.look(self._student)[1])

    def _optimizer_steps(self) -> OptimizerSteps:
        found = self.__dict__.get("_steps_seen")
        if found is None:
            found = self.__dict__["_steps_seen"] = OptimizerSteps()
        return found

    @staticmethod
    def _is_zero(weight: float | Tensor) -> bool:
        """A weight of 0 skips the step's work: a number, or a CPU tensor (a device tensor is not read,
        which would cost a sync; its step runs and contributes 0)."""
        if isinstance(weight, Tensor):
            return weight.device.type == "cpu" and float(weight.detach()) == 0.0
        return weight == 0.0

    def _skipped(self, device: torch.device) -> Tensor:
        """The loss at a step of weight 0: nothing runs; the head stays in the graph (with zero
        gradient) so that ``DDP(...)`` of this module sees every parameter used."""
        if self._capture is not None:  # SRA-DTS runs its own passes: no capture
            self._capture.drop()
        zero = sum((p.sum() for p in self.head.parameters()), torch.zeros((), device=device)) * 0.0
        nan = float("nan")  # not computed at this step
        self._metrics = {"loss": 0.0, **{name: nan for name in self.metric_names}, "weight": 0.0, "student_reruns": self.student_reruns}
        return zero

    # ------------------------------------------------------------------ the template
    def _run(self, model: Any, x_t: Any, t: Any, args: tuple, kwargs: dict,
             sample_weight: Tensor | None = None, **inputs: Any) -> Tensor:
        """The weighted loss of one step; ``inputs`` are the method's own (``x_s``, ``x0``, ``images``)."""
        self._check_model(model)
        if not isinstance(x_t, Tensor):
            raise TypeError(f"x_t must be a torch.Tensor, got {type(x_t).__name__}")
        step = Step(model, self._student, x_t, t, ModelCall(args, kwargs), inputs)
        self._check_inputs(step)
        self._check_sample_weight(sample_weight, step.batch)
        weight = self._begin_call(model)
        if self._is_zero(weight):
            self._count_training_call()
            return self._skipped(x_t.device)
        step.taps, step.watched = self._student_taps(model, x_t, t, args, kwargs)
        loss = self._align(step, self._source(step), weight, sample_weight)
        self._count_training_call()  # last: a call that raises counts no step
        return loss

    def _begin_call(self, model: nn.Module) -> float | Tensor:
        """Past every check of a call: the step's weight; the first look for ``update_teacher()``, the head's
        synchronisation and the target's ``begin()`` (an owned EMA starts at first use)."""
        weight = self.current_weight()
        if torch.is_grad_enabled():
            self._optimizer_steps().start(self._student)  # the first look, for the first update_teacher()
            self._head_sync.begin_call(self, model)
        self._source.begin()
        return weight

    def _align(self, step: Step, target: Tensor | None, weight: float | Tensor, sample_weight: Tensor | None) -> Tensor:
        """The weighted loss of the student's taps against ``target``, and the step's metrics."""
        if self.check_finite:
            self._check_finite(step.taps["student"], target)
        loss = self._loss(step, target, weight, sample_weight)
        self._metrics.update(self._source.metrics(step))
        return loss

    def _check_inputs(self, step: Step) -> None:
        """The method's own inputs (those its target reads), then the time."""
        self._source.check(step)
        check_times(step.batch, t=step.t)

    def _check_finite(self, student: Tensor, target: Tensor | None) -> None:
        sides = [("student", self.student_layer, student)]
        if target is not None and self._source.checks_finite:
            sides.append((self._source.name, self._source.layer, target))
        for side, layer, value in sides:
            if not bool(torch.isfinite(value).all()):
                where = f" at block {layer}" if layer is not None else ""
                raise FloatingPointError(f"non-finite {side} features{where} (the {side} side of {type(self).__name__})")

    def _loss(self, step: Step, target: Tensor, weight: float | Tensor, sample_weight: Tensor | None) -> Tensor:
        """Head, loss reduced per sample, metrics."""
        tokens = step.taps["student"]
        pred = self._project(step)
        name = self._source.name
        if pred.shape != target.shape:
            raise ValueError(
                f"head output {tuple(pred.shape)} and {name} tokens {tuple(target.shape)} differ: "
                "the adapter's tokens or the head do not fit this model"
            )
        loss, align, p, q = self._reduce(pred, target, weight, sample_weight)
        self._record_metrics(loss, align, p, q, tokens, weight, name)
        return loss

    # ------------------------------------------------------------------ inputs
    def _check_model(self, model: Any) -> None:
        if not isinstance(model, nn.Module) or unwrap(model) is not self._student:
            raise ValueError(
                f"model={type(model).__name__} is not the model this {type(self).__name__} was built on "
                f"({type(self._student).__name__}): pass that model (wrapped or not)"
            )

    def _check_sample_weight(self, sample_weight: Any, batch: int | None) -> None:
        """One finite weight >= 0 per sample, as for ``weight``. Values are read where that is free: always
        for a CPU tensor; for a device tensor only with ``check_finite=True`` (reading them costs a sync)."""
        if sample_weight is None:
            return
        accepted = f"use a floating tensor of shape ({batch},), one finite weight >= 0 per sample"
        if not isinstance(sample_weight, Tensor):
            raise TypeError(f"sample_weight={type(sample_weight).__name__} is not accepted: {accepted}")
        if not sample_weight.is_floating_point():
            raise TypeError(
                f"sample_weight of dtype {sample_weight.dtype} is not accepted: {accepted} "
                "(e.g. sample_weight.float())"
            )
        if sample_weight.shape != (batch,):
            raise ValueError(f"sample_weight of shape {tuple(sample_weight.shape)} is not accepted: {accepted}")
        if sample_weight.device.type == "cpu" or self.check_finite:
            values = sample_weight.detach()
            bad = ~torch.isfinite(values) | (values < 0)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"sample_weight[{i}]={float(values[i])!r} is not accepted: {accepted}")

    # ------------------------------------------------------------------ the student's tokens
    def _student_taps(self, model: nn.Module, x_t: Tensor, t: Any, args: tuple, kwargs: dict) -> tuple[dict[str, Tensor], dict]:
        """Every tap's tokens for ``model(x_t, t, ...)``: the user's own forward's if it ran on exactly
        these inputs, else one re-run of the student (warned once per cause, counted) whose result the
        other objectives on this model share."""
        capture = self._capture
        decision = capture.take(lambda: probe_call(self._student, self.adapter, x_t, t, args, kwargs))
        record = decision.captured
        if record is None:
            self.student_reruns += 1
            self._warn(model, decision)
            record = capture.rerun(x_t, t, args, kwargs)
        return record.taps, record.watched

    def _warn(self, model: nn.Module, decision: Decision) -> None:
        """One warning per cause, so that a validation call does not hide a later mis-wired training step."""
        if decision.cause in self._warned:
            return
        self._warned.add(decision.cause)
        hint = ""
        # A compiled model runs its top-level hooks eagerly but the blocks' hooks only if they
        # existed when it was traced: a forward seen without the block's tokens means that.
        compiled = hasattr(model, "_orig_mod") or getattr(self._student, "_compiled_call_impl", None) is not None
        if compiled and decision.cause in ("no-forward", "no-tokens") and (self._capture.forwards_seen == 0 or decision.cause == "no-tokens"):
            name = type(self).__name__
            hint = (
                f" The model was compiled before {name} was created, so the compiled forward ignores its hooks: "
                f"create {name} first, then call torch.compile(model) (or call torch._dynamo.reset() once after creating it). "
                "If another instance of this model class was compiled first (an eval or EMA copy), its graph, traced "
                "without these hooks, is reused, because torch.compile does not guard on hooks by default: set "
                "torch._dynamo.config.skip_nnmodule_hook_guards = False before compiling."
            )
        warnings.warn(
            f"{type(self).__name__} found no student features from a training forward on this x_t: {decision.reason} "
            "(call model(x_t, t, ...) in training mode with grad enabled, with the same inputs, right before it). "
            f"Running the student up to block {self.student_layer} again, which costs an extra partial forward; "
            f"metrics['student_reruns'] counts these.{hint}",
            RuntimeWarning,
            stacklevel=7,  # the user's line: _wrapped_call_impl -> _call_impl -> forward -> _run -> _student_taps -> _warn
        )

    # ------------------------------------------------------------------ the loss
    @staticmethod
    def _float32(like: Tensor) -> Any:
        """A context in which autocast is off on ``like``'s device, so float32 stays float32."""
        return loss_module.no_autocast(like.device.type)

    def _project(self, step: Step) -> Tensor:
        """The head on the student's tokens; a head whose ``takes_grid`` is true also gets their ``(h, w)`` grid."""
        tokens = self._as_head_input(step.taps["student"])
        return self.head(tokens, step.grid) if getattr(self.head, "takes_grid", False) else self.head(tokens)

    def _as_head_input(self, tokens: Tensor) -> Tensor:
        """The student's tokens in the head's floating dtype: a model cast after this object was built
        (``model.to(torch.bfloat16)``) keeps a head in the dtype it was created in."""
        like = first_float_parameter(self.head)
        return tokens if like is None or like.dtype == tokens.dtype else tokens.to(like.dtype)

    def _reduce(self, pred: Tensor, target: Tensor, weight: float | Tensor,
                sample_weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``weight * mean_b(w_b * l_b)`` in float32 whatever autocast is active; also the float32
        ``pred`` and ``target`` (made once: the metrics share them) and the unweighted alignment."""
        with self._float32(pred):
            p, q = pred.float(), target.float()
            losses = loss_module.per_sample(self.loss_fn, p, q)
            align = losses.mean() if sample_weight is None else (sample_weight.float() * losses).mean()
            return weight * align, align, p, q

    def _record_metrics(self, loss: Tensor, align: Tensor, p: Tensor, q: Tensor, tokens: Tensor,
                        weight: float | Tensor, target_name: str) -> None:
        """The step's figures, kept as tensors (read as floats by ``metrics``, so no device sync here)."""
        with torch.no_grad(), self._float32(p):
            self._metrics = {
                "loss": loss.detach(),
                "align_loss": align.detach(),
                "cos_sim": torch.nn.functional.cosine_similarity(p, q, dim=-1).mean(),
                "student_norm": tokens.float().norm(dim=-1).mean(),
                f"{target_name}_norm": q.norm(dim=-1).mean(),
                "weight": weight,
                "student_reruns": self.student_reruns,
            }

    # ------------------------------------------------------------------ state
    def _identity(self) -> dict[str, Any]:
        """What a saved state must agree on to be loaded here (layers, head, ...): the config's saved fields."""
        return self.config.identity()

    def extra_repr(self) -> str:
        return f"adapter={self.adapter.name!r}, {self.config.describe()}"

    def get_extra_state(self) -> Tensor:
        """``step`` and the identity as JSON bytes in a uint8 tensor: every checkpoint writer takes a
        tensor (accelerate's default ``save_state`` writes safetensors, which refuses a dict)."""
        return encode_state({"step": self.step, "steps_from_updates": self._steps_from_updates, **self._identity()})

    def set_extra_state(self, state: Tensor | dict[str, Any]) -> None:
        state = self._check_extra_state(state)
        self.step = int(state["step"])
        # Which of the step rule's two counters runs resumes too: otherwise the micro-batches of the first
        # optimizer step after a resume would each advance the step (and read a schedule's later weights).
        self._steps_from_updates = bool(state.get("steps_from_updates", False))
        self._counted_calls = self._counted_until = self._calls_since_update = 0

    def _check_extra_state(self, state: Any) -> dict[str, Any]:
        """The saved extra state as a dict, if it belongs to an object configured like this one."""
        decoded = decode_state(state)
        if decoded is None or "step" not in decoded:
            raise ValueError(f"state dict has no extra state of a {type(self).__name__} (got {type(state).__name__})")
        mine = decode_state(encode_state(self._identity()))  # as JSON gives it back: tuples are lists
        old = self.config.old_values()
        theirs = {k: decoded.get(k, old.get(k)) for k in mine}
        if theirs != mine:
            diff = ", ".join(f"{k}: saved {theirs[k]!r}, here {mine[k]!r}" for k in mine if theirs[k] != mine[k])
            raise ValueError(f"cannot load this state dict into a differently configured {type(self).__name__} ({diff})")
        return decoded

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # torch sets this module's extra state before loading its children (so a wrong layer pair
        # or head name raises before the head or teacher change) but reports shape mismatches only
        # after copying everything else: check every shape first, so a wrong state changes nothing.
        if prefix + "_extra_state" in state_dict:
            self._check_extra_state(state_dict[prefix + "_extra_state"])
        wrong = [
            f"{key[len(prefix):]}: saved {tuple(state_dict[key].shape)}, here {tuple(value.shape)}"
            for key, value in self.state_dict(prefix=prefix).items()
            if key != prefix + "_extra_state" and isinstance(value, Tensor) and isinstance(state_dict.get(key), Tensor) and state_dict[key].shape != value.shape
        ]
        if wrong:
            raise ValueError(f"cannot load this state dict into {type(self).__name__}: shapes differ ({'; '.join(wrong[:4])})")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ hooks
    def remove(self) -> None:
        """Remove every hook this object added to the model (and its head's gradient hooks)."""
        self._finalizer()
        self._head_sync.remove()

    def checkpoint_with(self, accelerator: Any) -> "Objective":
        """``accelerator.register_for_checkpointing(self)``, returning ``self``: ``accelerator.save_state`` and
        ``load_state`` then save and restore this object's state (head, owned EMA teacher, ``step``) next to the
        models, without passing it to ``accelerator.prepare`` or touching the script's save/load hooks::

            sra = SelfRepresentationAlignment(transformer, ...).checkpoint_with(accelerator)
        """
        register = getattr(accelerator, "register_for_checkpointing", None)
        if not callable(register):
            raise TypeError(
                f"accelerator={type(accelerator).__name__} is not accepted: pass an accelerate.Accelerator "
                "(anything with register_for_checkpointing(obj))"
            )
        register(self)
        return self

    def __enter__(self) -> "Objective":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


StudentAligner = Objective  # the 0.2 name of this base
