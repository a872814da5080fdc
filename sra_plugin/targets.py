"""Targets that come from outside the student's forward and need machinery of their own. (The others:
the EMA teacher pass is ``teacher.TeacherPass``; the clean latent is the adapter's ``patchify``;
another tap of the same forward, detached, and "no target" are one line in their method.)

``EncoderTarget``: the patch tokens of a frozen image encoder the user loaded (REPA), computed under
``no_grad`` in eval mode, on the encoder's grid resized to the model's token grid when they differ.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .protocols import EncodesImages
from .registry import resolve_adapter
from .teacher import eval_mode

__all__ = ["EncoderTarget", "encoder_reader", "grid_of", "resize_grid"]


def grid_of(tokens: int, height: int, width: int, what: str) -> tuple[int, int]:
    """The ``(h, w)`` token grid of ``tokens`` tokens over a ``height x width`` picture: ``h * w ==
    tokens`` and ``h / w == height / width``."""
    h = round(math.sqrt(tokens * height / width))
    if h < 1 or tokens % h or abs(h / (tokens // h) - height / width) > 1e-6 * max(1.0, height / width):
        raise ValueError(
            f"{what}: {tokens} tokens do not form a grid with the aspect ratio of its input ({height}x{width}); "
            "REPA needs image tokens on a 2-D grid (pass encoder_tokens= to read them yourself)"
        )
    return h, tokens // h


def resize_grid(tokens: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """``(B, h*w, D)`` tokens on grid ``grid`` resampled to grid ``size``: bilinear with antialiasing
    (an area-like average when shrinking), per channel, in float32."""
    b, n, d = tokens.shape
    if tuple(grid) == tuple(size):
        return tokens
    image = tokens.float().transpose(1, 2).reshape(b, d, *grid)
    resized = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized.reshape(b, d, -1).transpose(1, 2).to(tokens.dtype)


def encoder_reader(encoder: nn.Module, read: Callable | None, dim: int | None) -> tuple[Callable, int]:
    """How to read ``encoder``'s patch tokens and their width: ``read``/``dim`` as given, else the
    registered adapter's ``EncodesImages`` protocol (built in for timm ViTs)."""
    adapter = None
    try:
        adapter = resolve_adapter(encoder)
    except ValueError:
        pass
    if read is None:
        if not isinstance(adapter, EncodesImages):
            raise ValueError(
                f"encoder={type(encoder).__name__} is not accepted: no registered adapter says how to read its patch "
                "tokens; pass encoder_tokens=callable(encoder, images) -> (B, N, D) and encoder_dim=D"
            )
        read = adapter.encoder_tokens
    elif not callable(read):
        raise TypeError(f"encoder_tokens={read!r} is not accepted: use callable(encoder, images) -> (B, N, D) or None")
    if dim is None:
        if not isinstance(adapter, EncodesImages):
            raise ValueError(f"encoder_dim=None is not accepted for encoder={type(encoder).__name__}: give the width D of its tokens")
        dim = adapter.encoder_dim(encoder)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"encoder_dim={dim!r} is not accepted: use a positive int, the width of the encoder's tokens")
    return read, int(dim)


class EncoderTarget:
    """Patch tokens of a frozen ``encoder`` on ``images``, on the model's token grid."""

    def __init__(self, encoder: nn.Module, read: Callable[[nn.Module, Tensor], Tensor]) -> None:
        self.encoder = encoder
        self.read = read

    def tokens(self, images: Tensor, model_tokens: int, model_input: Tensor) -> Tensor:
        with torch.no_grad(), eval_mode(self.encoder):
            found = self.read(self.encoder, images)
        if not isinstance(found, Tensor) or found.dim() != 3 or found.shape[0] != images.shape[0]:
            shape = tuple(found.shape) if isinstance(found, Tensor) else type(found).__name__
            raise ValueError(f"the encoder's tokens have shape {shape}: expected (B, N_enc, D_enc) with B={images.shape[0]}")
        same_count = found.shape[1] == model_tokens
        if model_input.dim() != 4 or images.dim() != 4:
            if same_count:  # no 2-D grid to compare (video, packed tokens): paired by index
                return found.detach()
            raise ValueError(
                f"the encoder gives {found.shape[1]} tokens and the model {model_tokens}: resizing the encoder's grid "
                f"needs 2-D inputs, got x_t {tuple(model_input.shape)} and images {tuple(images.shape)}"
            )
        # Grids, not token counts: an 8x8 encoder grid and a 4x16 model grid both have 64 tokens.
        try:
            grid = grid_of(found.shape[1], images.shape[-2], images.shape[-1], "the encoder's output")
            size = grid_of(model_tokens, model_input.shape[-2], model_input.shape[-1], "the model's block")
        except ValueError:
            if same_count:  # tokens that form no grid of their input's shape: paired by index
                return found.detach()
            raise
        return resize_grid(found.detach(), grid, size)
