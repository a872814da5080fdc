"""Forward hooks: keep the tokens of the tapped blocks from the user's own forward, decide whether they
may be reused, and stop a pass early.

One ``StudentCapture`` per model (and adapter) is shared by every objective on it (``subscribe``): each
objective holds a ``Subscription`` naming its taps (1-based blocks), so SRA, LayerSync, Dispersive, ...
on one model share one set of hooks and one record of the forward, and the student's blocks run once
per step. A call whose inputs do not match the captured forward re-runs the model once, up to the
deepest tap any subscriber needs; the other objectives of that step reuse that re-run.

Hook hygiene, in one place:
- ``copy.deepcopy(model)`` and pickling copy registered hooks: ours copy as inert hooks, and every
  hook also checks that the module it fires on is the one it was registered on.
- A hook holds its capture weakly: once the capture's owner is gone, its hooks do nothing (and the
  owner's finalizer removes them).
- With non-reentrant gradient checkpointing, blocks run again during backward; calls made while
  autograd is running a backward pass are ignored.
"""

from __future__ import annotations

import inspect
import operator
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import zero
from .registry import Adapter, ModelCall, token_reader

__all__ = ["StopForward", "attach", "run_until", "probe_call", "subscribe", "StudentCapture", "Subscription", "Captured", "TapRecord", "Decision"]


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
    """A lasting capture hook: calls ``capture.<method>(*rest)`` when fired on ``module``, outside backward.

    Holds the capture and the module weakly, so that it keeps neither alive; copies and pickles of a
    model carry it as an inert function, so ``torch.save(model)`` and ``copy.deepcopy(model)`` work.
    """

    def __init__(self, capture: "StudentCapture", method: str, module: nn.Module, *bound: Any) -> None:
        self._capture = weakref.ref(capture)
        self._module = weakref.ref(module)
        self._method = method
        self._bound = bound

    def __call__(self, fired_on: nn.Module, *rest: Any) -> None:
        if fired_on is not self._module() or _in_backward():
            return None
        capture = self._capture()
        if capture is not None:
            getattr(capture, self._method)(*self._bound, *rest)
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


_PLAIN = (bool, int, float, complex, str, bytes, type(None))


def _is_plain(value: Any) -> bool:
    kind = type(value)
    return kind in _PLAIN or (kind is tuple and all(type(v) in _PLAIN for v in value))


_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # training, _parameters, _buffers, _modules, the hook dicts


class _Layout:
    """Which keys of one module's instance dict hold plain values, and which hold dicts of plain values
    (peft's LoRA ``scaling``), with a C-level reader of the plain ones. Built once per module and kept while
    the dict keeps its size: reading 600 modules' attributes one by one at every stopped pass cost ~4 ms."""

    __slots__ = ("size", "plain", "dicts", "read")

    def __init__(self, attributes: dict) -> None:
        self.size = len(attributes)
        keep = [k for k in attributes if k not in _MODULE_INTERNALS and not k.startswith("ds_")]
        self.plain = tuple(k for k in keep if _is_plain(attributes[k]))
        self.dicts = tuple(k for k in keep if type(attributes[k]) is dict
                           and all(type(v) in _PLAIN for v in attributes[k].values()))
        self.read = operator.itemgetter(*self.plain) if self.plain else None


_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, _Layout]" = weakref.WeakKeyDictionary()
_MODULE_LISTS: "weakref.WeakKeyDictionary[nn.Module, tuple[int, list[weakref.ref]]]" = weakref.WeakKeyDictionary()
_registrations = 0  # submodules registered anywhere since import: a cached module list older than that is stale


def _count_registration(module: nn.Module, name: str, submodule: Any) -> None:
    global _registrations
    _registrations += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


def _modules_of(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())``, cached until any submodule is registered anywhere (peft injecting LoRA,
    a block replaced): walking the tree costs more than reading the attributes."""
    cached = _MODULE_LISTS.get(model)
    if cached is not None and cached[0] == _registrations:
        modules = [ref() for ref in cached[1]]
        if all(m is not None for m in modules):
            return modules
    modules = list(model.modules())
    # Weak references: the list holds the model itself, and a strong one would keep it alive for good.
    _MODULE_LISTS[model] = (_registrations, [weakref.ref(m) for m in modules])
    return modules


def _plain_state(model: nn.Module) -> list[tuple[dict, _Layout, Any, list[dict]]]:
    """For every module: its plain attributes (numbers, strings, None, tuples of them) and copies of its
    dicts of plain values, read from the instance dict. Left out: ``training`` (set and restored by the
    library's own mode switches) and DeepSpeed's ``ds_*`` bookkeeping (ZeRO-3 counts the gradients a module
    still expects; a pass must keep what it added)."""
    saved = []
    for module in _modules_of(model):
        attributes = vars(module)
        layout = _LAYOUTS.get(module)
        if layout is None or layout.size != len(attributes):
            layout = _LAYOUTS[module] = _Layout(attributes)
        try:
            values = layout.read(attributes) if layout.read is not None else None
        except KeyError:  # a key went and another came: read the dict afresh
            layout = _LAYOUTS[module] = _Layout(attributes)
            values = layout.read(attributes) if layout.read is not None else None
        if layout.dicts:
            saved.append((attributes, layout, values, [_plain_copy(attributes.get(k)) for k in layout.dicts]))
        elif values is not None:
            saved.append((attributes, layout, values, ()))
    return saved


def _plain_copy(value: Any) -> dict | None:
    """A copy of a dict whose values are all plain, else None (not restored)."""
    if type(value) is dict and all(type(v) in _PLAIN for v in value.values()):
        return dict(value)
    return None


def _restore_plain_state(saved: list[tuple[dict, _Layout, Any, list[dict]]]) -> None:
    """Put back each plain attribute that now holds another plain value (one that became a tensor or an
    object, e.g. a cache the pass filled, stays), and each dict of plain values, in place."""
    for attributes, layout, values, dicts in saved:
        if values is not None:
            try:
                now = layout.read(attributes)
                same = now is values or bool(now == values)
            except Exception:  # a key went, or a value compares oddly (a tensor): attribute by attribute
                same = False
            if not same:
                old = values if len(layout.plain) > 1 else (values,)
                for name, value in zip(layout.plain, old):
                    current = attributes.get(name, value)
                    if current is not value and _is_plain(current):
                        attributes[name] = value
        for name, value in zip(layout.dicts, dicts):
            current = attributes.get(name)
            if value is not None and _plain_copy(current) is not None and current != value:
                current.clear()
                current.update(value)


@contextmanager
def restoring_model_state(model: nn.Module) -> Iterator[None]:
    """Leave every module of ``model`` as a completed forward would, after a pass stopped early.

    A forward may set state at its start and undo it at its end; a pass stopped after a block skips the
    undo unless the forward wraps it in ``try``/``finally``. Examples: diffusers 0.30 (not 0.42) multiplies
    every LoRA layer's ``scaling`` by ``attention_kwargs["scale"]`` and divides it back after the last
    block; a custom forward that sets ``self.gain`` and resets it at its end. The rule, for any model: the
    plain attributes of every module (numbers, strings, ``None``, tuples of them, and dicts of such values,
    restored in place) get back their values from before the pass. An attribute that now holds a tensor or
    another object is left as the pass left it (a cache the forward fills stays filled). DeepSpeed ZeRO-3
    pushes each module on a global stack before its forward and pops it after; the stack's depth is
    restored too (``zero.kept_forward_stack``)."""
    saved = _plain_state(model)
    try:
        with zero.kept_forward_stack():
            yield
    finally:
        _restore_plain_state(saved)


def run_until(model: nn.Module, block: nn.Module, adapter: Adapter, x: Tensor, t: Any,
              args: tuple, kwargs: dict) -> Tensor:
    """Run ``adapter.forward(model, x, t, ...)`` and return the tokens of ``block``; nothing after it runs.
    Plain state the forward would have restored at its end is restored (``restoring_model_state``)."""
    found: list[Tensor] = []
    calls: list[ModelCall] = []
    read_tokens = token_reader(adapter)

    def enter(args: tuple, kwargs: dict) -> None:
        calls.append(ModelCall(args, kwargs))

    def stop(output: Any) -> None:
        found.append(read_tokens(output, model, calls[-1] if calls else ModelCall()))
        raise StopForward

    with _eager(model, block), restoring_model_state(model):
        handles = [attach(model, enter, pre=True), attach(block, stop)]
        try:
            adapter.forward(model, x, t, *args, **kwargs)
        except StopForward:
            _end_stopped_fsdp_forward(model)
        finally:
            for handle in handles:
                handle.remove()
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


NO_GRAD_BLOCK = (
    "the student block ran with gradients disabled inside a training forward that had them enabled, so its "
    "tokens carry no gradient and SRA would train only the head, not the model. Reentrant gradient "
    "checkpointing around the block does this: torch.utils.checkpoint.checkpoint(..., use_reentrant=True), "
    "e.g. LightningDiT's use_checkpoint=True, timm with TIMM_REENTRANT_CKPT=1 or set_reentrant_ckpt(True), "
    "diffusers' enable_gradient_checkpointing(gradient_checkpointing_func=...) with use_reentrant=True. "
    "Use non-reentrant checkpointing (use_reentrant=False, the default of diffusers and timm), or keep "
    "the student block out of the checkpointed region."
)


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def _same(a: Any, b: Any) -> bool:
    """The same object, or equal values (tensors: same shape, dtype, device and elements)."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor) and isinstance(b, Tensor)
            and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # objects without a usable == are the same only if identical
        return False


@dataclass(frozen=True)
class Snapshot:
    """What can tell that a tensor changed after the forward without reading its values: its version
    counter (bumped by every in-place op) and where its data lives (``x.data = other`` rebinds it and
    bumps nothing). In-place edits through ``x.data`` (``x.data.add_(1)``) change neither: they are the
    one unsupported pattern, since catching them would need a copy or a checksum of every input per
    step. Inference tensors (made under ``torch.inference_mode()``, e.g. cached text embeddings) have no
    version counter, and only code under inference mode can change them in place: for them only the
    data pointer is compared."""

    tensor: Tensor
    version: int  # -1: an inference tensor
    data_ptr: int | None  # None: a tensor without plain storage (a tensor subclass)

    @staticmethod
    def of(tensor: Tensor) -> "Snapshot":
        return Snapshot(tensor, -1 if tensor.is_inference() else tensor._version, _data_ptr(tensor))

    def changed(self) -> bool:
        t = self.tensor
        moved = self.data_ptr is not None and _data_ptr(t) != self.data_ptr
        return moved or (self.version >= 0 and t._version != self.version)


def _data_ptr(tensor: Tensor) -> int | None:
    try:
        return tensor.data_ptr()
    except RuntimeError:
        return None


def _checksum(tensor: Tensor) -> Tensor:
    """Four float64 sums of ``tensor``'s values: plain, squared, position-weighted and absolute."""
    wide = torch.float32 if tensor.device.type == "mps" else torch.float64  # MPS has no float64
    v = tensor.detach().flatten().to(wide)
    ramp = torch.arange(v.numel(), dtype=wide, device=v.device) / max(v.numel(), 1)
    return torch.stack([v.sum(), (v * v).sum(), (v * ramp).sum(), v.abs().sum()])


@dataclass(frozen=True)
class Fingerprint:
    """What tells that a tensor changed after a compiled forward: inside a graph torch.compile traces,
    version counters and data pointers cannot be read, so the forward computes a checksum of the values
    (``_checksum``, part of the graph) and the check recomputes it. Differences below 1e-9 of the
    magnitude are taken as a compiled kernel's summation order, not an edit."""

    tensor: Tensor
    value: Tensor

    @staticmethod
    def of(tensor: Tensor) -> "Fingerprint":
        return Fingerprint(tensor, _checksum(tensor))

    def changed(self) -> bool:
        then, now = self.value, _checksum(self.tensor)
        scale = torch.stack([then[3], then[1], then[3], then[3]])
        return bool(((now - then).abs() > 1e-9 * scale).any() | (now.isnan() != then.isnan()).any())


def adapter_state(model: nn.Module) -> tuple:
    """The state of every peft tuner layer of ``model`` (adapters disabled, active, merged; LoRA scale),
    read by duck typing from the instance dicts (``sra_plugin`` does not import peft): a forward with
    another adapter state (``disable_adapter()``, ``set_adapter``, ``set_scale``) is another forward."""
    found = []
    for module in _modules_of(model):
        attributes = vars(module)
        scaling = attributes.get("scaling")
        if type(scaling) is dict:
            active = attributes.get("_active_adapter")
            found.append((
                attributes.get("_disable_adapters", False),
                tuple(active) if isinstance(active, list) else active,
                tuple(attributes.get("merged_adapters", ())),
                tuple(scaling.items()),
            ))
    return tuple(found)


@dataclass
class Captured:
    """What one training forward of the student left: its inputs, the tokens of every tapped block (by
    1-based block number), what the adapter watches. Shared by every objective on the model."""

    call: ModelCall
    inputs: list[Snapshot | Fingerprint]  # every input tensor, as it was at the forward
    grad: bool = True  # grad mode when the forward began
    adapters: tuple | None = None  # ``adapter_state`` as the forward returned (None: not read; compiled, or stopped)
    open: bool = True  # the forward is running: what watched modules see belongs to it
    taps: dict[int, Tensor] = field(default_factory=dict)
    tap_snapshots: dict[int, Snapshot | None] = field(default_factory=dict)  # None: not read (inside a compiled graph)
    watched: dict[str, Any] = field(default_factory=dict)
    no_grad_blocks: set[int] = field(default_factory=set)
    taken: set[int] = field(default_factory=set)  # ids of the subscriptions that took it


@dataclass
class TapRecord:
    """A ``Captured`` forward as one objective sees it: its own taps, by name."""

    forward: Captured
    names: dict[str, int]

    @property
    def call(self) -> ModelCall:
        return self.forward.call

    @property
    def watched(self) -> dict[str, Any]:
        return self.forward.watched

    @property
    def taps(self) -> dict[str, Tensor | None]:
        return {name: self.forward.taps.get(block) for name, block in self.names.items()}

    @property
    def tokens(self) -> Tensor | None:
        """The first tap's tokens (the student block's, for a one-tap objective)."""
        return next(iter(self.taps.values()))


@dataclass
class Decision:
    """``StudentCapture.take``'s answer: the captured forward to reuse, or why the student must run again."""

    captured: TapRecord | None
    cause: str = ""  # a short key, one warning per key
    reason: str = ""  # the sentence for the warning


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
        try:
            self._signature: inspect.Signature | None = inspect.signature(model.forward)
        except (TypeError, ValueError):
            self._signature = None
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
    def _arguments(self, call: ModelCall) -> dict[str, Any]:
        if self._signature is not None:
            try:
                bound = self._signature.bind_partial(*call.args, **call.kwargs)
                bound.apply_defaults()
                return dict(bound.arguments)
            except TypeError:
                pass
        return {**{f"argument {i}": v for i, v in enumerate(call.args)}, **call.kwargs}

    def _given(self, call: ModelCall) -> dict[str, Any]:
        """The arguments ``call`` passed explicitly (no defaults), by name; a ``**kwargs`` catch-all is
        spread into its names."""
        if self._signature is not None:
            try:
                bound = self._signature.bind_partial(*call.args, **call.kwargs).arguments
            except TypeError:
                bound = None
            if bound is not None:
                given: dict[str, Any] = {}
                for name, value in bound.items():
                    if self._signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                        given.update(value)
                    else:
                        given[name] = value
                return given
        return {**{f"argument {i}": v for i, v in enumerate(call.args)}, **call.kwargs}

    def _is_default(self, name: str, value: Any) -> bool:
        """``None``, or the value the forward's signature gives ``name`` when it is left out."""
        if value is None:
            return True
        parameter = self._signature.parameters.get(name) if self._signature is not None else None
        return parameter is not None and parameter.default is not inspect.Parameter.empty and _same(value, parameter.default)

    def _check_nothing_missing(self, seen: ModelCall, mine: ModelCall, ignored: set[str]) -> None:
        """Raise ``ValueError`` if the training forward got an argument (not ``None`` or its default) that
        this call lacks, while every argument this call gives equals the forward's: the same step with conditioning
        left out of the objective's call (Flux's ``guidance=``, labels, ``joint_attention_kwargs``). Re-running
        would crash inside the model or, worse, run the teacher without that conditioning."""
        had, given = self._given(seen), self._given(mine)
        missing = [n for n, v in had.items() if n not in given and n not in ignored and not self._is_default(n, v)]
        if not missing or any(n not in had or not _same(had[n], v) for n, v in given.items() if n not in ignored):
            return
        names = ", ".join(repr(n) for n in missing)
        raise ValueError(
            f"this call lacks {names}, which the model's training forward on this x_t got "
            f"({', '.join(f'{n}={_describe(had[n])}' for n in missing)}): pass "
            f"{', '.join(f'{n}=...' for n in missing)} to this call as well (as keyword or in the same position "
            "as in the forward), so that the teacher and any re-run see the same conditioning"
        )

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
        self._check_nothing_missing(record.call, call, ignored)
        self.mark_taken(sub)
        if torch.is_grad_enabled() and not record.grad:
            return Decision(
                None, "no-grad",
                "the captured forward ran with gradients disabled (a call under torch.no_grad(), or its re-run), and "
                "this call needs gradients; its tokens would train nothing",
            )
        if record.adapters is not None and record.adapters != adapter_state(self.model):
            return Decision(
                None, "adapter-state",
                "the last training forward ran with another adapter state than the model has now (peft's "
                "disable_adapter(), set_adapter or a LoRA scale, e.g. a reference forward of the base model in "
                "between); its tokens are not the trained model's",
            )
        mine = self._arguments(call)
        seen = self._arguments(record.call)
        for name in dict.fromkeys([*seen, *mine]):
            if name in ignored:
                continue
            if name not in seen or name not in mine or not _same(seen[name], mine[name]):
                return Decision(
                    None, f"argument:{name}",
                    f"the last training forward ran with a different {name!r} than this call (another time, "
                    "input or conditioning, e.g. an extra forward in between); its features are not used",
                )
        changed = [v for v in record.inputs if v.changed()]
        stale = [b for b in sub.taps.values() if (snapshot := record.tap_snapshots.get(b)) is not None and snapshot.changed()]
        if changed or stale:
            what = "an input of the forward" if changed else "the block's output"
            return Decision(None, "in-place", f"{what} was changed in place after the forward, so the captured features are stale")
        return Decision(view)

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
