"""Unwrapping of training wrappers (DDP, torch.compile, EMA containers, peft) to the model inside.

peft is recognised by the module its classes live in, so nothing here imports it: a ``PeftModel``
holds its tuner as ``base_model`` (a ``LoraModel``, ``LoHaModel``, ...), which holds the user's model
as ``model``. The adapters' layers live inside that model, so hooking it sees every forward, whichever
of the three the user calls.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

__all__ = ["unwrap"]


def _peft_inner(module: nn.Module) -> nn.Module | None:
    """``PeftModel -> .base_model`` and ``LoraModel`` (any peft tuner) ``-> .model``; None for anything else."""
    if not type(module).__module__.startswith("peft."):
        return None
    for name in ("base_model", "model"):  # registered submodules only: peft forwards unknown attributes inward
        inner = module._modules.get(name)
        if isinstance(inner, nn.Module):
            return inner
    return None


def _inner(module: nn.Module) -> nn.Module | None:
    if isinstance(module, (DistributedDataParallel, DataParallel, AveragedModel)):
        return module.module
    orig = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(orig, nn.Module):
        return orig
    ema = getattr(module, "ema_model", None)  # ema_pytorch.EMA and look-alikes
    if isinstance(ema, nn.Module) and type(module).__name__ in {"EMA", "PostHocEMA", "KarrasEMA"}:
        return ema
    return _peft_inner(module)


def unwrap(module: nn.Module) -> nn.Module:
    """The innermost model under any number of DDP / compile / AveragedModel / ema_pytorch / peft wrappers."""
    seen = 0
    while (inner := _inner(module)) is not None and seen < 16:
        module, seen = inner, seen + 1
    return module
