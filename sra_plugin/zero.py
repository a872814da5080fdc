"""DeepSpeed ZeRO-3: the owned EMA teacher as each rank's float32 EMA of its own shard.

Under ZeRO-3 a parameter outside its module's forward is an empty placeholder; the rank's slice of
it lives in ``param.ds_tensor`` (the flattened weight, zero-padded to a multiple of the world size,
rank ``r`` holding elements ``[r * n, (r + 1) * n)``). The teacher pass puts the EMA slices in place
of those and runs the model: the engine's own hooks gather the EMA weights block by block, so no
rank ever holds a full copy. Partitioned parameters are recognised by their attributes
(``ds_id``/``ds_tensor``/``ds_status``); nothing here imports deepspeed unless the model already uses it.
"""

from __future__ import annotations

import sys
import weakref
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "is_partitioned", "any_partitioned", "check_supported", "full_shape", "shard_of", "local_shard",
    "rank_and_world", "release_all", "swapped_shards", "kept_forward_stack",
]


def is_partitioned(param: Tensor) -> bool:
    """A ZeRO-3 parameter (its data may be an empty placeholder; its slice is in ``ds_tensor``)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_status") and getattr(param, "ds_tensor", None) is not None


def any_partitioned(module: nn.Module) -> bool:
    """Whether ZeRO-3 partitions ``module``: it converts every parameter of the engine's module, so the
    first one tells (this runs at every step, and a large model has thousands of parameters)."""
    first = next(module.parameters(), None)
    return first is not None and is_partitioned(first)


def full_shape(param: Tensor) -> tuple[int, ...]:
    """The parameter's real shape, also while ZeRO-3 has it partitioned (then its data has shape ``(0,)``)."""
    return tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)


def shard_of(param: Tensor) -> Tensor:
    """This rank's slice of a partitioned parameter (a flat tensor, the last rank's zero-padded)."""
    return param.ds_tensor


def rank_and_world(param: Tensor) -> tuple[int, int]:
    group = getattr(param, "ds_process_group", None)
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def local_shard(param: Tensor, full: Tensor) -> Tensor:
    """This rank's slice of ``full`` (a value of ``param``'s full shape), laid out as ``param.ds_tensor``."""
    size = shard_of(param).numel()
    rank, _ = rank_and_world(param)
    flat = full.detach().reshape(-1)
    piece = flat[rank * size: (rank + 1) * size]
    if piece.numel() < size:  # the padding of the last rank(s)
        piece = torch.cat([piece, piece.new_zeros(size - piece.numel())])
    return piece.to(device=shard_of(param).device)


def check_supported(module: nn.Module, where: str = "model") -> None:
    """Refuse the ZeRO-3 variants whose slices are not plain tensors that a pass gathers from."""
    for name, p in module.named_parameters():
        if not is_partitioned(p):
            continue
        location = str(getattr(p.ds_tensor, "final_location", None) or "")
        if location.endswith("nvme"):
            raise ValueError(
                f"{where}: parameter {name!r} is offloaded to NVMe by ZeRO-3 (offload_param.device='nvme'), which "
                "SelfRepresentationAlignment's owned EMA teacher does not support: use offload_param.device 'none' or "
                "'cpu', or pass teacher= an EMA model you keep yourself"
            )
        if hasattr(p.ds_tensor, "ds_quant_scale"):
            raise ValueError(
                f"{where}: parameter {name!r} has ZeRO-3 quantized weights (zero_quantized_weights=True), which the "
                "owned EMA teacher cannot swap: turn them off, or pass teacher= an EMA model you keep yourself"
            )
        if getattr(p, "ds_zero_param_process_group", None) is not None:
            raise ValueError(
                f"{where}: parameter {name!r} uses ZeRO++ hierarchical partitioning (zero_hpz_partition_size > 1), whose "
                "secondary copies the owned EMA teacher cannot swap: set zero_hpz_partition_size to 1, or pass "
                "teacher= an EMA model you keep yourself"
            )


# ---------------------------------------------------------------------------- gathering state
def _status(param: Tensor) -> str:
    return param.ds_status.name


_registries: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


def _forward_stack() -> list | None:
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    return getattr(offload, "FWD_MODULE_STACK", None)


def _inflight_registry(model: nn.Module) -> object | None:
    """The engine's registry of parameters being gathered. It lives on the engine's root module, which
    ZeRO-3 keeps at the bottom of its forward stack; the model may be that root or inside it."""
    if model in _registries:
        return _registries[model]
    found = getattr(model, "ds_inflight_param_registry", None)
    if found is None:
        for root in _forward_stack() or []:
            registry = getattr(root, "ds_inflight_param_registry", None)
            if registry is not None and any(m is model for m in root.modules()):
                found = registry
                break
    if found is not None:
        _registries[model] = found
    return found


@torch.no_grad()
def release_all(model: nn.Module, params: Iterable[Tensor] | None = None) -> None:
    """Drop every gathered copy of ``model``'s partitioned parameters, so that the next use gathers from
    the slices again. Kept copies are the engine's cache (persistent small parameters, reuse distance,
    prefetch); dropping them costs at most a re-gather."""
    params = [p for p in (model.parameters() if params is None else params) if is_partitioned(p)]
    inflight = [p for p in params if _status(p) == "INFLIGHT"]
    if inflight:
        registry = _inflight_registry(model)
        if registry is None:
            raise RuntimeError(
                f"ZeRO-3 is still gathering {len(inflight)} parameters of {type(model).__name__} and its engine's registry "
                "was not found: call the engine's forward (or deepspeed.initialize) before SelfRepresentationAlignment's"
            )
        for p in inflight:
            registry.pop(p).wait()
    for p in params:
        if _status(p) == "AVAILABLE":
            p.ds_active_sub_modules.clear()
            p.partition()


@contextmanager
def swapped_shards(model: nn.Module, shards: dict[str, Tensor]) -> Iterator[nn.Module]:
    """``model`` computing with the parameters named in ``shards`` replaced by those slices (cast to each
    slice's dtype); the model's own slices are back, untouched, on exit. Every gathered copy is dropped
    before and after, so that no pass mixes the two."""
    params = dict(model.named_parameters())
    unknown = sorted(set(shards) - set(params))
    if unknown:
        raise ValueError(f"the teacher's weights name parameters the model does not have: {unknown[:3]}")
    release_all(model)
    saved: dict[str, Tensor] = {}
    try:
        with torch.no_grad():
            for name, value in shards.items():
                own = shard_of(params[name])
                if value.shape != own.shape:
                    raise ValueError(f"the teacher's slice of {name!r} has shape {tuple(value.shape)}, this rank's {tuple(own.shape)}")
                saved[name] = own.data
                # Reassigning .data (not copying into it) keeps the optimizer's view of the slice intact.
                own.data = value.detach().to(dtype=own.dtype, device=own.device)
        yield model
    finally:
        release_all(model)
        for name, data in saved.items():
            shard_of(params[name]).data = data


@contextmanager
def kept_forward_stack() -> Iterator[None]:
    """ZeRO-3 pushes each module on a global stack before its forward and pops it after; a pass stopped
    early skips the pops. Restore the stack's depth after such a pass (no-op without deepspeed)."""
    stack = _forward_stack()
    depth = len(stack) if stack is not None else None
    try:
        yield
    finally:
        if stack is not None and depth is not None:
            del stack[depth:]
