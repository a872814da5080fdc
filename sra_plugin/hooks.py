"""Hook primitives: one-pass hooks (``attach``, ``reading_blocks``), lasting hooks that hold their owner
weakly (``_Hook``), and passes stopped after a block (``run_until``) or before the forward (``probe_call``).

Hook hygiene, in one place:
- ``copy.deepcopy(model)`` and pickling copy registered hooks: lasting ones copy as inert hooks, and every
  hook also checks that the module it fires on is the one it was registered on.
- A lasting hook holds its owner weakly: once the owner is gone, its hooks do nothing.
- With non-reentrant gradient checkpointing, blocks run again during backward; calls made while
  autograd is running a backward pass are ignored.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .module_state import restoring_model_state
from .registry import Adapter, ModelCall, token_reader

__all__ = ["StopForward", "attach", "reading_blocks", "run_until", "probe_call"]


class StopForward(BaseException):
    """Raised by a hook to end a forward pass right after the block it needs.

    A ``BaseException`` so that a model's own ``except Exception`` cannot swallow it.
    """


def _in_backward() -> bool:
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def attach(module: nn.Module, fn: Callable[..., Any], *, pre: bool = False, prepend: bool = False) -> RemovableHandle:
    """Register ``fn`` as a forward hook (``fn(output)``) or pre-forward hook (``pre=True``: ``fn(args, kwargs)``)
    that only fires on ``module`` itself (not on deep copies that inherited it) and never during backward.
    For hooks that live only for one pass; lasting hooks are ``_Hook`` objects."""

    if pre:
        def pre_hook(fired_on: nn.Module, args: tuple, kwargs: dict) -> None:
            if fired_on is module and not _in_backward():
                fn(args, kwargs)

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=prepend)

    def hook(fired_on: nn.Module, args: tuple, output: Any) -> None:
        if fired_on is module and not _in_backward():
            fn(output)

    return module.register_forward_hook(hook, prepend=prepend)


def _inert_hook(*args: Any) -> None:
    """What a copied or unpickled capture hook becomes: it does nothing."""
    return None


def _make_inert() -> Callable[..., None]:
    return _inert_hook


class _Hook:
    """A lasting hook: calls ``owner.<method>(*bound, *rest)`` when fired on ``module``, outside backward.

    Holds the owner (a ``StudentCapture``) and the module weakly, so that it keeps neither alive; copies and
    pickles of a model carry it as an inert function, so ``torch.save(model)`` and ``copy.deepcopy(model)`` work.
    """

    def __init__(self, owner: Any, method: str, module: nn.Module, *bound: Any) -> None:
        self._owner = weakref.ref(owner)
        self._module = weakref.ref(module)
        self._method = method
        self._bound = bound

    def __call__(self, fired_on: nn.Module, *rest: Any) -> None:
        if fired_on is not self._module() or _in_backward():
            return None
        owner = self._owner()
        if owner is not None:
            getattr(owner, self._method)(*self._bound, *rest)
        return None

    def __reduce__(self) -> tuple:
        return (_make_inert, ())

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return _inert_hook


class _PostHook(_Hook):
    """A lasting forward hook on the model itself. Its own ``__call__`` (code object) because torch.compile
    compiles a compiled model's top-level hooks as frames of their own, cached per code object: the
    pre-hook's ``(args, kwargs)`` and this hook's ``(args, output)`` in one frame would recompile it."""

    def __call__(self, fired_on: nn.Module, *rest: Any) -> None:
        return super().__call__(fired_on, *rest)


def _end_stopped_fsdp_forward(model: nn.Module) -> None:
    """FSDP2 reshards the root's parameters and ends its iteration in post-forward hooks that an
    early stop skips; without this a teacher's root keeps plain unsharded parameters."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return
    if isinstance(model, FSDPModule) and hasattr(model, "reset_iter_state") and not torch.is_grad_enabled():
        model.reset_iter_state()


@contextmanager
def _eager(*modules: nn.Module) -> Iterator[None]:
    """Run modules compiled in place (``module.compile()``) eagerly: their compiled call runs the graph
    traced at the first call, which ignores hooks added later."""
    compiled = [(m, m._compiled_call_impl) for m in modules if getattr(m, "_compiled_call_impl", None) is not None]
    for m, _ in compiled:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, call in compiled:
            m._compiled_call_impl = call


@contextmanager
def reading_blocks(model: nn.Module, blocks: Sequence[nn.Module], adapter: Adapter,
                   keep: Callable[[int, Tensor], None]) -> Iterator[None]:
    """For the passes run inside: ``keep(i, tokens)`` each time ``blocks[i]`` runs in ``model``'s forward,
    ``tokens`` read from its output by the adapter (which may need the call the model got). One-pass hooks
    (``attach``), removed on exit; ``keep`` may raise ``StopForward`` to end the pass there."""
    last = [ModelCall()]  # the model's latest call
    read_tokens = token_reader(adapter)

    def enter(args: tuple, kwargs: dict) -> None:
        last[0] = ModelCall(args, kwargs)

    def reader(index: int) -> Callable[[Any], None]:
        return lambda output: keep(index, read_tokens(output, model, last[0]))

    handles = [attach(model, enter, pre=True), *(attach(block, reader(i)) for i, block in enumerate(blocks))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_until(model: nn.Module, block: nn.Module, adapter: Adapter, x: Tensor, t: Any,
              args: tuple, kwargs: dict) -> Tensor:
    """Run ``adapter.forward(model, x, t, ...)`` and return the tokens of ``block``; nothing after it runs.
    Plain state the forward would have restored at its end is restored (``restoring_model_state``)."""
    found: list[Tensor] = []

    def stop(index: int, tokens: Tensor) -> None:
        found.append(tokens)
        raise StopForward

    with _eager(model, block), restoring_model_state(model), reading_blocks(model, [block], adapter, stop):
        try:
            adapter.forward(model, x, t, *args, **kwargs)
        except StopForward:
            _end_stopped_fsdp_forward(model)
    if not found:
        raise RuntimeError(
            f"block {type(block).__name__} never ran during the forward of {type(model).__name__}: "
            f"adapter {adapter.name!r} names a block the forward does not use"
        )
    return found[0]


def probe_call(model: nn.Module, adapter: Adapter, x: Tensor, t: Any, args: tuple, kwargs: dict) -> ModelCall:
    """The inputs ``model``'s forward would receive from ``adapter.forward(model, x, t, *args, **kwargs)``,
    found without running it: a first pre-forward hook records them and stops the call."""
    seen: list[ModelCall] = []

    def record(args: tuple, kwargs: dict) -> None:
        seen.append(ModelCall(args, kwargs))
        raise StopForward

    with _eager(model):  # stopped before the model's forward began: nothing to restore
        handle = attach(model, record, pre=True, prepend=True)
        try:
            adapter.forward(model, x, t, *args, **kwargs)
        except StopForward:
            pass
        finally:
            handle.remove()
    if not seen:
        raise RuntimeError(f"adapter {adapter.name!r} did not call {type(model).__name__} in its forward")
    return seen[0]

