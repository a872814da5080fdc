"""Call matching: may the features captured from a forward stand for this call, or must the student run
again? A comparison of the captured call with this one (by argument name, the same objects or equal
values), of the adapter state and grad mode then and now, and of the record's snapshots, which tell
whether an input or a tapped output was changed in place since.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from .module_state import adapter_state
from .record import Captured, TapRecord
from .registry import ModelCall

__all__ = ["Decision", "CallSignature", "mismatch"]


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def _same(a: Any, b: Any) -> bool:
    """The same object, or equal values (tensors: same shape, dtype, device and elements)."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor) and isinstance(b, Tensor)
            and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # objects without a usable == are the same only if identical
        return False


@dataclass
class Decision:
    """``StudentCapture.take``'s answer: the captured forward to reuse, or why the student must run again."""

    captured: TapRecord | None
    cause: str = ""  # a short key, one warning per key
    reason: str = ""  # the sentence for the warning


class CallSignature:
    """The arguments of calls of one model's forward, by name, read through its signature where it has one
    (else ``"argument i"`` for positional ones and the keywords as given)."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        try:
            self.signature: inspect.Signature | None = inspect.signature(forward)
        except (TypeError, ValueError):
            self.signature = None

    def arguments(self, call: ModelCall, defaults: bool = True) -> dict[str, Any]:
        """``call``'s arguments by name. ``defaults``: with the forward's defaults filled in and a ``**kwargs``
        catch-all as one entry (what two calls are compared on); otherwise only the arguments ``call`` passed,
        a ``**kwargs`` catch-all spread into its names (what tells that a call left one out)."""
        if self.signature is not None:
            try:
                bound = self.signature.bind_partial(*call.args, **call.kwargs)
            except TypeError:
                bound = None
            if bound is not None:
                if defaults:
                    bound.apply_defaults()
                    return dict(bound.arguments)
                given: dict[str, Any] = {}
                for name, value in bound.arguments.items():
                    if self.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                        given.update(value)
                    else:
                        given[name] = value
                return given
        return {**{f"argument {i}": v for i, v in enumerate(call.args)}, **call.kwargs}

    def is_default(self, name: str, value: Any) -> bool:
        """``None``, or the value the forward's signature gives ``name`` when it is left out."""
        if value is None:
            return True
        parameter = self.signature.parameters.get(name) if self.signature is not None else None
        return parameter is not None and parameter.default is not inspect.Parameter.empty and _same(value, parameter.default)

    def check_nothing_missing(self, seen: ModelCall, mine: ModelCall, ignored: set[str]) -> None:
        """Raise ``ValueError`` if the training forward got an argument (not ``None`` or its default) that
        this call lacks, while every argument this call gives equals the forward's: the same step with conditioning
        left out of the objective's call (Flux's ``guidance=``, labels, ``joint_attention_kwargs``). Re-running
        would crash inside the model or, worse, run the teacher without that conditioning."""
        had, given = self.arguments(seen, defaults=False), self.arguments(mine, defaults=False)
        missing = [n for n, v in had.items() if n not in given and n not in ignored and not self.is_default(n, v)]
        if not missing or any(n not in had or not _same(had[n], v) for n, v in given.items() if n not in ignored):
            return
        names = ", ".join(repr(n) for n in missing)
        raise ValueError(
            f"this call lacks {names}, which the model's training forward on this x_t got "
            f"({', '.join(f'{n}={_describe(had[n])}' for n in missing)}): pass "
            f"{', '.join(f'{n}=...' for n in missing)} to this call as well (as keyword or in the same position "
            "as in the forward), so that the teacher and any re-run see the same conditioning"
        )


def mismatch(forward: Captured, call: ModelCall, blocks: Iterable[int], signature: CallSignature,
             ignored: set[str], model: nn.Module) -> Decision | None:
    """Why the captured ``forward`` may not stand for ``call`` (tapped ``blocks``, 1-based), as a ``Decision``
    to re-run; ``None`` if it may. Reads and changes nothing of the record."""
    if torch.is_grad_enabled() and not forward.grad:
        return Decision(
            None, "no-grad",
            "the captured forward ran with gradients disabled (a call under torch.no_grad(), or its re-run), and "
            "this call needs gradients; its tokens would train nothing",
        )
    if forward.adapters is not None and forward.adapters != adapter_state(model):
        return Decision(
            None, "adapter-state",
            "the last training forward ran with another adapter state than the model has now (peft's "
            "disable_adapter(), set_adapter or a LoRA scale, e.g. a reference forward of the base model in "
            "between); its tokens are not the trained model's",
        )
    mine = signature.arguments(call)
    seen = signature.arguments(forward.call)
    for name in dict.fromkeys([*seen, *mine]):
        if name in ignored:
            continue
        if name not in seen or name not in mine or not _same(seen[name], mine[name]):
            return Decision(
                None, f"argument:{name}",
                f"the last training forward ran with a different {name!r} than this call (another time, "
                "input or conditioning, e.g. an extra forward in between); its features are not used",
            )
    changed = [v for v in forward.inputs if v.changed()]
    stale = [b for b in blocks if (snapshot := forward.tap_snapshots.get(b)) is not None and snapshot.changed()]
    if changed or stale:
        what = "an input of the forward" if changed else "the block's output"
        return Decision(None, "in-place", f"{what} was changed in place after the forward, so the captured features are stale")
    return None
