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

__all__ = ["unwrap", "ModelWithHeads"]


class ModelWithHeads(nn.Module):
    """The model and the heads of the aligners on it, as one module for engines that train exactly one
    (``deepspeed.initialize(model=...)``, ``accelerator.prepare`` under DeepSpeed): the engine's
    optimizer then trains the heads, and ZeRO-3 partitions and gathers them like the model's own layers.
    Its forward is the model's; its state dict is the model's under ``model.`` and the heads' under ``heads.``.
    Any objective with a head goes in (SRA, SRA 2, LayerSync with a head, REPA); one without parameters
    (Dispersive, LayerSync with ``head="identity"``) needs none: give the engine the bare model.

    ``engine = deepspeed.initialize(model=ModelWithHeads(model, sra), ...)``, then
    ``pred = engine(x_t, t, y)`` and ``sra(engine, x_t, x_s, t, s, y)`` as usual. To build the aligner
    after the engine, make its head first: ``head = build_head("mlp", D, D_t)``,
    ``ModelWithHeads(model, head)``, then ``SelfRepresentationAlignment(engine, ..., head=head)``.
    """

    def __init__(self, model: nn.Module, *aligners_or_heads: nn.Module) -> None:
        super().__init__()
        if not aligners_or_heads or not all(isinstance(a, nn.Module) for a in aligners_or_heads):
            raise TypeError(
                f"aligners_or_heads={[type(a).__name__ for a in aligners_or_heads]} is not accepted: pass one or more "
                "objectives built on this model (SelfRepresentationAlignment, LatentAlignment, LayerSync, REPA), or the "
                "head modules you will give them as head= (to build them after the engine)"
            )
        # An aligner brings its head; a bare module is a head the user will hand to an aligner.
        heads = [a.head if isinstance(getattr(a, "head", None), nn.Module) else a for a in aligners_or_heads]
        self.model = model
        self.heads = nn.ModuleList(heads)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


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
    if isinstance(module, ModelWithHeads):
        return module.model
    # DeepSpeed's engine and FSDP1, recognised by name so that nothing here imports them.
    if type(module).__name__ in {"DeepSpeedEngine", "PipelineEngine", "FullyShardedDataParallel"} and isinstance(
            getattr(module, "module", None), nn.Module):
        return module.module
    orig = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(orig, nn.Module):
        return orig
    ema = getattr(module, "ema_model", None)  # ema_pytorch.EMA and look-alikes
    if isinstance(ema, nn.Module) and type(module).__name__ in {"EMA", "PostHocEMA", "KarrasEMA"}:
        return ema
    return _peft_inner(module)


def unwrap(module: nn.Module) -> nn.Module:
    """The innermost model under any number of DDP / FSDP1 / DeepSpeed / ``ModelWithHeads`` / compile /
    AveragedModel / ema_pytorch / peft wrappers."""
    seen = 0
    while (inner := _inner(module)) is not None and seen < 16:
        module, seen = inner, seen + 1
    return module
