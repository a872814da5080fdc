"""Did an optimizer step happen since the last ``update_teacher()``?

Under gradient accumulation (accelerate's ``accumulate``, or a loop that steps every k micro-batches)
the line after ``optimizer.step()`` runs at every micro-batch while the weights change only at the
last. An EMA update and a step of the schedules at each micro-batch would run k times too fast, so
``update_teacher()`` asks ``OptimizerSteps`` first. Two signals, either one means "stepped":

- a torch optimizer's ``step()`` ran (a global post-step hook, registered once: accelerate skips the
  inner optimizer's step on micro-batches without a gradient sync; DeepSpeed's engine steps a torch
  optimizer over its flat partitions);
- a trainable parameter of the model was changed in place (its version counter moved: a hand-written
  update under ``torch.no_grad()``, ``load_state_dict``).

An update through ``.data`` outside any torch optimizer moves neither; the warning of an ignored
update says so.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["OptimizerSteps", "optimizer_steps"]

_steps = 0
_hooked = False


def _count(optimizer: object, args: tuple, kwargs: dict) -> None:
    global _steps
    _steps += 1


def optimizer_steps() -> int:
    """How many torch optimizer steps ran in this process since the first call (the hook's registration)."""
    global _hooked
    if not _hooked:
        register_optimizer_step_post_hook(_count)
        _hooked = True
    return _steps


def _version(p: Tensor) -> int:
    local = getattr(p, "ds_tensor", None)  # DeepSpeed ZeRO-3: this rank's partition holds the values
    return (local if isinstance(local, Tensor) else p)._version


class OptimizerSteps:
    """Remembers the optimizer-step count and the trainable parameters' versions at its last look."""

    def __init__(self) -> None:
        self._last: tuple[int, tuple[int, ...]] | None = None

    @staticmethod
    def _now(model: nn.Module) -> tuple[int, tuple[int, ...]]:
        return optimizer_steps(), tuple(_version(p) for p in model.parameters() if p.requires_grad)

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
