"""Per-token alignment losses. Each maps ``(pred, target)`` of shape ``(B, N, D)`` to ``(B, N)``;
the alignment is their mean over batch and tokens, computed in float32."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["smooth_l1", "cosine", "mse", "l1", "build_loss", "alignment_loss", "per_sample", "LOSSES", "SMOOTH_L1_BETA"]

SMOOTH_L1_BETA = 0.05
"""The paper's smooth-L1 beta (SRA, Sec. 4.1)."""


def smooth_l1(pred: Tensor, target: Tensor) -> Tensor:
    """Smooth-L1 with beta 0.05, the paper's loss; the mean over tokens equals the mean over all elements."""
    return F.smooth_l1_loss(pred, target, beta=SMOOTH_L1_BETA, reduction="none").mean(-1)


def cosine(pred: Tensor, target: Tensor) -> Tensor:
    """``1 - cos(pred_n, target_n)`` per token, over the feature axis (the paper's patch-wise loss)."""
    # cos(a, a) can round to just above 1 in float32; the loss must not go below 0.
    return (1 - F.cosine_similarity(pred, target, dim=-1)).clamp_min(0)


def mse(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).pow(2).mean(-1)


def l1(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).abs().mean(-1)


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "smooth_l1": smooth_l1,
    "cosine": cosine,
    "mse": mse,
    "l1": l1,
}


def build_loss(loss: str | Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is not accepted: use one of {', '.join(map(repr, LOSSES))} or callable(pred, target) -> per-token loss")
        return LOSSES[loss]
    if callable(loss):
        return loss
    raise TypeError(f"loss={loss!r} is not accepted: use one of {', '.join(map(repr, LOSSES))} or callable(pred, target) -> per-token loss")


def per_sample(loss_fn: Callable[[Tensor, Tensor], Tensor], pred: Tensor, target: Tensor) -> Tensor:
    """``loss_fn``'s values averaged over every axis but the batch axis: one loss per sample, ``(B,)``."""
    values = loss_fn(pred, target)
    if not isinstance(values, Tensor) or values.dim() == 0 or values.shape[0] != pred.shape[0]:
        got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(
            f"loss={getattr(loss_fn, '__name__', loss_fn)!r} returned {got} for pred {tuple(pred.shape)}: "
            "a loss must return per-sample values shaped (B, ...), e.g. (B, N) per token"
        )
    return values.reshape(values.shape[0], -1).mean(1)


def alignment_loss(loss_fn: Callable[[Tensor, Tensor], Tensor], pred: Tensor, target: Tensor) -> Tensor:
    """Mean per-token loss in float32, whatever autocast is active."""
    device_type = pred.device.type
    with torch.autocast(device_type=device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else nullcontext():
        return loss_fn(pred.float(), target.float()).mean()

