"""Several processes without ``DDP(objective)``: the objective keeps its head the same on every rank.

With ``torch.distributed`` initialised (world size > 1) and an objective that is called bare, not through
``DDP(...)`` (``accelerator.prepare`` was not given it), ``HeadSync`` does what DDP would for the head:
at the first training call it copies rank 0's head to every rank, and after each backward it replaces
every head gradient by its mean over the ranks (``all_reduce(SUM) / world``, in a hook that runs once
the gradient is accumulated into ``.grad``). Averaging is linear, so under gradient accumulation
reducing at every micro-batch gives the mean of the accumulated gradients, as DDP's one reduction at
the last micro-batch does. The teacher needs nothing: an EMA of weights that agree on every rank agrees too.

It stands aside (the wrapper does the work) when the objective runs inside ``DDP(objective)``, when
the model it is called with sits in DeepSpeed's engine, FSDP1 or ``ModelWithHeads``, and when a head
parameter is sharded (an FSDP2 ``DTensor``, a ZeRO-3 partition). Every rank must call the objective
at every micro-batch (a weight-0 step counts: the head stays in the graph), as with DDP.
``objective.average_head_grads = False`` turns it off.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .wrappers import _inner

__all__ = ["HeadSync", "distributed_world"]

# Wrappers that reduce the head's gradients themselves (DeepSpeed's engine trains ModelWithHeads' heads).
_SELF_REDUCING = {"DeepSpeedEngine", "PipelineEngine", "FullyShardedDataParallel", "ModelWithHeads"}


def distributed_world() -> int:
    """The world size of the default process group, 1 if there is none."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def _wrapper_reduces(model: Any) -> bool:
    """Whether ``model`` sits in a wrapper that trains and reduces the heads itself."""
    seen = 0
    while isinstance(model, nn.Module) and seen < 16:
        if type(model).__name__ in _SELF_REDUCING:
            return True
        model, seen = _inner(model), seen + 1
    return False


def _plain(param: Tensor) -> bool:
    """A parameter whose gradient is the full tensor on this rank (not a DTensor, not a ZeRO-3 slice)."""
    return type(param.data) is Tensor and not hasattr(param, "ds_id")


class HeadSync:
    """The head's rank-0 copy and gradient averaging of one objective (see the module's text)."""

    def __init__(self, objective: nn.Module) -> None:
        self._owner = weakref.ref(objective)
        self.active = False  # decided at each training call
        self.broadcast_done = False
        self.handles = [p.register_post_accumulate_grad_hook(self._average)
                        for p in objective.head.parameters() if p.requires_grad]

    def begin_call(self, objective: nn.Module, model: Any) -> None:
        """At a training call (gradients enabled), before the head runs: decide, and copy rank 0's head once."""
        world = distributed_world()
        active_ddp = getattr(DistributedDataParallel, "_active_ddp_module", None)
        params = [p for p in objective.head.parameters() if p.requires_grad]
        self.active = (
            bool(getattr(objective, "average_head_grads", True)) and world > 1 and bool(self.handles)
            and not (active_ddp is not None and active_ddp.module is objective)
            and not _wrapper_reduces(model) and all(_plain(p) for p in params)
        )
        if self.active and not self.broadcast_done:
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=0)
            self.broadcast_done = True

    def _average(self, param: Tensor) -> None:
        if not self.active or self._owner() is None or param.grad is None:
            return
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(dist.get_world_size())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.active = False
