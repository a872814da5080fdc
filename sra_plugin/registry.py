"""Adapter registry: how to find a backbone's blocks, read its tokens and call it.

Backbone knowledge is data declared here by ``register_adapter`` (the built-in declarations live in
``sra_plugin.adapters``); nothing else in the package knows a model by name. Resolution walks the
registry from the newest registration to the oldest, so a later registration wins.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Sequence, Union

from torch import Tensor, nn

__all__ = ["Adapter", "register_adapter", "resolve_adapter", "registered_adapters"]


class Adapter:
    """How SRA talks to one backbone family. Subclass it for cases the declarative form cannot say.

    Required: ``matches``, ``blocks``. Optional: ``tokens`` (default: the block's output tensor, or
    the first element of a tuple output), ``forward`` (how to call the model),
    ``dim`` (feature width of a block's tokens), ``sample_input`` (which argument of a forward call
    is the noisy input), ``watch`` and ``teacher_inputs`` (conditioning the model changes inside its
    own forward, such as labels dropped for classifier-free guidance).
    """

    name: str = "adapter"

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks in execution order; block ``k`` (1-based) is ``blocks(model)[k - 1]``."""
        raise NotImplementedError

    def tokens(self, output: Any, model: nn.Module) -> Tensor:
        """Image tokens ``(B, N, D)`` from a block's output."""
        return output if isinstance(output, Tensor) else output[0]

    def forward(self, model: nn.Module, x: Tensor, t: Any, *args: Any, **kwargs: Any) -> Any:
        return model(x, t, *args, **kwargs)

    def dim(self, model: nn.Module, block: nn.Module) -> int:
        """Width ``D`` of the tokens that ``block`` produces."""
        for module in block.modules():
            if isinstance(module, nn.LayerNorm):
                return int(module.normalized_shape[-1])
        for owner in (block, model, getattr(model, "config", None)):
            for attr in ("hidden_size", "embed_dim", "inner_dim", "dim"):
                value = getattr(owner, attr, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
        raise ValueError(
            f"adapter {self.name!r} cannot tell the token width of block {type(block).__name__}: "
            "declare it, e.g. register_adapter(..., dim=768) or override Adapter.dim"
        )

    def sample_input(self, args: tuple, kwargs: dict) -> Tensor | None:
        """The noisy input ``x`` in a call ``model(*args, **kwargs)``: the first positional tensor."""
        if args and isinstance(args[0], Tensor):
            return args[0]
        return next((v for v in kwargs.values() if isinstance(v, Tensor)), None)

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
        tokens: Callable[[Any, nn.Module], Tensor] | None = None,
        forward: Callable[..., Any] | None = None,
        dim: int | Callable[[nn.Module, nn.Module], int] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"name={name!r} is not accepted: use a non-empty string")
        if not (isinstance(matches, (type, tuple)) or callable(matches)):
            raise TypeError(f"matches={matches!r} is not accepted: use a class, a tuple of classes or callable(model) -> bool")
        if not (isinstance(blocks, (str, list, tuple)) or callable(blocks)):
            raise TypeError(f"blocks={blocks!r} is not accepted: use an attribute path, a list of paths or callable(model) -> blocks")
        for arg, value in (("tokens", tokens), ("forward", forward)):
            if value is not None and not callable(value):
                raise TypeError(f"{arg}={value!r} is not accepted: use a callable or None")
        self.name = name
        self._matches = matches
        self._blocks = blocks
        self._tokens = tokens
        self._forward = forward
        self._dim = dim

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

    def tokens(self, output: Any, model: nn.Module) -> Tensor:
        if self._tokens is not None:
            return self._tokens(output, model)
        return super().tokens(output, model)

    def forward(self, model: nn.Module, x: Tensor, t: Any, *args: Any, **kwargs: Any) -> Any:
        if self._forward is not None:
            return self._forward(model, x, t, *args, **kwargs)
        return super().forward(model, x, t, *args, **kwargs)

    def dim(self, model: nn.Module, block: nn.Module) -> int:
        if self._dim is None:
            return super().dim(model, block)
        return int(self._dim(model, block) if callable(self._dim) else self._dim)


_REGISTRY: list[Adapter] = []


def register_adapter(adapter: str | Adapter, /, **declaration: Any) -> Adapter:
    """Declare how SRA reads a backbone. A later registration wins over an earlier one.

    Either ``register_adapter(MyAdapter())`` with an ``Adapter`` subclass, or the declarative form::

        register_adapter("my-net", matches=MyNet, blocks="layers",
                         tokens=lambda output, model: output[0][:, model.num_registers:])
    """
    if isinstance(adapter, Adapter):
        if declaration:
            raise TypeError(f"register_adapter got an Adapter instance and keywords {sorted(declaration)}: pass one or the other")
        entry = adapter
    elif isinstance(adapter, str):
        unknown = set(declaration) - {"matches", "blocks", "tokens", "forward", "dim"}
        if unknown:
            raise TypeError(f"register_adapter got unknown keywords {sorted(unknown)}: accepted are matches, blocks, tokens, forward, dim")
        missing = {"matches", "blocks"} - set(declaration)
        if missing:
            raise TypeError(f"register_adapter({adapter!r}, ...) needs {sorted(missing)}")
        entry = DeclaredAdapter(adapter, **declaration)
    else:
        raise TypeError(f"register_adapter got {adapter!r}: pass an Adapter instance or a name and keywords")
    _REGISTRY.append(entry)
    return entry


def registered_adapters() -> list[Adapter]:
    """Registered adapters, newest first (the order of resolution)."""
    return list(reversed(_REGISTRY))


def _candidate_containers(model: nn.Module) -> list[tuple[str, int, str]]:
    found = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2:
            classes = {type(child).__name__ for child in module}
            if len(classes) == 1:
                found.append((path, len(module), classes.pop(), any(True for _ in module[0].children())))
    # Blocks are composite modules; a list of bare layers (projections, embeddings) ranks after them.
    return [row[:3] for row in sorted(found, key=lambda row: (not row[3], -row[1]))]


def unknown_model_error(model: nn.Module) -> ValueError:
    cls = type(model).__name__
    rows = _candidate_containers(model)
    if rows:
        table = "\n".join(f"  {path:<40} {count:>4} x {name}" for path, count, name in rows)
        path = rows[0][0]
        module = type(model).__module__
        where = f"    from {module} import {cls}\n" if module not in ("__main__", "builtins") else ""
        hint = (
            f"Candidate block containers (path, count, block class):\n{table}\n"
            "Declare the most likely one, then create SelfRepresentationAlignment again:\n\n"
            f"    from sra_plugin import register_adapter\n{where}"
            f"    register_adapter(\n        {cls.lower()!r},\n        matches={cls},\n        blocks={path!r},\n"
            "        # image tokens (B, N, D) of a block's output: e.g. output[0] if it is a tuple,\n"
            "        # output[:, k:] if its first k tokens are not image tokens (class, registers, text)\n"
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
