"""What a pass stopped after a block must put back, and the adapter state a forward ran with.

A forward may set plain state at its start and undo it at its end; a pass stopped early skips the undo
(``restoring_model_state`` puts it back). ``adapter_state`` reads peft's tuner layers (disabled, active,
merged, LoRA scale) so that a forward with another adapter state counts as another forward. Both read
instance dicts directly, with the module list cached until a submodule is registered anywhere.
"""

from __future__ import annotations

import operator
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from . import zero

__all__ = ["restoring_model_state", "adapter_state"]


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
