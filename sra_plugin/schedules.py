"""Weight schedules: plain callables ``step -> weight`` for ``weight=``.

Each schedule maps the training step (``sra.step``) to a loss weight, a Python float. The step rule,
the same for every objective (SRA, SRA 2, LayerSync, Dispersive, REPA): ``step`` counts training steps;
once ``sra.update_teacher()`` has been called it alone advances the step (so under gradient
accumulation the step counts optimizer steps), and until then (a teacher you update yourself, or an
objective without a teacher) every call made with gradients enabled advances it; a call that raises
advances nothing; the weight of a call is the schedule at the step before it. They can be passed anywhere a weight is accepted::

    from sra_plugin import SelfRepresentationAlignment, schedules

    sra = SelfRepresentationAlignment(model, weight=schedules.paper(steps_per_epoch=len(loader)))
    sra = SelfRepresentationAlignment(model, weight=schedules.stop_at(400_000, schedules.paper(1251)))
    sra = SelfRepresentationAlignment(model, weight=schedules.linear(0.0, 0.5, 0, 10_000) * schedules.paper(1251))

A weight of exactly ``0.0`` at a step makes ``sra(...)`` skip the teacher pass for that step.

Schedules compose: ``stop_at`` wraps any schedule or fixed weight, and ``a * b`` multiplies two
schedules (or a schedule and a number) step by step. Each has a ``repr`` that reads as the code that
built it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Union

from torch import Tensor

from ._checks import is_real

__all__ = ["Schedule", "paper", "linear", "cosine", "stop_at", "PAPER_CONSTANTS"]

WeightLike = Union[float, Tensor, Callable[[int], Union[float, Tensor]]]

PAPER_CONSTANTS: dict[int, tuple[int, int]] = {256: (149, 1000), 512: (99, 800)}
"""Per resolution: (last epoch at the full weight 0.2, epochs per tenfold decay) of the official train.py."""


def _check_number(name: str, value: Any) -> float:
    if not is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} is not accepted: use a finite number >= 0")
    return float(value)


def _check_step(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} is not accepted: use an integer step >= {minimum}")
    if value < minimum:
        raise ValueError(f"{name}={value!r} is not accepted: use an integer step >= {minimum}")
    return int(value)


def _check_weight_like(name: str, value: Any) -> WeightLike:
    """A fixed weight (number >= 0 or 0-dim floating tensor) or a callable ``step -> weight``."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(f"{name}={value!r} is not accepted: use a number >= 0, a 0-dim floating tensor or a callable step -> weight")
        return value
    if callable(value):
        return value
    if not is_real(value):
        raise TypeError(f"{name}={value!r} is not accepted: use a number >= 0, a 0-dim floating tensor or a callable step -> weight")
    return _check_number(name, value)


def _value(weight: WeightLike, step: int) -> float | Tensor:
    return weight(step) if callable(weight) else weight


class Schedule:
    """Base of the built-in schedules: ``schedule(step) -> weight``; ``a * b`` multiplies step by step."""

    def __call__(self, step: int) -> float | Tensor:
        return self.at(_check_step("step", step))

    def at(self, step: int) -> float | Tensor:
        raise NotImplementedError

    def __mul__(self, other: Any) -> "Schedule":
        return _Product(self, _check_weight_like("other", other))

    def __rmul__(self, other: Any) -> "Schedule":
        return _Product(_check_weight_like("other", other), self)


class _Product(Schedule):
    def __init__(self, left: WeightLike, right: WeightLike) -> None:
        self.left, self.right = left, right

    def at(self, step: int) -> float | Tensor:
        return _value(self.left, step) * _value(self.right, step)

    def __repr__(self) -> str:
        return f"{self.left!r} * {self.right!r}"


class paper(Schedule):
    """The SRA paper's weight schedule, as the official ``train.py`` computes it.

    SRA (arXiv 2505.02831, abstract): "SRA aligns the latent representation of the diffusion
    transformer in the earlier layer conditioned on higher noise to that in the later layer
    conditioned on lower noise"; the paper trains SiT with alignment weight 0.2, and the authors'
    released ``train.py`` holds that weight, then decays it per epoch. With
    ``epoch = step // steps_per_epoch``:

    - 256 px: ``0.2`` up to epoch 149 (inclusive), then ``2 * 0.1 ** ((epoch - 149) / 1000 + 1)``;
    - 512 px: ``0.2`` up to epoch 99 (inclusive), then ``2 * 0.1 ** ((epoch - 99) / 800 + 1)``.

    The decay starts where it is continuous (``2 * 0.1 ** 1 = 0.2``) and divides the weight by ten
    every 1000 (800) epochs. ``steps_per_epoch``: optimizer steps per epoch of your loader
    (ImageNet 1,281,167 images at batch 256: 5005).
    """

    def __init__(self, steps_per_epoch: int, resolution: int = 256) -> None:
        self.steps_per_epoch = _check_step("steps_per_epoch", steps_per_epoch, minimum=1)
        if isinstance(resolution, bool) or not isinstance(resolution, numbers.Integral) or int(resolution) not in PAPER_CONSTANTS:
            raise ValueError(
                f"resolution={resolution!r} is not accepted: use one of {', '.join(map(str, PAPER_CONSTANTS))} "
                "(the resolutions the official train.py has constants for)"
            )
        self.resolution = int(resolution)
        self.hold_epochs, self.decay_epochs = PAPER_CONSTANTS[self.resolution]

    def at(self, step: int) -> float:
        epoch = step // self.steps_per_epoch
        if epoch <= self.hold_epochs:
            return 0.2
        return 2 * 0.1 ** ((epoch - self.hold_epochs) / self.decay_epochs + 1)

    def __repr__(self) -> str:
        return f"paper(steps_per_epoch={self.steps_per_epoch}, resolution={self.resolution})"


class _Ramp(Schedule):
    """From ``start`` at ``begin_step`` to ``end`` at ``end_step``; constant outside."""

    def __init__(self, start: float, end: float, begin_step: int, end_step: int) -> None:
        self.start = _check_number("start", start)
        self.end = _check_number("end", end)
        self.begin_step = _check_step("begin_step", begin_step)
        self.end_step = _check_step("end_step", end_step)
        if self.end_step <= self.begin_step:
            raise ValueError(f"end_step={end_step!r} is not accepted: use a step > begin_step={begin_step!r}")

    def shape(self, fraction: float) -> float:
        raise NotImplementedError

    def at(self, step: int) -> float:
        if step <= self.begin_step:
            return self.start
        if step >= self.end_step:
            return self.end
        fraction = (step - self.begin_step) / (self.end_step - self.begin_step)
        return self.start + (self.end - self.start) * self.shape(fraction)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(start={self.start!r}, end={self.end!r}, begin_step={self.begin_step}, end_step={self.end_step})"


class linear(_Ramp):
    """Linear from ``start`` (up to ``begin_step``) to ``end`` (from ``end_step`` on), e.g. a warm-up
    ``linear(0.0, 0.2, 0, 5000)`` or a decay ``linear(0.5, 0.0, 100_000, 200_000)``."""

    def shape(self, fraction: float) -> float:
        return fraction


class cosine(_Ramp):
    """Half-cosine from ``start`` (up to ``begin_step``) to ``end`` (from ``end_step`` on): flat at both
    ends, halfway at the middle step."""

    def shape(self, fraction: float) -> float:
        return (1 - math.cos(math.pi * fraction)) / 2


class stop_at(Schedule):
    """``weight`` (a number, 0-dim tensor or schedule) before ``step``, ``0.0`` from ``step`` on; with
    weight 0 the teacher pass is skipped, so late training costs nothing extra.

    SRA (arXiv 2505.02831) applies the alignment through all of training; stopping it is for
    fine-tuning runs that use SRA only to speed up the start (``stop_at(50_000, 0.2)``)."""

    def __init__(self, step: int, weight: WeightLike = 0.2) -> None:
        self.step = _check_step("step", step)
        self.weight = _check_weight_like("weight", weight)

    def at(self, step: int) -> float | Tensor:
        if step >= self.step:
            return 0.0
        return _value(self.weight, step)

    def __repr__(self) -> str:
        return f"stop_at({self.step}, {self.weight!r})"
