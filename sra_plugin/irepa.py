"""iREPA (Singh et al., improved REPA; official code End2End-Diffusion/iREPA, ``ldm/``): REPA with a
convolutional projector on the model's token grid and the encoder's patch tokens z-scored over tokens.

Facts from the official code: projector ``nn.Conv2d(hidden, encoder_dim, kernel_size=3, padding=1)``
applied to block ``L_s``'s tokens laid out on their grid; each encoder token sequence normalised as
``(z - mean_T) / (std_T + 1e-6)`` (torch's default, unbiased std, over the token axis); REPA's per-token
negative cosine (here ``1 - cos``, the same gradient); ``proj_coeff`` 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .config import option
from .repa import REPA, REPAConfig
from .student import placed_like
from .targets import Step

__all__ = ["IREPA", "IREPAConfig", "ConvProjector"]


@dataclass(frozen=True)
class IREPAConfig(REPAConfig):
    """REPA's options and the projector's kernel size."""

    kernel_size: int = option(default=3)


class ConvProjector(nn.Module):
    """``Conv2d(D, D_enc, k, padding=k // 2)`` on ``(B, h*w, D)`` tokens laid out on their ``(h, w)`` grid."""

    takes_grid = True  # the objective calls it with the tokens' grid

    def __init__(self, dim: int, target_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, target_dim, kernel_size, padding=kernel_size // 2)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        b, n, d = tokens.shape
        return self.conv(tokens.transpose(1, 2).reshape(b, d, *grid)).flatten(2).transpose(1, 2)


class IREPA(REPA):
    """REPA with a 3x3 convolutional projector on the token grid and z-scored encoder tokens.

    Usage, as REPA: ``irepa = IREPA(model, encoder)``; ``loss = diff_loss + irepa(model, x_t, t, y, images=images)``.
    Defaults: ``layer=0.3`` of the depth, ``weight=1.0`` (the official ``proj_coeff``), ``kernel_size=3``.
    ``x_t`` must be an image batch ``(B, C, H, W)`` whose tokens form the grid of its aspect ratio (non-square
    grids work; video and packed-token inputs are refused). If the encoder's grid differs, its tokens are
    resized to the model's grid first (as REPA's), then z-scored."""

    zscore = True

    def __init__(self, model: nn.Module, encoder: nn.Module, layer: int | float = 0.3, weight: Any = 1.0,
                 kernel_size: int = 3, **options: Any) -> None:
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size!r} is not accepted: use an odd int >= 1 (3 is the official)")
        if "head" in options:
            raise TypeError("head= is not accepted by IREPA: its projector is the convolution (kernel_size=)")
        object.__setattr__(self, "_kernel", kernel_size)  # read by _config and build_head inside REPA's __init__
        super().__init__(model, encoder, layer=layer, weight=weight, head=f"conv{kernel_size}x{kernel_size}", **options)

    def _config(self, *values: Any) -> IREPAConfig:
        return IREPAConfig(*values, kernel_size=self._kernel)

    def build_head(self, head: str | nn.Module, dim: int, target_dim: int, student: nn.Module) -> nn.Module:
        return placed_like(ConvProjector(dim, target_dim, self._kernel), student)

    def _check_inputs(self, step: Step) -> None:
        if step.x_t.dim() != 4:
            raise ValueError(f"x_t of shape {tuple(step.x_t.shape)} is not accepted by IREPA: its projector needs an image grid (B, C, H, W)")
        super()._check_inputs(step)
