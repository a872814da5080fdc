"""Optional adapter protocols: what one method needs from a backbone beyond ``Adapter``'s core
(``matches``, ``blocks``, ``tokens``, ``forward``, ``dim``). An adapter implements one only if a method
it serves needs it; the methods check with ``isinstance(adapter, Protocol)``.

``Adapter`` itself still carries ``patchify`` and ``teacher_inputs`` with defaults (``patchify``
raises a clear error, ``teacher_inputs`` passes the conditioning through), so adapters written for
0.2 keep working; new method-specific needs come as protocols here.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["Patchifies", "ProvidesTeacherInputs", "EncodesImages"]


@runtime_checkable
class Patchifies(Protocol):
    """SRA 2 (``LatentAlignment``): the clean latent in the model's token layout, ``(B, N_img, C*p*p)``."""

    def patchify(self, model: nn.Module, x0: Tensor) -> Tensor: ...


@runtime_checkable
class ProvidesTeacherInputs(Protocol):
    """SRA: the teacher's conditioning, given what the student's forward used (labels dropped for CFG)."""

    def watch(self, model: nn.Module) -> dict[str, Any]: ...

    def teacher_inputs(self, model: nn.Module, args: tuple, kwargs: dict, watched: dict[str, Any]) -> tuple[tuple, dict]: ...


@runtime_checkable
class EncodesImages(Protocol):
    """REPA: an encoder's patch tokens for a batch of images, ``(B, N_enc, D_enc)``, without its class or
    register tokens, and their width."""

    def encoder_tokens(self, model: nn.Module, images: Tensor) -> Tensor: ...

    def encoder_dim(self, model: nn.Module) -> int: ...
