"""Did an optimizer step happen since the last ``update_teacher()``?

Under gradient accumulation (accelerate's ``accumulate``, or a loop that steps every k micro-batches)
the line after ``optimizer.step()`` runs at every micro-batch while the weights change only at the
last. An EMA update and a step of the schedules at each micro-batch would run k times too fast, so
``update_teacher()`` asks ``OptimizerSteps`` first. Two signals, either one means "stepped":

- a torch optimizer that holds one of the model's trainable parameters stepped (a global post-step
  hook, registered once; accelerate skips the inner optimizer's step on micro-batches without a gradient
  sync). If no optimizer holds one, an optimizer over tensors that are no ``nn.Parameter`` counts
  (DeepSpeed's engine steps a torch optimizer over flat partitions of its own); another model's
  optimizer (a discriminator's) never does;
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

__all__ = ["OptimizerSteps", "optimizer_steps"]

_steps: dict[int, int] = {}  # id(optimizer) -> its steps since the hook was registered
_optimizers: "weakref.WeakValueDictionary[int, Optimizer]" = weakref.WeakValueDictionary()
_param_ids: dict[int, tuple[int, frozenset[int], bool]] = {}  # id(optimizer) -> (count, their ids, any nn.Parameter)
_hooked = False


def _count(optimizer: Optimizer, args: tuple, kwargs: dict) -> None:
    key = id(optimizer)
    if _optimizers.get(key) is not optimizer:  # a new optimizer (or an old id reused)
        _optimizers[key] = optimizer
        _steps[key] = 0
        _param_ids.pop(key, None)
    _steps[key] += 1


def _parameters_of(key: int, optimizer: Optimizer) -> tuple[frozenset[int], bool]:
    """The ids of the tensors ``optimizer`` updates, and whether any is an ``nn.Parameter``."""
    count = sum(len(group["params"]) for group in optimizer.param_groups)
    cached = _param_ids.get(key)
    if cached is None or cached[0] != count:
        tensors = [p for g in optimizer.param_groups for p in g["params"]]
        cached = _param_ids[key] = (count, frozenset(map(id, tensors)), any(isinstance(p, nn.Parameter) for p in tensors))
    return cached[1], cached[2]


def optimizer_steps(trainable: set[int] | None = None) -> int:
    """Torch optimizer steps in this process since the first call (the hook's registration), of the
    optimizers that hold one of the ``trainable`` parameter ids if any does. If none does (yet: an optimizer
    is known from its first step on), of the optimizers that hold no ``nn.Parameter``: DeepSpeed steps a
    torch optimizer over flat partitions of its own, while a discriminator's optimizer, stepping at every
    micro-batch, holds another model's parameters and is not this model's."""
    global _hooked
    if not _hooked:
        register_optimizer_step_post_hook(_count)
        _hooked = True
    held = [(key, *_parameters_of(key, optimizer)) for key, optimizer in list(_optimizers.items())]
    mine = [key for key, ids, _ in held if trainable and not trainable.isdisjoint(ids)]
    counted = mine or [key for key, _, module_parameters in held if not module_parameters]
    return sum(_steps.get(key, 0) for key in counted)


def _version(p: Tensor) -> int:
    local = getattr(p, "ds_tensor", None)  # DeepSpeed ZeRO-3: this rank's partition holds the values
    return (local if isinstance(local, Tensor) else p)._version


class OptimizerSteps:
    """Remembers the optimizer-step count and the trainable parameters' versions at its last look."""

    def __init__(self) -> None:
        self._last: tuple[int, tuple[int, ...]] | None = None

    @staticmethod
    def _now(model: nn.Module) -> tuple[int, tuple[int, ...]]:
        trainable = [p for p in model.parameters() if p.requires_grad]
        return optimizer_steps({id(p) for p in trainable}), tuple(_version(p) for p in trainable)

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
