"""Forward hooks: keep a block's tokens from the user's own forward, and stop a pass early.

Hook hygiene, in one place:
- ``copy.deepcopy(model)`` copies registered hooks, so every hook checks that the module it fires on
  is the one it was registered on.
- With non-reentrant gradient checkpointing, blocks run again during backward; calls made while
  autograd is running a backward pass are ignored.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .registry import Adapter, ModelCall, token_reader

__all__ = ["StopForward", "attach", "run_until", "StudentCapture"]


class StopForward(BaseException):
    """Raised by a hook to end a forward pass right after the block it needs.

    A ``BaseException`` so that a model's own ``except Exception`` cannot swallow it.
    """


def _in_backward() -> bool:
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def attach(module: nn.Module, fn: Callable[..., Any], *, pre: bool = False) -> RemovableHandle:
    """Register ``fn`` as a forward (``pre=True``: pre-forward, with kwargs) hook that only fires on
    ``module`` itself (not on deep copies that inherited the hook) and never during backward."""

    if pre:
        def pre_hook(fired_on: nn.Module, args: tuple, kwargs: dict) -> None:
            if fired_on is module and not _in_backward():
                fn(args, kwargs)

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(fired_on: nn.Module, args: tuple, output: Any) -> None:
        if fired_on is module and not _in_backward():
            fn(output)

    return module.register_forward_hook(hook)


def _end_stopped_fsdp_forward(model: nn.Module) -> None:
    """FSDP2 reshards the root's parameters and ends its iteration in post-forward hooks that an
    early stop skips; without this a teacher's root keeps plain unsharded parameters."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return
    if isinstance(model, FSDPModule) and hasattr(model, "reset_iter_state") and not torch.is_grad_enabled():
        model.reset_iter_state()


def run_until(model: nn.Module, block: nn.Module, adapter: Adapter, x: Tensor, t: Any,
              args: tuple, kwargs: dict) -> Tensor:
    """Run ``adapter.forward(model, x, t, ...)`` and return the tokens of ``block``; nothing after it runs."""
    found: list[Tensor] = []
    calls: list[ModelCall] = []
    read_tokens = token_reader(adapter)

    def enter(args: tuple, kwargs: dict) -> None:
        calls.append(ModelCall(args, kwargs))

    def stop(output: Any) -> None:
        found.append(read_tokens(output, model, calls[-1] if calls else ModelCall()))
        raise StopForward

    # A module compiled in place (``module.compile()``) runs the graph traced at its first call,
    # which ignores hooks added later (this one): run this pass eagerly.
    compiled = [(m, m._compiled_call_impl) for m in (model, block) if getattr(m, "_compiled_call_impl", None) is not None]
    for m, _ in compiled:
        m._compiled_call_impl = None
    handles = [attach(model, enter, pre=True), attach(block, stop)]
    try:
        adapter.forward(model, x, t, *args, **kwargs)
    except StopForward:
        _end_stopped_fsdp_forward(model)
    finally:
        for handle in handles:
            handle.remove()
        for m, call in compiled:
            m._compiled_call_impl = call
    if not found:
        raise RuntimeError(
            f"block {type(block).__name__} never ran during the forward of {type(model).__name__}: "
            f"adapter {adapter.name!r} names a block the forward does not use"
        )
    return found[0]


NO_GRAD_BLOCK = (
    "the student block ran with gradients disabled inside a training forward that had them enabled, so its "
    "tokens carry no gradient and SRA would train only the head, not the model. Reentrant gradient "
    "checkpointing around the block does this: torch.utils.checkpoint.checkpoint(..., use_reentrant=True), "
    "e.g. LightningDiT's use_checkpoint=True, timm with TIMM_REENTRANT_CKPT=1 or set_reentrant_ckpt(True), "
    "diffusers' enable_gradient_checkpointing(gradient_checkpointing_func=...) with use_reentrant=True. "
    "Use non-reentrant checkpointing (use_reentrant=False, the default of diffusers and timm), or keep "
    "the student block out of the checkpointed region."
)


class StudentCapture:
    """Keeps the tokens of one block from the model's training forward (grad enabled, training mode).

    A record holds the forward's noisy input (to check it later against ``x_t``), the block's tokens
    and whatever the adapter watches. ``take`` hands the record over and forgets it.
    """

    def __init__(self, model: nn.Module, block: nn.Module, adapter: Adapter) -> None:
        self.model = model
        self.adapter = adapter
        self._read_tokens = token_reader(adapter)
        self.record: dict[str, Any] | None = None
        self.forced = False  # set while SRA runs the student pass itself
        self.forwards_seen = 0  # 0 until the model's forward first ran with our hooks (compile-order hint)
        self.handles: list[RemovableHandle] = [attach(model, self._start, pre=True), attach(block, self._keep)]
        for name, (module, read) in adapter.watch(model).items():
            self.handles.append(attach(module, self._watcher(name, read), pre=True))

    def _capturing(self) -> bool:
        return self.forced or (self.model.training and torch.is_grad_enabled())

    def _start(self, args: tuple, kwargs: dict) -> None:
        # Set, never read here: torch.compile guards on values a hook reads, so a counter would
        # make it recompile the model's forward (seen: a second graph at step 2).
        self.forwards_seen = 1
        if self._capturing():
            call = ModelCall(args, kwargs)
            first = args[0] if args and isinstance(args[0], Tensor) else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
            self.record = {"input": kwargs.get("hidden_states", first) if isinstance(kwargs.get("hidden_states"), Tensor) else first, "grad": torch.is_grad_enabled(), "call": call}

    def _keep(self, output: Any) -> None:
        record = self.record
        if record is not None and record.get("grad") and "tokens" not in record and not torch.is_grad_enabled():
            # The forward began with grad on but the block ran with it off (inside a reentrant
            # checkpoint): its tokens can carry no gradient, so SRA would train only the head.
            if self.forced:
                raise RuntimeError(NO_GRAD_BLOCK)
            record["no_grad_block"] = True
            return
        if self._capturing():
            if self.record is None:
                self.record = {"input": None}
            self.record["tokens"] = self._read_tokens(output, self.model, self.record.get("call", ModelCall()))

    def _watcher(self, name: str, read: Callable[[tuple, dict], Any]) -> Callable[[tuple, dict], None]:
        def remember(args: tuple, kwargs: dict) -> None:
            if self._capturing() and self.record is not None:
                self.record.setdefault("watched", {})[name] = read(args, kwargs)
        return remember

    def take(self, x: Tensor) -> dict[str, Any] | None:
        """The record of the last training forward if it ran on ``x``; the record is dropped either way."""
        record, self.record = self.record, None
        if record is None:
            return None
        seen = record["input"]
        same = seen is x or (
            isinstance(seen, Tensor)
            and seen.shape == x.shape
            and seen.device == x.device
            and torch.equal(seen.to(x.dtype), x)
        )
        if not same:
            return None
        if record.get("no_grad_block"):
            raise RuntimeError(NO_GRAD_BLOCK)
        return record if "tokens" in record else None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.record = None
