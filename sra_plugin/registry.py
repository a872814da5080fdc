"""Adapter registry: how to find a backbone's blocks, read its tokens and call it.

Backbone knowledge is data declared here by ``register_adapter`` (the built-in declarations live in
``sra_plugin.adapters``); nothing else in the package knows a model by name. Resolution walks the
registry from the newest registration to the oldest, so a later registration wins.
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

from torch import Tensor, nn

__all__ = ["Adapter", "ModelCall", "patchify_latent", "register_adapter", "resolve_adapter", "registered_adapters", "token_reader"]


@dataclass
class ModelCall:
    """The inputs of one call of the model's forward, ``model(*args, **kwargs)``, as the model received them.

    Adapters get it in ``tokens(output, model, call)`` so that a block's tokens can depend on the
    model input (e.g. how many image tokens a merged ``[text; image]`` sequence holds).
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def get(self, name: str, position: int | None = None, default: Any = None) -> Any:
        """The argument passed as ``name=`` or, failing that, at positional index ``position``."""
        if name in self.kwargs:
            return self.kwargs[name]
        if position is not None and position < len(self.args):
            return self.args[position]
        return default


def _takes_call(fn: Callable) -> bool:
    """Whether a ``tokens`` callable (a function, lambda or bound method) accepts a third argument, the ``ModelCall``."""
    try:
        params = list(inspect.signature(fn).parameters.values())  # a bound method's signature omits self
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3


def token_reader(adapter: "Adapter") -> Callable[[Any, nn.Module, "ModelCall"], Tensor]:
    """``adapter.tokens`` as a callable of ``(output, model, call)``, also for an older adapter whose
    ``tokens`` takes only ``(output, model)``. Resolved once, outside any hook: hooks run inside
    torch.compile's trace, which should not see signature inspection."""
    if _takes_call(adapter.tokens):
        return adapter.tokens
    return lambda output, model, call: adapter.tokens(output, model)


def patchify_latent(x0: Tensor, patch_size: int | Sequence[int], *, channels_last: bool = True) -> Tensor:
    """Cut a latent into non-overlapping patches, one token per patch, row-major over the grid.

    ``x0``: ``(B, C, H, W)`` with ``patch_size`` ``p`` or ``(p, q)``, or a video ``(B, C, F, H, W)``
    with ``(pt, ph, pw)``. Returns ``(B, N, C * prod(patch))``. Tokens run over the grid row by row
    (frame by frame for video). Within a token, ``channels_last=True`` orders the values
    ``(pt, ph, pw, C)``, the layout that DiT/SiT, U-ViT, SD3 and Wan unpatchify from;
    ``channels_last=False`` orders them ``(C, pt, ph, pw)``, the layout of Flux's packed latents.
    """
    sizes = (patch_size,) if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
    grid_dims = x0.dim() - 2
    if grid_dims not in (2, 3):
        raise ValueError(f"x0 of shape {tuple(x0.shape)} is not accepted: use (B, C, H, W) or (B, C, F, H, W)")
    if len(sizes) == 1:
        sizes = sizes * grid_dims
    if len(sizes) != grid_dims or any(p < 1 for p in sizes):
        raise ValueError(f"patch_size={patch_size!r} does not fit x0 of shape {tuple(x0.shape)}: give {grid_dims} positive sizes")
    b, c, *extent = x0.shape
    if any(n % p for n, p in zip(extent, sizes)):
        raise ValueError(f"x0 of shape {tuple(x0.shape)} is not divisible into patches of {sizes}")
    grid = [n // p for n, p in zip(extent, sizes)]
    split = [b, c]
    for g, p in zip(grid, sizes):
        split += [g, p]
    x = x0.reshape(split)  # (B, C, g1, p1, g2, p2[, g3, p3])
    grid_axes = [2 + 2 * i for i in range(grid_dims)]
    patch_axes = [3 + 2 * i for i in range(grid_dims)]
    inner = [*patch_axes, 1] if channels_last else [1, *patch_axes]
    x = x.permute(0, *grid_axes, *inner)
    n = 1
    for g in grid:
        n *= g
    return x.reshape(b, n, -1)


PATCH_EMBEDDERS = ("x_embedder", "patch_embed", "pos_embed", "patch_embedding", "img_in", "proj_in")
"""Attribute names under which models keep their patch embedder (first match wins)."""


class Adapter:
    """How SRA talks to one backbone family. Subclass it for cases the declarative form cannot say.

    Required: ``matches``, ``blocks``. Optional: ``tokens`` (default: the block's output tensor, or
    the first element of a tuple output), ``forward`` (how to call the model), ``dim`` (feature width
    of a block's tokens), ``patchify``, ``patch_dim`` and ``target_shape`` (the clean latent in the
    model's token layout, its width per token and the shape it is given in, for ``LatentAlignment``), ``watch`` and ``teacher_inputs`` (conditioning the model changes inside its
    own forward, such as labels dropped for classifier-free guidance).

    ``tokens(output, model, call)`` also receives the ``ModelCall`` of the model forward the block ran
    in (its ``args`` and ``kwargs``); an adapter whose ``tokens`` takes only ``(output, model)`` still works.
    """

    name: str = "adapter"
    output_form_arguments: tuple[str, ...] = ("return_dict",)
    """Forward arguments that change only the form of the model's output, never its features: the
    capture does not compare them (``model(..., return_dict=False)[0]`` is the same forward as
    ``model(...).sample``)."""

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks in execution order; block ``k`` (1-based) is ``blocks(model)[k - 1]``."""
        raise NotImplementedError

    def tokens(self, output: Any, model: nn.Module, call: ModelCall | None = None) -> Tensor:
        """Image tokens ``(B, N, D)`` from a block's output (``call``: the model's inputs in that forward)."""
        return output if isinstance(output, Tensor) else output[0]

    def forward(self, model: nn.Module, x: Tensor, t: Any, *args: Any, **kwargs: Any) -> Any:
        return model(x, t, *args, **kwargs)

    def dim(self, model: nn.Module, block: nn.Module) -> int:
        """Width ``D`` of the tokens that ``block`` produces: the residual stream's width.

        Read from the block's linear layers: most of them (qkv, the attention output, the MLP's first
        layer, the modulation) take the residual stream as input, so the most common ``in_features``
        is its width; a qk-norm or a per-head layer cannot mislead it. Without linear layers: the
        widest ``LayerNorm``, then ``hidden_size``/``embed_dim``/``inner_dim``/``dim`` on the block,
        the model or its config, then the output width of the model's patch embedder.
        """
        widths = Counter(m.in_features for m in block.modules() if isinstance(m, nn.Linear))
        if widths:
            top = max(widths.values())
            # Ties go to the widest: a block's few narrow inputs are per-head or bottleneck layers.
            return max(w for w, n in widths.items() if n == top)
        norms = [int(m.normalized_shape[-1]) for m in block.modules() if isinstance(m, nn.LayerNorm) and m.normalized_shape]
        if norms:
            return max(norms)
        for owner in (block, model, getattr(model, "config", None)):
            for attr in ("hidden_size", "embed_dim", "inner_dim", "dim"):
                value = getattr(owner, attr, None)
                if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                    return int(value)
        for attr in ("x_embedder", "patch_embed", "patch_embedding", "pos_embed"):
            embedder = getattr(model, attr, None)
            layers = [m for m in embedder.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear))] if isinstance(embedder, nn.Module) else []
            if layers:
                last = layers[-1]
                return int(last.out_features if isinstance(last, nn.Linear) else last.out_channels)
        raise ValueError(
            f"adapter {self.name!r} cannot tell the token width of block {type(block).__name__}: "
            "declare it, e.g. register_adapter(..., dim=768) or override Adapter.dim"
        )

    def patchify(self, model: nn.Module, x0: Tensor) -> Tensor:
        """The clean latent ``x0`` as ``(B, N_img, C*p*p)`` in the model's token order: token ``i`` holds
        exactly the latent values the model's token ``i`` predicts (the inverse of its unpatchify)."""
        raise ValueError(
            f"adapter {self.name!r} ({type(model).__name__}) has no patchify, which LatentAlignment needs: "
            "declare it, e.g. register_adapter(..., patchify=lambda model, x0: "
            "einops.rearrange(x0, 'b c (h p) (w q) -> b (h w) (c p q)', p=2, q=2)) or override Adapter.patchify"
        )

    def patch_dim(self, model: nn.Module) -> int:
        """Values per token of ``patchify``'s output (``C * p * p``): by default what the model's patch
        embedder takes in for one token (a patch convolution's ``in_channels * kernel`` or a token
        linear's ``in_features``); override it where that is not so."""
        for attr in PATCH_EMBEDDERS:
            embedder = getattr(model, attr, None)
            if not isinstance(embedder, nn.Module):
                continue
            layer = next((m for m in embedder.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear))), None)
            if isinstance(layer, nn.Linear):
                return int(layer.in_features)
            if layer is not None:
                return int(layer.in_channels) * math.prod(layer.kernel_size)
        raise ValueError(
            f"adapter {self.name!r} cannot tell how many latent values a token of {type(model).__name__} holds: "
            "pass LatentAlignment(..., target_dim=C * p * p) or override Adapter.patch_dim"
        )

    def target_shape(self, model: nn.Module, x_t: Tensor, call: ModelCall) -> tuple[int, ...]:
        """The shape ``patchify`` wants its ``x0`` in, for a forward on ``x_t`` with the conditioning of
        ``call``: the clean latent of what the model predicts. By default ``x_t``'s own shape; a model
        that stacks conditioning channels onto ``x_t``, or appends reference tokens to it, predicts less."""
        return tuple(x_t.shape)

    def watch(self, model: nn.Module) -> dict[str, tuple[nn.Module, Callable[[tuple, dict], Any]]]:
        """Values to record during the student's forward: ``name -> (module, read(args, kwargs))``.

        ``read`` sees the inputs of ``module``'s forward (a pre-hook) and its result is handed to
        ``teacher_inputs`` under ``name``.
        """
        return {}

    def teacher_inputs(self, model: nn.Module, args: tuple, kwargs: dict, watched: dict[str, Any]) -> tuple[tuple, dict]:
        """Conditioning for the teacher, given what the student's forward used (``watched``)."""
        return args, kwargs

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


Matcher = Union[type, tuple, Callable[[nn.Module], bool]]
BlockSpec = Union[str, Sequence[str], Callable[[nn.Module], Sequence[nn.Module]]]


def _get_path(model: nn.Module, path: str) -> Any:
    return operator.attrgetter(path)(model)


class DeclaredAdapter(Adapter):
    """An adapter made from the keyword arguments of ``register_adapter``."""

    def __init__(
        self,
        name: str,
        matches: Matcher,
        blocks: BlockSpec,
        tokens: Callable[..., Tensor] | None = None,
        forward: Callable[..., Any] | None = None,
        dim: int | Callable[[nn.Module, nn.Module], int] | None = None,
        patchify: Callable[[nn.Module, Tensor], Tensor] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"name={name!r} is not accepted: use a non-empty string")
        if not (isinstance(matches, (type, tuple)) or callable(matches)):
            raise TypeError(f"matches={matches!r} is not accepted: use a class, a tuple of classes or callable(model) -> bool")
        if not (isinstance(blocks, (str, list, tuple)) or callable(blocks)):
            raise TypeError(f"blocks={blocks!r} is not accepted: use an attribute path, a list of paths or callable(model) -> blocks")
        for arg, value in (("tokens", tokens), ("forward", forward), ("patchify", patchify)):
            if value is not None and not callable(value):
                raise TypeError(f"{arg}={value!r} is not accepted: use a callable or None")
        if dim is not None and not callable(dim) and (isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1):
            raise TypeError(f"dim={dim!r} is not accepted: use a positive int, callable(model, block) -> int, or None")
        self.name = name
        self._matches = matches
        self._blocks = blocks
        self._tokens = tokens
        self._tokens_take_call = tokens is not None and _takes_call(tokens)
        self._forward = forward
        self._dim = dim
        self._patchify = patchify

    def matches(self, model: nn.Module) -> bool:
        if isinstance(self._matches, (type, tuple)):
            return isinstance(model, self._matches)
        return bool(self._matches(model))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        if callable(self._blocks):
            return list(self._blocks(model))
        paths = [self._blocks] if isinstance(self._blocks, str) else list(self._blocks)
        found: list[nn.Module] = []
        for path in paths:
            part = _get_path(model, path)
            if isinstance(part, (nn.ModuleList, nn.Sequential, list, tuple)):
                found.extend(part)
            else:
                found.append(part)
        return found

    def tokens(self, output: Any, model: nn.Module, call: ModelCall | None = None) -> Tensor:
        if self._tokens is None:
            return super().tokens(output, model, call)
        if self._tokens_take_call:
            return self._tokens(output, model, call if call is not None else ModelCall())
        return self._tokens(output, model)

    def forward(self, model: nn.Module, x: Tensor, t: Any, *args: Any, **kwargs: Any) -> Any:
        if self._forward is not None:
            return self._forward(model, x, t, *args, **kwargs)
        return super().forward(model, x, t, *args, **kwargs)

    def dim(self, model: nn.Module, block: nn.Module) -> int:
        if self._dim is None:
            return super().dim(model, block)
        return int(self._dim(model, block) if callable(self._dim) else self._dim)

    def patchify(self, model: nn.Module, x0: Tensor) -> Tensor:
        if self._patchify is None:
            return super().patchify(model, x0)
        return self._patchify(model, x0)


_REGISTRY: list[Adapter] = []


def register_adapter(
    adapter: str | Adapter,
    /,
    *,
    matches: Matcher | None = None,
    blocks: BlockSpec | None = None,
    tokens: Callable[..., Tensor] | None = None,
    forward: Callable[..., Any] | None = None,
    dim: int | Callable[[nn.Module, nn.Module], int] | None = None,
    patchify: Callable[[nn.Module, Tensor], Tensor] | None = None,
) -> Adapter:
    """Declare how SRA reads a backbone. A later registration wins over an earlier one; registering a
    name again replaces the earlier entry of that name.

    Either ``register_adapter(MyAdapter())`` with an ``Adapter`` subclass, or the declarative form::

        register_adapter("my-net", matches=MyNet, blocks="layers",
                         tokens=lambda output, model: output[0][:, model.num_registers:])

    ``tokens`` may also take a third argument, the ``ModelCall`` of the model's forward.
    """
    declared = {k: v for k, v in dict(matches=matches, blocks=blocks, tokens=tokens, forward=forward, dim=dim, patchify=patchify).items() if v is not None}
    if isinstance(adapter, Adapter):
        if declared:
            raise TypeError(f"register_adapter got an Adapter instance and keywords {sorted(declared)}: pass one or the other")
        entry = adapter
    elif isinstance(adapter, str):
        missing = {"matches", "blocks"} - set(declared)
        if missing:
            raise TypeError(f"register_adapter({adapter!r}, ...) needs {sorted(missing)}")
        entry = DeclaredAdapter(adapter, **declared)
    else:
        raise TypeError(f"register_adapter got {adapter!r}: pass an Adapter instance or a name and keywords")
    _REGISTRY[:] = [a for a in _REGISTRY if a.name != entry.name]
    _REGISTRY.append(entry)
    return entry


def registered_adapters() -> list[Adapter]:
    """Registered adapters, newest first (the order of resolution)."""
    return list(reversed(_REGISTRY))


# A list whose path names text (a caption projection, a context or token refiner) holds no image tokens.
_TEXT_PATH = ("context", "caption", "text", "txt", "prompt", "token_refiner")


def _is_block(module: nn.Module) -> bool:
    """A transformer block nests layers inside sub-layers (attention, MLP) or has a norm; a projection or
    an embedding is a flat run of layers."""
    nested = any(True for child in module.children() for _ in child.children())
    return nested or any("Norm" in type(m).__name__ for m in module.modules())


def _candidate_containers(model: nn.Module) -> tuple[list[tuple[str, int, str]], list[tuple[str, int, str]]]:
    """``(block lists, other lists)``: lists of identical modules as ``(path, count, class)``. Block lists
    are in the order the model defines them (usually the order its forward runs them), one-block lists
    included, lists nested inside a block list left out; the others (projections, embeddings, lists
    whose path names text) longest first."""
    blocks: list[tuple[str, int, str]] = []
    others: list[tuple[str, int, str]] = []
    for path, module in model.named_modules():
        if not path or not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        classes = {type(child).__name__ for child in module}
        if len(classes) != 1:
            continue
        if any(path.startswith(outer + ".") for outer, _, _ in blocks):
            continue
        row = (path, len(module), classes.pop())
        text = any(word in part for part in path.lower().split(".") for word in _TEXT_PATH)
        (others if text or not _is_block(module[0]) else blocks).append(row)
    others.sort(key=lambda row: -row[1])
    return blocks, others


def unknown_model_error(model: nn.Module) -> ValueError:
    cls = type(model).__name__
    blocks, others = _candidate_containers(model)
    if blocks or others:
        def table(rows: list[tuple[str, int, str]]) -> str:
            return "\n".join(f"  {path:<40} {count:>4} x {name}" for path, count, name in rows)

        proposed = [path for path, _, _ in blocks] or [others[0][0]]
        spec = repr(proposed[0]) if len(proposed) == 1 else repr(proposed)
        module = type(model).__module__
        where = f"    from {module} import {cls}\n" if module not in ("__main__", "builtins") else ""
        found = f"Block lists, in the order the model defines them (path, count, block class):\n{table(blocks)}\n" if blocks else ""
        if others:
            found += f"Other module lists, not proposed (projections, embeddings, text-only):\n{table(others)}\n"
        hint = (
            f"{found}"
            "Declare its block lists in the order its forward runs them (check it), then create "
            "SelfRepresentationAlignment again:\n\n"
            f"    from sra_plugin import register_adapter\n{where}"
            f"    register_adapter(\n        {cls.lower()!r},\n        matches={cls},\n        blocks={spec},\n"
            "        # image tokens (B, N, D) of a block's output: e.g. output[1] of a (text, image) tuple,\n"
            "        # output[:, k:] if its first k tokens are not image tokens (class, registers, text);\n"
            "        # tokens=lambda output, model, call: ... also sees the model's inputs (call.get('hidden_states'))\n"
            "        tokens=lambda output, model: output,\n"
            "        forward=lambda model, x, t, *args, **kwargs: model(x, t, *args, **kwargs),\n    )\n"
        )
    else:
        hint = (
            "No list of identical blocks was found in it. Declare the blocks yourself:\n"
            f"    register_adapter({cls.lower()!r}, matches={cls}, blocks=lambda model: [...], tokens=lambda output, model: output)\n"
        )
    return ValueError(f"model={cls} matches no registered adapter (registered: "
                      f"{', '.join(a.name for a in registered_adapters()) or 'none'}).\n{hint}")


def resolve_adapter(model: nn.Module, adapter: str | Adapter | None = None) -> Adapter:
    """The adapter for ``model``: the one given, the registered one with that name, or the newest match."""
    if isinstance(adapter, Adapter):
        return adapter
    if isinstance(adapter, str):
        for entry in registered_adapters():
            if entry.name == adapter:
                return entry
        names = ", ".join(a.name for a in registered_adapters())
        raise ValueError(f"adapter={adapter!r} is not registered: use one of {names}, an Adapter instance, or None")
    if adapter is not None:
        raise TypeError(f"adapter={adapter!r} is not accepted: use None, a registered name or an Adapter instance")
    for entry in registered_adapters():
        if entry.matches(model):
            return entry
    raise unknown_model_error(model)


def resolve_blocks(model: Any, adapter: str | Adapter | None = None) -> tuple[nn.Module, Adapter, list[nn.Module]]:
    """The model inside any wrappers, its adapter and its blocks (at least one), or a clear error."""
    from .wrappers import unwrap

    if not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__} is not accepted: use an nn.Module")
    inner = unwrap(model)
    adapter = resolve_adapter(inner, adapter)
    blocks = adapter.blocks(inner)
    if not blocks:
        raise ValueError(f"adapter {adapter.name!r} found no blocks in {type(inner).__name__}")
    return inner, adapter, list(blocks)
