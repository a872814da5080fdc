"""The one numeric check used wherever an argument takes a number."""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["is_real", "plain_number"]


def is_real(value: Any) -> bool:
    """A real number: ``int``, ``float``, a numpy scalar such as ``np.float32(0.2)``, ...; never a bool
    (``True`` is an ``int`` to Python, but ``weight=True`` is a mistake, not a 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def plain_number(value: numbers.Real) -> int | float:
    """``value`` as a Python ``int`` (integral types) or ``float`` (the others)."""
    return int(value) if isinstance(value, numbers.Integral) else float(value)
