"""The record of one training forward, shared by every objective on the model: its call, its inputs and the
tokens of every tapped block (``Captured``), seen per objective through its named taps (``TapRecord``); and
what tells, later, that an input or a tapped output was changed in place since (``Snapshot``, or for a
compiled forward ``Fingerprint``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor

from .registry import ModelCall

__all__ = ["Snapshot", "Fingerprint", "Captured", "TapRecord"]


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


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
