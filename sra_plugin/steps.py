"""Did an optimizer step happen since the last ``update_teacher()``?

Under gradient accumulation (accelerate's ``accumulate``, or a loop that steps every k micro-batches)
the line after ``optimizer.step()`` runs at every micro-batch while the weights change only at the
last. An EMA update and a step of the schedules at each micro-batch would run k times too fast, so
``update_teacher()`` asks ``OptimizerSteps`` first. Two signals, either one means "stepped":

- a torch optimizer that holds one of the model's trainable parameters stepped (a global post-step
  hook, registered once; accelerate skips the inner optimizer's step on micro-batches without a gradient
  sync). An optimizer over tensors that are no ``nn.Parameter`` counts too (DeepSpeed's engine steps a
  torch optimizer over flat partitions of its own); another model's optimizer (a discriminator's,
  stepping at every micro-batch) does not;
- a trainable parameter of the model was changed in place (its version counter moved: a hand-written
  update under ``torch.no_grad()``, ``load_state_dict``).

An update through ``.data`` outside any torch optimizer moves neither; the warning of an ignored
update says so.
"""

from __future__ import annotations

import weakref

from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["OptimizerSteps"]

_watchers: "weakref.WeakSet[OptimizerSteps]" = weakref.WeakSet()
_held: dict[int, tuple[weakref.ref, int, frozenset[int], bool]] = {}  # id(optimizer) -> (it, count, ids, any nn.Parameter)
_hooked = False


def _parameters_of(optimizer: Optimizer) -> tuple[frozenset[int], bool]:
    """The ids of the tensors ``optimizer`` updates, and whether any is an ``nn.Parameter`` (cached)."""
    count = sum(len(group["params"]) for group in optimizer.param_groups)
    cached = _held.get(id(optimizer))
    if cached is None or cached[0]() is not optimizer or cached[1] != count:
        for key in [k for k, entry in _held.items() if entry[0]() is None]:  # optimizers gone since
            del _held[key]
        tensors = [p for g in optimizer.param_groups for p in g["params"]]
        cached = _held[id(optimizer)] = (weakref.ref(optimizer), count, frozenset(map(id, tensors)),
                                         any(isinstance(p, nn.Parameter) for p in tensors))
    return cached[2], cached[3]


def _count(optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
    """After any torch optimizer's step: a step for every watcher whose model it updates. An optimizer over
    tensors that are no ``nn.Parameter`` (DeepSpeed's, over flat partitions of its own) counts for all; one
    over another model's parameters (a discriminator's) for none."""
    ids, module_parameters = _parameters_of(optimizer)
    for watcher in list(_watchers):
        if not module_parameters or not watcher.trainable.isdisjoint(ids):
            watcher.steps += 1


def _hook_optimizers() -> None:
    global _hooked
    if not _hooked:
        register_optimizer_step_post_hook(_count)
        _hooked = True


def _version(p: Tensor) -> int:
    local = getattr(p, "ds_tensor", None)  # DeepSpeed ZeRO-3: this rank's partition holds the values
    return (local if isinstance(local, Tensor) else p)._version


class OptimizerSteps:
    """Counts the optimizer steps of one model's trainable parameters, and remembers that count and the
    parameters' versions at its last look."""

    def __init__(self) -> None:
        _hook_optimizers()
        self.steps = 0
        self.trainable: frozenset[int] = frozenset()
        self._last: tuple[int, tuple[int, ...]] | None = None
        _watchers.add(self)

    def _now(self, model: nn.Module) -> tuple[int, tuple[int, ...]]:
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.trainable = frozenset(map(id, trainable))
        return self.steps, tuple(_version(p) for p in trainable)

    def start(self, model: nn.Module) -> None:
        """Take the first look (at the first training call), if none was taken yet."""
        if self._last is None:
            self._last = self._now(model)

    def look(self, model: nn.Module) -> tuple[bool, tuple[int, tuple[int, ...]]]:
        """Whether an optimizer step (or an in-place change of a trainable parameter) happened since the
        last look (True if there was none), and the new look, to be kept with ``keep`` once acted on."""
        now = self._now(model)
        return self._last is None or now != self._last, now

    def keep(self, look: tuple[int, tuple[int, ...]]) -> None:
        self._last = look
