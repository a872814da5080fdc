"""Layer specs: which block SRA reads.

Blocks are numbered from 1 as in the paper ("block 8" is ``blocks[7]``). An int ``k >= 1`` is block
``k``; a negative int counts from the end (``-1`` is the last block); a float in (0, 1) is a fraction
of the depth, rounded half up to the nearest block (on 28 blocks 0.3 -> 8 and 0.7 -> 20).
"""

from __future__ import annotations

import math
import numbers

from ._checks import is_real

__all__ = ["resolve_layer"]


def resolve_layer(spec: int | float, depth: int, name: str = "layer") -> int:
    """The 1-based block number that ``spec`` names in a model of ``depth`` blocks."""
    accepted = f"an int in 1..{depth}, a negative int in -{depth}..-1, or a float in (0, 1)"
    if not is_real(spec):
        raise TypeError(f"{name}={spec!r} is not accepted: use {accepted}")
    if isinstance(spec, numbers.Integral):
        k = int(spec)
        if 1 <= k <= depth:
            return k
        if -depth <= k <= -1:
            return depth + k + 1
        raise ValueError(f"{name}={spec!r} is out of range for a model of {depth} blocks: use {accepted}")
    spec = float(spec)
    if not (0.0 < spec < 1.0) or math.isnan(spec):
        raise ValueError(f"{name}={spec!r} is not accepted: use {accepted} (a float is a fraction of depth)")
    return min(depth, max(1, math.floor(spec * depth + 0.5)))
