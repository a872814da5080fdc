"""The capture every objective on a model shares: its hooks keep the tokens of the tapped blocks from the
user's own forward (one record per step), and it hands that record to each objective, or re-runs the student.

One ``StudentCapture`` per model (and adapter) is shared by every objective on it (``subscribe``): each
objective holds a ``Subscription`` naming its taps (1-based blocks), so SRA, LayerSync, Dispersive, ...
on one model share one set of hooks and one record of the forward, and the student's blocks run once
per step. A call whose inputs do not match the captured forward re-runs the model once, up to the
deepest tap any subscriber needs; the other objectives of that step reuse that re-run.

The other jobs live apart: hook primitives and stopped passes in ``hooks`` (hook hygiene is described
there), what a stopped pass puts back in ``module_state``, the record of a forward in ``record``, and the
comparison that decides reuse or re-run in ``matching``. Their public names are importable from here too.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .hooks import StopForward, _Hook, _PostHook, attach, probe_call, reading_blocks, run_until
from .matching import CallSignature, Decision, mismatch
from .module_state import adapter_state, restoring_model_state
from .record import Captured, Fingerprint, Snapshot, TapRecord, _tensors
from .registry import Adapter, ModelCall, token_reader

__all__ = ["StopForward", "attach", "reading_blocks", "run_until", "probe_call", "restoring_model_state", "adapter_state",
           "subscribe", "StudentCapture", "Subscription", "Captured", "TapRecord", "Decision", "Snapshot", "Fingerprint"]


NO_GRAD_BLOCK = (
    "the student block ran with gradients disabled inside a training forward that had them enabled, so its "
    "tokens carry no gradient and SRA would train only the head, not the model. Reentrant gradient "
    "checkpointing around the block does this: torch.utils.checkpoint.checkpoint(..., use_reentrant=True), "
    "e.g. LightningDiT's use_checkpoint=True, timm with TIMM_REENTRANT_CKPT=1 or set_reentrant_ckpt(True), "
    "diffusers' enable_gradient_checkpointing(gradient_checkpointing_func=...) with use_reentrant=True. "
    "Use non-reentrant checkpointing (use_reentrant=False, the default of diffusers and timm), or keep "
    "the student block out of the checkpointed region."
)


class Subscription:
    """One objective's handle on the model's shared ``StudentCapture``: its named taps (1-based blocks)
    and which of them must carry gradient. ``record`` is the pending forward as this objective sees it,
    ``None`` once it took (or dropped) it."""

    def __init__(self, capture: "StudentCapture", taps: dict[str, int], grad_taps: frozenset[str]) -> None:
        self.capture = capture
        self.taps = dict(taps)
        self.grad_taps = grad_taps
        self.closed = False
        self._view: TapRecord | None = None

    @property
    def forwards_seen(self) -> int:
        return self.capture.forwards_seen

    @property
    def record(self) -> TapRecord | None:
        forward = self.capture.record
        if self.closed or forward is None or id(self) in forward.taken:
            return None
        if self._view is None or self._view.forward is not forward:
            self._view = TapRecord(forward, self.taps)
        return self._view

    def take(self, expected: Callable[[], ModelCall]) -> Decision:
        return self.capture.take(self, expected)

    def rerun(self, x: Tensor, t: Any, args: tuple, kwargs: dict) -> TapRecord:
        return self.capture.rerun(self, x, t, args, kwargs)

    def pausing(self) -> Any:
        """The shared capture's ``pausing()``: forwards run inside are not the student's."""
        return self.capture.pausing()

    def drop(self) -> None:
        """Forget the pending forward for this objective (a step that needs no features)."""
        self.capture.mark_taken(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.capture.unsubscribe(self)


_CAPTURES: "weakref.WeakValueDictionary[tuple[int, int], StudentCapture]" = weakref.WeakValueDictionary()


def subscribe(model: nn.Module, adapter: Adapter, taps: dict[str, int],
              grad_taps: frozenset[str] | None = None) -> Subscription:
    """A subscription to ``model``'s shared capture (created on first use): several objectives on one
    model share its hooks and its record, so the student's blocks run once per step."""
    capture = _CAPTURES.get((id(model), id(adapter)))
    if capture is None or capture.model is not model or capture.adapter is not adapter or not capture.subscribers:
        capture = StudentCapture(model, adapter)
        _CAPTURES[(id(model), id(adapter))] = capture
    return capture.subscribe(taps, frozenset(taps) if grad_taps is None else grad_taps)


class StudentCapture:
    """The hooks of one model, shared by every objective on it: keeps the tokens of each tapped block
    from the model's training forward (grad enabled, training mode) and decides, per objective, whether
    they may be reused: only if that forward ran on the same inputs (``x_t``, ``t``, conditioning: the
    same objects or equal values) and nothing changed the inputs or the tokens in place since. The
    record is forgotten once every objective took it.

    Its switches are set through its own context managers: ``pausing()`` (a probe or a teacher pass
    runs on the student's modules) and ``forcing()`` (a re-run of the student).
    """

    def __init__(self, model: nn.Module, adapter: Adapter) -> None:
        self.model = model
        self.adapter = adapter
        self.blocks = adapter.blocks(model)
        self._read_tokens = token_reader(adapter)
        self.subscribers: list[Subscription] = []
        self._record: Captured | None = None
        self._forced = False
        self._paused = 0
        self.forwards_seen = 0  # 0 until the model's forward first ran with our hooks (compile-order hint)
        self._calls = CallSignature(model.forward)
        self.handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(_Hook(self, "_start", model), with_kwargs=True),
            model.register_forward_hook(_PostHook(self, "_end", model)),
        ]
        self._tap_handles: dict[int, RemovableHandle] = {}
        self._watched: dict[str, Callable[[tuple, dict], Any]] = {}
        for name, (module, read) in adapter.watch(model).items():
            self._watched[name] = read
            self.handles.append(module.register_forward_pre_hook(_Hook(self, "_watch", module, name), with_kwargs=True))

    @property
    def record(self) -> Captured | None:
        """The pending training forward, until every subscriber took it."""
        return self._record

    @record.setter
    def record(self, value: Captured | None) -> None:
        self._record = value
        for sub in self.subscribers:
            sub._view = None  # a view must not keep an old forward's activations alive

    # -------------------------------------------------------------- subscribers
    def subscribe(self, taps: dict[str, int], grad_taps: frozenset[str]) -> Subscription:
        sub = Subscription(self, taps, grad_taps)
        self.subscribers.append(sub)
        for block in taps.values():
            if block not in self._tap_handles:
                module = self.blocks[block - 1]
                self._tap_handles[block] = module.register_forward_hook(_Hook(self, "_keep", module, block))
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)
        needed = {b for s in self.subscribers for b in s.taps.values()}
        for block in [b for b in self._tap_handles if b not in needed]:
            self._tap_handles.pop(block).remove()
        if not self.subscribers:
            self.remove()
        elif self.record is not None:
            self.mark_taken(sub)

    def mark_taken(self, sub: Subscription) -> None:
        """``sub`` is done with the pending forward; once every subscriber is, it is forgotten."""
        record = self.record
        if record is None:
            return
        record.taken.add(id(sub))
        if all(id(s) in record.taken for s in self.subscribers):
            self.record = None

    # -------------------------------------------------------------- switches
    @contextmanager
    def pausing(self) -> Iterator[None]:
        """Ignore every forward run inside (input probes, a teacher pass on the student's modules)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextmanager
    def forcing(self) -> Iterator[None]:
        """Capture the forward run inside whatever the model's mode (the student's re-run)."""
        self._forced = True
        try:
            yield
        finally:
            self._forced = False

    def _capturing(self) -> bool:
        return not self._paused and (self._forced or (self.model.training and torch.is_grad_enabled()))

    def _needs_grad(self, block: int) -> bool:
        return any(block == s.taps[name] for s in self.subscribers for name in s.grad_taps)

    # -------------------------------------------------------------- hooks
    def _start(self, args: tuple, kwargs: dict) -> None:
        # Set, never read here: torch.compile guards on values a hook reads, so a counter would
        # make it recompile the model's forward (seen: a second graph at step 2).
        self.forwards_seen = 1
        if self._capturing():
            call = ModelCall(args, kwargs)
            if torch.compiler.is_compiling():  # fingerprinted at the first tap, inside the forward's graph
                self.record = Captured(call, [], torch.is_grad_enabled())
            else:
                self.record = Captured(call, [Snapshot.of(v) for v in _tensors((args, kwargs))], torch.is_grad_enabled())

    def _end(self, args: tuple, output: Any) -> None:
        """The model's forward returned: a module called on its own later is not part of it. The adapter state
        is read here, as the forward leaves it (a forward that scales LoRA layers and unscales them at its end,
        diffusers with ``joint_attention_kwargs={"scale": s}``, can leave a scaling one rounding step off)."""
        record = self.record
        if record is not None and record.open:
            record.open = False
            if not torch.compiler.is_compiling():
                record.adapters = adapter_state(self.model)

    def _keep(self, block: int, args: tuple, output: Any) -> None:
        if self._paused:
            return
        record = self.record
        if record is not None and record.grad and block not in record.taps and not torch.is_grad_enabled():
            # The forward began with grad on but the block ran with it off (inside a reentrant
            # checkpoint): its tokens can carry no gradient, so an objective would train only its head.
            if self._needs_grad(block):
                if self._forced:
                    raise RuntimeError(NO_GRAD_BLOCK)
                record.no_grad_blocks.add(block)
                return
        if self._capturing():
            if record is None:
                record = self.record = Captured(ModelCall(), [], torch.is_grad_enabled())
            tokens = self._read_tokens(output, self.model, record.call)
            record.taps[block] = tokens
            if torch.compiler.is_compiling():
                record.tap_snapshots[block] = None
                if not record.inputs:
                    # A compiled model's top-level pre-hook runs as a frame of its own: the checksums go
                    # into the forward's graph here (the inputs are as the forward got them).
                    record.inputs = [Fingerprint.of(v) for v in _tensors((record.call.args, record.call.kwargs))]
            else:
                record.tap_snapshots[block] = Snapshot.of(tokens)

    def _watch(self, name: str, args: tuple, kwargs: dict) -> None:
        if self._capturing() and self.record is not None and self.record.open:
            self.record.watched[name] = self._watched[name](args, kwargs)

    # -------------------------------------------------------------- decisions
    def take(self, sub: Subscription, expected: Callable[[], ModelCall]) -> Decision:
        """The last training forward, as ``sub`` sees it, if it may stand for a call with the inputs
        ``expected()`` returns; ``sub`` is done with it either way, except when this call lacks an
        argument the forward had (``ValueError``, nothing changed)."""
        view = sub.record
        if view is None:
            return Decision(None, "no-forward", "found no training forward since the last call")
        record = view.forward
        if any(record.taps.get(b) is None and b in record.no_grad_blocks for n, b in sub.taps.items() if n in sub.grad_taps):
            self.mark_taken(sub)
            raise RuntimeError(NO_GRAD_BLOCK)
        if any(tokens is None for tokens in view.taps.values()):
            self.mark_taken(sub)
            return Decision(None, "no-tokens", "the last training forward did not run the student block with its hooks")
        with self.pausing():
            call = expected()
        ignored = set(getattr(self.adapter, "output_form_arguments", ()))
        self._calls.check_nothing_missing(record.call, call, ignored)
        self.mark_taken(sub)
        return mismatch(record, call, sub.taps.values(), self._calls, ignored, self.model) or Decision(view)

    def rerun(self, sub: Subscription, x: Tensor, t: Any, args: tuple, kwargs: dict) -> TapRecord:
        """Run the student on these inputs, once, up to the deepest block any subscriber taps; the new
        record stands for this forward for the other objectives of the step too."""
        deepest = max(b for s in self.subscribers for b in s.taps.values())
        with self.forcing():
            run_until(self.model, self.blocks[deepest - 1], self.adapter, x, t, args, kwargs)
        record = self.record
        if record is None:  # no hook of ours fired (a model compiled before the capture existed)
            record = Captured(ModelCall(), [], torch.is_grad_enabled())
        record.open = False  # the stopped pass never returned through the model's forward hook
        view = TapRecord(record, sub.taps)
        if any(tokens is None for tokens in view.taps.values()):
            # The blocks' hooks did not fire (compiled before they were added): read each tap directly.
            for block in sub.taps.values():
                if record.taps.get(block) is None:
                    with self.pausing():
                        record.taps[block] = run_until(self.model, self.blocks[block - 1], self.adapter, x, t, args, kwargs)
        self.mark_taken(sub)
        return view

    def remove(self) -> None:
        for handle in [*self.handles, *self._tap_handles.values()]:
            handle.remove()
        self.handles.clear()
        self._tap_handles.clear()
        self.record = None
