"""Unwrapping of training wrappers (DDP, torch.compile, EMA containers) to the model inside."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

__all__ = ["unwrap"]


def _inner(module: nn.Module) -> nn.Module | None:
    if isinstance(module, (DistributedDataParallel, DataParallel, AveragedModel)):
        return module.module
    orig = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(orig, nn.Module):
        return orig
    ema = getattr(module, "ema_model", None)  # ema_pytorch.EMA and look-alikes
    if isinstance(ema, nn.Module) and type(module).__name__ in {"EMA", "PostHocEMA", "KarrasEMA"}:
        return ema
    return None


def unwrap(module: nn.Module) -> nn.Module:
    """The innermost model under any number of DDP / compile / AveragedModel / ema_pytorch wrappers."""
    seen = 0
    while (inner := _inner(module)) is not None and seen < 16:
        module, seen = inner, seen + 1
    return module
