"""Alignment losses. Each maps ``(pred, target)`` of shape ``(B, N, D)`` to a tensor shaped
``(B, ...)``: per token ``(B, N)`` for most, per channel ``(B, D)`` for ``cosine_tokens``.
``per_sample`` reduces any of them to one loss per sample ``(B,)`` (the mean over every non-batch
axis) and ``alignment_loss`` is the mean of that, both computed in float32."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["smooth_l1", "cosine", "cosine_tokens", "mse", "l1", "build_loss", "per_sample", "alignment_loss", "no_autocast", "LOSSES", "SMOOTH_L1_BETA"]

SMOOTH_L1_BETA = 0.05
"""The paper's smooth-L1 beta (SRA, Sec. 4.1)."""


def smooth_l1(pred: Tensor, target: Tensor) -> Tensor:
    """Smooth-L1 with beta 0.05, the paper's loss; the mean over tokens equals the mean over all elements."""
    return F.smooth_l1_loss(pred, target, beta=SMOOTH_L1_BETA, reduction="none").mean(-1)


def cosine(pred: Tensor, target: Tensor) -> Tensor:
    """``1 - cos(pred_n, target_n)`` per token, over the feature axis (the paper's patch-wise loss)."""
    # cos(a, a) can round to just above 1 in float32; the loss must not go below 0.
    return (1 - F.cosine_similarity(pred, target, dim=-1)).clamp_min(0)


def cosine_tokens(pred: Tensor, target: Tensor) -> Tensor:
    """``1 - cos`` per channel over the token axis, ``(B, N, D) -> (B, D)``: the official SRA code's
    current default loss.

    That code calls ``F.cosine_similarity(pred, target)`` on ``(B, N, D)`` tensors with torch's
    default ``dim=1``, so for each sample and each channel ``d`` it compares the column
    ``pred[b, :, d]`` (that channel's values over all tokens) with ``target[b, :, d]``. ``cosine``
    instead compares each token's feature vector ``pred[b, n, :]`` with ``target[b, n, :]``.
    """
    return (1 - F.cosine_similarity(pred, target, dim=1)).clamp_min(0)


def mse(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).pow(2).mean(-1)


def l1(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).abs().mean(-1)


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "smooth_l1": smooth_l1,
    "cosine": cosine,
    "cosine_tokens": cosine_tokens,
    "mse": mse,
    "l1": l1,
}


def build_loss(loss: str | Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is not accepted: use one of {', '.join(map(repr, LOSSES))} or callable(pred, target) -> loss shaped (B, ...)")
        return LOSSES[loss]
    if callable(loss):
        return loss
    raise TypeError(f"loss={loss!r} is not accepted: use one of {', '.join(map(repr, LOSSES))} or callable(pred, target) -> loss shaped (B, ...)")


def no_autocast(device_type: str) -> AbstractContextManager:
    """Autocast switched off on ``device_type`` (nothing to switch where autocast is unavailable): a loss
    computed inside sees float32 inputs and its matmuls and reductions stay in float32. The one
    autocast guard of the package."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return nullcontext()


def per_sample(loss_fn: Callable[[Tensor, Tensor], Tensor], pred: Tensor, target: Tensor) -> Tensor:
    """One loss per sample, ``(B,)``: ``loss_fn``'s values averaged over every non-batch axis, in
    float32 whatever autocast is active. ``loss_fn`` may return ``(B,)``, ``(B, N)``, ``(B, D)`` or
    any ``(B, ...)``; anything else (a scalar, another leading size) is a ``ValueError``."""
    with no_autocast(pred.device.type):
        values = loss_fn(pred.float(), target.float())
        batch = pred.shape[0]
        if not isinstance(values, Tensor) or values.dim() == 0 or values.shape[0] != batch:
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(
                f"loss={getattr(loss_fn, '__name__', loss_fn)!r} returned {shape} for pred of shape {tuple(pred.shape)}: "
                f"a loss must return a tensor shaped ({batch}, ...) (per sample, per token or per channel), not reduced over the batch"
            )
        return values.float().reshape(batch, -1).mean(1)


def alignment_loss(loss_fn: Callable[[Tensor, Tensor], Tensor], pred: Tensor, target: Tensor) -> Tensor:
    """The mean of ``per_sample``: the unweighted alignment loss of a batch, in float32."""
    return per_sample(loss_fn, pred, target).mean()
