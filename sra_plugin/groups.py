"""Two token groups per sample at their own times (SRA-DTS, ``sradts.SRADTS``): the groups' draw and checks,
and the step's passes: the model run once per group on that group's tokens (``protocols.RunsTokenGroups``),
or once with every token at its group's time (``separate=False``, ``protocols.RunsPerTokenTime``)."""

from __future__ import annotations

import math
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from . import capture as capture_module
from ._checks import is_real
from .headsync import distributed_world
from .noise import NoiseGap
from .protocols import RunsPerTokenTime, RunsTokenGroups, TokenPass

__all__ = ["GroupDraw", "draw_groups", "token_passes", "group_sizes", "captures_paused", "check_mask_ratio",
           "check_separate", "check_support", "refuse_distributed", "ddp_caller"]


def group_sizes(mask_ratio: float, tokens: int) -> tuple[int, int]:
    """The two groups' token counts for ``tokens`` tokens, as the official ``_compute_group_counts``:
    the floor of each share, the token left over to the group with the larger fractional part (a tie,
    which the official code leaves to ``torch.topk``, to group 0)."""
    expected = (mask_ratio * tokens, (1.0 - mask_ratio) * tokens)
    counts = [math.floor(e) for e in expected]
    if sum(counts) < tokens:
        fractions = [e - c for e, c in zip(expected, counts)]
        counts[0 if fractions[0] >= fractions[1] else 1] += tokens - sum(counts)
    return counts[0], counts[1]


@contextmanager
def captures_paused(model: nn.Module) -> Iterator[None]:
    """The passes here run the model's blocks outside its forward: another objective's capture on the same
    model must not take their tokens for a training forward's."""
    with ExitStack() as stack:
        for capture in list(capture_module._CAPTURES.values()):
            if capture.model is model:
                stack.enter_context(capture.pausing())
        yield


def refuse_distributed(model: nn.Module, separate: bool = True) -> None:
    """The group passes run the model's modules, not its wrapper's forward: DDP would not synchronise the
    gradients (its reducer is armed in its forward) and FSDP would not gather the root's weights. The
    per-token pass (``separate=False``) runs the model's own forward, through a DDP wrapper when given one."""
    from torch.nn.parallel import DistributedDataParallel

    kinds = [DistributedDataParallel] if separate else []
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        kinds += [FSDPModule, FullyShardedDataParallel]
    except ImportError:  # torch without FSDP
        pass
    found = [m for m in (model, getattr(model, "module", None)) if isinstance(m, tuple(kinds))]
    if found:
        raise ValueError(
            f"model={type(found[0]).__name__} is not supported by SRADTS yet: its per-group passes run the model's "
            "modules outside the wrapper's forward, so DDP would not synchronise gradients and FSDP would not gather "
            "weights; train on one process, or with the bare model (DDP works with separate=False)"
        )


def ddp_caller(model: nn.Module, student: nn.Module, warned: set) -> nn.Module | None:
    """The DDP wrapper ``model`` if it is one, to run the student's per-token pass through (its forward arms
    the gradient reduction); it must wrap the bare model, whose modules the pass gives per-token forwards."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        if torch.is_grad_enabled() and distributed_world() > 1 and "bare-model" not in warned:
            warned.add("bare-model")
            warnings.warn(
                f"SRADTS(separate=False) was called with the bare {type(model).__name__} on {distributed_world()} "
                "processes: the student's pass then averages no gradients. If the model is wrapped in DDP, pass "
                "the wrapper: dts(ddp_model, x0, noise, ...)", stacklevel=4)
        return None
    if model.module is not student:
        raise ValueError(
            f"model=DistributedDataParallel({type(model.module).__name__}) is not accepted by SRADTS(separate=False): "
            f"wrap the bare {type(student).__name__} (DDP(model), not DDP(torch.compile(model)) or another wrapper)"
        )
    return model


def check_support(adapter: Any, model: nn.Module, separate: bool, what: str = "model") -> None:
    """Refuse a ``model`` (the student, or the user's ``teacher``) whose adapter cannot run the passes
    ``separate`` asks for: per group (``RunsTokenGroups``) or per-token time in one pass (``RunsPerTokenTime``)."""
    name = f"{what}={type(model).__name__} (adapter {adapter.name!r})"
    if separate and not isinstance(adapter, RunsTokenGroups):
        raise TypeError(
            f"{name} cannot run SRADTS: its adapter has no per-group pass (sra_plugin.protocols.RunsTokenGroups). "
            "SRADTS supports the DiT/SiT family (adapter 'dit') and the diffusers Flux, SD3/SD3.5, QwenImage, Wan, "
            "PixArt and DiT transformers; other families (U-ViT, MMDiT, timm ViTs, ...) are not supported"
        )
    if not separate and not isinstance(adapter, RunsPerTokenTime):
        raise TypeError(
            f"{name} cannot run SRADTS(separate=False): its adapter has no per-token time pass "
            "(sra_plugin.protocols.RunsPerTokenTime); supported: the DiT/SiT family, diffusers Wan, Flux and SD3"
        )
    reason = adapter.group_support(model) if separate else adapter.per_token_support(model)
    if reason is not None:
        raise ValueError(f"{name} cannot run SRADTS(separate={separate}): {reason}")


def check_separate(separate: Any) -> None:
    """``separate``: True (one pass per group) or False (one pass, per-token time)."""
    if not isinstance(separate, bool):
        raise TypeError(
            f"separate={separate!r} is not accepted: use True (one pass per token group, attention separated: the "
            "official recipe) or False (one pass, every token at its group's time, full attention: Self-Flow style)"
        )


def check_mask_ratio(mask_ratio: Any) -> None:
    """Group 0's share of the tokens: a number in (0, 1)."""
    if not is_real(mask_ratio) or not 0.0 < float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio!r} is not accepted: use a number in (0, 1), group 0's share of the tokens")


def check_pair(x0: Any, noise: Any) -> None:
    """``x0`` and one noise tensor like it."""
    for name, value in (("x0", x0), ("noise", noise)):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{name}={type(value).__name__ if not isinstance(value, Tensor) else value.dtype} is not accepted: use a floating torch.Tensor (B, C, H, W)")
    if noise.shape != x0.shape or noise.dtype != x0.dtype or noise.device != x0.device:
        raise ValueError(
            f"noise of shape {tuple(noise.shape)} ({noise.dtype}, {noise.device}) does not match x0 of shape "
            f"{tuple(x0.shape)} ({x0.dtype}, {x0.device}): use one noise tensor like x0"
        )


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def check_groups(groups: Any, batch: int, tokens: int, sizes: tuple[int, int], mask_ratio: float, device: torch.device,
                 generator: torch.Generator | None) -> Tensor:
    """Group ids ``(B, T)``, 0 or 1, with ``sizes[0]`` zeros per row: those given (checked), or a random draw."""
    accepted = (f"use an integer tensor of shape ({batch}, {tokens}) holding 0 and 1, with {sizes[0]} zeros "
                f"(group 0) and {sizes[1]} ones per row (mask_ratio={mask_ratio} of {tokens} tokens)")
    if groups is None:
        draw = _draw_device(generator, device)
        order = torch.rand(batch, tokens, generator=generator, device=draw).argsort(dim=1)
        drawn = torch.ones(batch, tokens, dtype=torch.long, device=draw)
        drawn.scatter_(1, order[:, : sizes[0]], 0)
        return drawn.to(device)
    if not isinstance(groups, Tensor) or groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
        what = type(groups).__name__ if not isinstance(groups, Tensor) else f"a tensor of dtype {groups.dtype}"
        raise TypeError(f"groups={what} is not accepted: {accepted}")
    if tuple(groups.shape) != (batch, tokens):
        raise ValueError(f"groups of shape {tuple(groups.shape)} is not accepted: {accepted}")
    groups = groups.to(device=device, dtype=torch.long)
    bad = (groups != 0) & (groups != 1)
    if bool(bad.any()):
        b, n = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"groups[{b}, {n}]={int(groups[b, n])} is not accepted: {accepted}")
    zeros = (groups == 0).sum(dim=1)
    wrong = (zeros != sizes[0]).nonzero()
    if wrong.numel():
        b = int(wrong[0, 0])
        raise ValueError(f"groups[{b}] has {int(zeros[b])} zeros is not accepted: {accepted}")
    return groups


def check_times(name: str, value: Any, batch: int, device: torch.device) -> Tensor:
    """Times ``(B, 2)`` in [0, 1], one per sample and group, on ``device``."""
    accepted = f"use a floating tensor of shape ({batch}, 2): one time in [0, 1] per sample and group (1 = noise)"
    if not isinstance(value, Tensor) or not value.is_floating_point():
        what = type(value).__name__ if not isinstance(value, Tensor) else f"a tensor of dtype {value.dtype}"
        raise TypeError(f"{name}={what} is not accepted: {accepted}")
    if tuple(value.shape) != (batch, 2):
        raise ValueError(f"{name} of shape {tuple(value.shape)} is not accepted: {accepted}")
    bad = ~torch.isfinite(value) | (value < 0) | (value > 1)
    if bool(bad.any()):
        b, g = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}[{b}, {g}]={float(value[b, g])!r} is not accepted: {accepted}")
    return value.to(device)


@dataclass
class GroupDraw:
    """One step's groups: ids ``groups`` ``(B, T)``, times ``t`` and ``s`` ``(B, 2)``, each group's token
    positions ``index`` (ascending), and ``order``, which puts the groups' concatenated tokens back in place."""

    groups: Tensor
    t: Tensor
    s: Tensor
    index: list[Tensor]
    order: Tensor

    def in_order(self, parts: list[Tensor]) -> Tensor:
        """The groups' tokens ``[(B, n_0, X), (B, n_1, X)]`` back in token order ``(B, T, X)``."""
        joined = torch.cat(parts, dim=1)
        return joined.gather(1, self.order.unsqueeze(-1).expand(-1, -1, joined.shape[-1]))


def draw_groups(adapter: RunsTokenGroups, model: nn.Module, x0: Any, noise: Any, groups: Any, t: Any, s: Any,
                generator: Any, mask_ratio: float, gap: NoiseGap) -> GroupDraw:
    """Check what the call gave and draw the rest as the official code does: groups by a random permutation,
    ``t_g ~ U(0, 1)``, ``s_g = clamp(t_g - max_gap u_g, 0, 1)``."""
    check_pair(x0, noise)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator={type(generator).__name__} is not accepted: use a torch.Generator or None")
    batch, device = x0.shape[0], x0.device
    tokens = adapter.num_tokens(model, x0)
    sizes = group_sizes(mask_ratio, tokens)
    if min(sizes) < 1:
        raise ValueError(f"mask_ratio={mask_ratio} leaves a group empty on {tokens} tokens ({sizes}): use more tokens or another ratio")
    groups = check_groups(groups, batch, tokens, sizes, mask_ratio, device, generator)
    draw = _draw_device(generator, device)
    t = check_times("t", t, batch, device) if t is not None else torch.rand(batch, 2, generator=generator, device=draw)
    s = check_times("s", s, batch, device) if s is not None else gap.sample(t.to(draw), generator=generator)
    # Each group's token positions, ascending; ``order`` puts the groups' concatenated tokens back in place.
    ranked = groups.argsort(dim=1, stable=True)
    return GroupDraw(groups, t.to(device), s.to(device), [ranked[:, : sizes[0]], ranked[:, sizes[0]:]], ranked.argsort(dim=1))


def token_passes(adapter: Any, module: nn.Module, x0: Tensor, noise: Tensor, times: Tensor, draw: GroupDraw,
                 args: tuple, kwargs: dict, tap: int, output: bool, separate: bool,
                 caller: nn.Module | None = None) -> TokenPass:
    """The step's passes of ``module`` at the groups' ``times`` ``(B, 2)``, on the linear path (t = 1 noise), in
    token order: with ``separate``, one pass per group on the inputs ``(1 - t_g) x0 + t_g noise``; without, one
    pass on every token's own ``(1 - t) x0 + t noise``, with per-token time (through ``caller``, the model's
    DDP wrapper, when there is one)."""
    model_time = x0.dtype if x0.dtype in (torch.float32, torch.float64) else torch.float32
    if not separate:
        per_token = times.gather(1, draw.groups)  # (B, T): each token its group's time
        mix = adapter.token_values(module, per_token.to(x0.dtype), x0)
        with captures_paused(module):
            return adapter.per_token_forward(module, (1 - mix) * x0 + mix * noise, per_token.to(model_time),
                                             args, kwargs, (tap,), output, caller=caller)
    shape = (x0.shape[0],) + (1,) * (x0.dim() - 1)
    inputs, group_times = [], []
    for g in range(2):
        tg = times[:, g]
        mix = tg.to(x0.dtype).reshape(shape)
        inputs.append((1 - mix) * x0 + mix * noise)
        group_times.append(tg.to(model_time))
    with captures_paused(module):
        passes = adapter.group_forward(module, inputs, group_times, draw.index, args, kwargs, (tap,), output)
    pred = adapter.unpatchify(module, draw.in_order(passes.outputs), x0) if output else None
    return TokenPass(pred, {k: draw.in_order(v) for k, v in passes.taps.items()}, passes.args, passes.kwargs)
