"""A reference SiT (Ma et al., willisma/SiT) in the convention of the REPA and SRA code, written here.

Structure and names are DiT's (``x_embedder``, ``t_embedder``, ``y_embedder``, ``blocks``,
``final_layer``, ``forward(x, t, y)``); time is continuous, ``t`` in [0, 1] with **t = 0 data and
t = 1 noise** (``x_t = (1 - t) x0 + t noise``, as in REPA/SRA's ``SILoss``), and the model predicts
the velocity, so ``learn_sigma`` is off by default. Presets ``SiT-S/2`` ... ``SiT-XL/8``.
"""

from __future__ import annotations

from .dit import DiT, SIZES, _preset


class SiT(DiT):
    """Scalable interpolant transformer: DiT's architecture on continuous time ``t`` in [0, 1]."""

    def __init__(self, *args, learn_sigma: bool = False, **kwargs) -> None:
        super().__init__(*args, learn_sigma=learn_sigma, **kwargs)


SiT_models = {f"SiT-{size}/{patch}": _preset(SiT, size, patch) for size in SIZES for patch in (2, 4, 8)}
