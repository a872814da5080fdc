"""Dispersive loss (Wang & He, "Diffuse and Disperse", arXiv 2506.09027): a block's features pushed
apart across the batch, InfoNCE without positive pairs. No target, no head, no extra pass.

The InfoNCE-L2 variant as the authors' PyTorch release computes it (``disp_loss`` in its
``transport.py``): each sample's features are flattened to one vector of ``F`` values (here all image
tokens of the block, ``N * D``), the squared L2 distance of every pair is divided by ``F``, and the loss
is ``log mean_ij exp(-d_ij / tau)`` over the full ``B x B`` matrix, its zero diagonal included.

The authors' settings, as ``recipe=`` (``RECIPES``; the default is ``"release"``):

- ``"release"``: github.com/raywang4/DispLoss, ``train.py`` with ``transport.py``: ``0.25 * disp_loss``
  on the last block's output (``layer=-1``), no separate temperature (``tau = 1`` on the distance
  divided by ``F``).
- ``"paper"``: arXiv 2506.09027's own (JAX) runs: weight 0.5, ``tau = 0.5``, the block at a quarter of
  the depth, written ``layer=0.25`` (a fraction of depth, rounded half up as ``sra_plugin.layers`` does:
  block ``floor(depth / 4 + 0.5)``, 1-based; SiT-XL's 28 blocks -> block 7, 12 -> 3, 6 -> 2).

0.3.0's default (weight 0.5, ``tau = 1``, last block) was no author's setting; at digit scale it made
samples worse than no term (docs/evidence.md, "Does it help at this scale?").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import is_real
from .config import MethodConfig, option, shown
from .losses import no_autocast
from .registry import Adapter
from .student import Objective, Weight, resolve_objective
from .targets import NoTarget, Step

__all__ = ["Dispersive", "DispersiveConfig", "dispersive_loss", "RECIPES", "DEFAULT_RECIPE"]

# recipe -> the layer, weight and temperature it fills in where the caller gives none (module docstring).
RECIPES: dict[str, dict[str, Any]] = {
    "release": {"layer": -1, "weight": 0.25, "temperature": 1.0},  # DispLoss train.py / transport.py
    "paper": {"layer": 0.25, "weight": 0.5, "temperature": 0.5},  # arXiv 2506.09027 (JAX): block depth/4
}
DEFAULT_RECIPE = "release"


@dataclass(frozen=True)
class DispersiveConfig(MethodConfig):
    """Dispersive's options as resolved: the block (1-based), the depth, the temperature, the recipe."""

    text = "block {layer} of {depth}, temperature={temperature}, recipe={recipe!r}"

    layer: int = option()
    depth: int = option()
    temperature: float = option()
    recipe: str = shown()


def _dispersion(features: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """The dispersive loss (float32) and the mean scaled squared distance of the pairs (for the metrics).

    The squared distances are computed in float64 (float32 on Apple's MPS, which has no float64): in
    float32 a sum over F values loses about 1e-3 of relative precision at F = 12.6 M (one 1024-px Flux
    block per sample) and 3e-2 at 2^27."""
    with no_autocast(features.device.type):
        wide = torch.float32 if features.device.type == "mps" else torch.float64  # MPS has no float64
        z = features.reshape(features.shape[0], -1).to(wide)
        batch, size = z.shape
        scaled = torch.nn.functional.pdist(z).pow(2) / size  # each pair i < j once
        # The full B x B matrix: every pair twice and the zero diagonal, as the authors' code does.
        logits = torch.cat([-scaled, -scaled, z.new_zeros(batch)]) / temperature
        loss = (torch.logsumexp(logits, 0) - math.log(batch * batch)).float()
        return loss, scaled.detach().mean().float() if scaled.numel() else scaled.new_zeros(()).float()


def dispersive_loss(features: Tensor, temperature: float = 1.0) -> Tensor:
    """``log mean_ij exp(-||z_i - z_j||^2 / (F * temperature))`` over a batch of ``B`` samples, ``z_i``
    sample i's features flattened to ``F`` values; float32, whatever autocast is active (the distances
    are accumulated in float64, exact to ~1e-8 at any F)."""
    return _dispersion(features, temperature)[0]


class Dispersive(Objective):
    """Push block ``layer``'s features of the samples in a batch apart (one number per batch).

    Usage::

        disp = Dispersive(model)                    # the authors' release: last block, 0.25, tau 1
        pred = model(x_t, t, y)
        loss = diff_loss + disp(model, x_t, t, y)

    ``layer``, ``weight`` and ``temperature`` left as None come from ``recipe`` (``RECIPES``):
    ``"release"`` (the default; the authors' PyTorch release, DispLoss ``train.py``/``transport.py``:
    last block, weight 0.25, temperature 1) or ``"paper"`` (arXiv 2506.09027's JAX runs: block
    ``floor(depth / 4 + 0.5)``, i.e. ``layer=0.25``, weight 0.5, temperature 0.5); a value given
    explicitly wins over the recipe's. The loss is reduced over the batch, so ``sample_weight``
    has no meaning here and is refused. Under data parallelism each process disperses its own batch,
    as in the authors' code; it has no parameters, so wrap only the model in DDP.
    """

    metric_names = ("disp_loss", "mean_sq_dist", "student_norm")

    def __init__(
        self,
        model: nn.Module,
        layer: int | float | None = None,
        weight: Weight | None = None,
        temperature: float | None = None,
        adapter: str | Adapter | None = None,
        check_finite: bool = False,
        recipe: str = DEFAULT_RECIPE,
    ) -> None:
        super().__init__()
        if not isinstance(recipe, str) or recipe not in RECIPES:
            raise ValueError(f"recipe={recipe!r} is not accepted: use one of {sorted(RECIPES)}")
        chosen = RECIPES[recipe]
        layer = chosen["layer"] if layer is None else layer
        weight = chosen["weight"] if weight is None else weight
        temperature = chosen["temperature"] if temperature is None else temperature
        student, adapter, blocks, indices, weight = resolve_objective(model, adapter, weight, layer=layer)
        index = indices["layer"]
        if not is_real(temperature) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature={temperature!r} is not accepted: use a finite number > 0")
        config = DispersiveConfig(index, len(blocks), float(temperature), recipe)
        # No head (the features themselves are dispersed) and no loss against a target: ``_loss`` is its own.
        self._setup(student, adapter, config, {"student": index}, head="identity", dims=(0, 0), loss=dispersive_loss,
                    weight=weight, check_finite=check_finite, loss_label="infonce_l2")

    def _make_target(self) -> NoTarget:
        return NoTarget()

    def _check_inputs(self, step: Step) -> None:
        super()._check_inputs(step)
        x_t = step.x_t
        if x_t.dim() and x_t.shape[0] < 2:
            raise ValueError(
                f"x_t has a batch of {x_t.shape[0]}, which Dispersive cannot use: it pushes the samples of one batch "
                "apart, so one sample gives a loss of 0 and no gradient (a silent no-op). Give it at least 2 samples "
                "per call; under DDP, FSDP or ZeRO each process disperses its own batch, so that is per process"
            )

    @staticmethod
    def _check_sample_weight(sample_weight: Any, batch: int | None) -> None:
        if sample_weight is not None:
            raise ValueError(
                f"sample_weight={type(sample_weight).__name__} is not accepted by Dispersive: its loss is one number "
                "for the whole batch (a log-mean-exp over all pairs of samples), not a mean of per-sample losses; "
                "leave sample_weight=None and scale the term with weight="
            )

    def _loss(self, step: Step, target: None, weight: float | Tensor, sample_weight: None) -> Tensor:
        tokens = step.taps["student"]
        disp, mean_sq_dist = _dispersion(tokens, self.temperature)
        loss = weight * disp
        with torch.no_grad(), no_autocast(tokens.device.type):
            self._metrics = {
                "loss": loss.detach(),
                "disp_loss": disp.detach(),
                "mean_sq_dist": mean_sq_dist,
                "student_norm": tokens.detach().float().norm(dim=-1).mean(),
                "weight": weight,
                "student_reruns": self.student_reruns,
            }
        return loss

    def forward(self, model: nn.Module, x_t: Tensor, t: Any, *args: Any,
                sample_weight: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The weighted dispersive loss of one step; ``args``/``kwargs`` are the model's conditioning."""
        return self._run(model, x_t, t, args, kwargs, sample_weight)
