"""Methods as configs: one dataclass of options per method, in the style of peft's ``LoraConfig``.

A method's config holds its options as the constructor resolved them (block numbers, the head's and the
loss's names, the recipe, ...). It is the method's saved identity (what a state dict must agree on to load:
the fields declared with ``option()``; ``shown()`` fields are only displayed) and the text of its
``repr``. The objective reads its options from it (``sra.teacher_layer``, ``ls.detach_target``).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable

__all__ = ["MethodConfig", "option", "shown"]


def option(*, key: str | None = None, show: Callable[[Any], str] | None = None, old: Any = MISSING,
           default: Any = MISSING) -> Any:
    """A saved field. ``key``: its name in the saved state (default: the field's name); ``show``: how
    ``repr`` writes it (default ``name=value``); ``old``: the value a state saved before the field
    existed had (such a state still loads)."""
    return field(default=default, metadata={"saved": True, "key": key, "show": show, "old": old})


def shown(*, show: Callable[[Any], str] | None = None, default: Any = MISSING) -> Any:
    """A field shown in ``repr`` but not saved: a state saved with another value still loads."""
    return field(default=default, metadata={"saved": False, "show": show})


@dataclass(frozen=True)
class MethodConfig:
    """Base of the methods' configs: a frozen dataclass whose fields are ``option()`` or ``shown()``."""

    def identity(self) -> dict[str, Any]:
        """The saved fields by their saved names: what a state must agree on to be loaded."""
        return {f.metadata["key"] or f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("saved")}

    def old_values(self) -> dict[str, Any]:
        """Saved name -> the value of a state written before that field existed."""
        return {f.metadata["key"] or f.name: f.metadata["old"] for f in fields(self)
                if f.metadata.get("saved") and f.metadata["old"] is not MISSING}

    text = ""
    """How ``repr`` writes the config: a ``str.format`` template over the fields (a field with ``show``
    enters as its shown text); empty: ``name=value`` for every field."""

    def describe(self) -> str:
        """The config as ``repr`` shows it."""
        values = {f.name: f.metadata["show"](v) if f.metadata.get("show") else v
                  for f in fields(self) for v in [getattr(self, f.name)]}
        return self.text.format(**values) if self.text else ", ".join(f"{k}={v!r}" for k, v in values.items())
