"""Optional adapter protocols: what one method needs from a backbone beyond ``Adapter``'s core
(``matches``, ``blocks``, ``tokens``, ``forward``, ``dim``). An adapter implements one only if a method
it serves needs it; the methods check with ``isinstance(adapter, Protocol)``.

``Adapter`` itself still carries ``patchify`` and ``teacher_inputs`` with defaults (``patchify``
raises a clear error, ``teacher_inputs`` passes the conditioning through), so adapters written for
0.2 keep working; new method-specific needs come as protocols here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from torch import Tensor, nn

__all__ = ["EncodesImages", "RunsTokenGroups", "GroupPasses", "RunsPerTokenTime", "TokenPass"]


@runtime_checkable
class EncodesImages(Protocol):
    """REPA: an encoder's patch tokens for a batch of images, ``(B, N_enc, D_enc)``, without its class or
    register tokens, and their width."""

    def encoder_tokens(self, model: nn.Module, images: Tensor) -> Tensor: ...

    def encoder_dim(self, model: nn.Module) -> int: ...


@dataclass
class GroupPasses:
    """What ``RunsTokenGroups.group_forward`` returns, one entry per group in the order given.

    ``outputs``: each group's output tokens ``(B, n_g, P)`` (the final layer's, before unpatchify), or None
    when the passes stopped after the deepest tap. ``taps``: block (1-based) -> each group's tokens of that
    block ``(B, n_g, D)``. ``args``/``kwargs``: the conditioning as the passes used it (class labels after
    the model's own dropout for classifier-free guidance), for a teacher that should see what the student saw.
    """

    outputs: list[Tensor] | None
    taps: dict[int, list[Tensor]]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@runtime_checkable
class RunsTokenGroups(Protocol):
    """SRA-DTS (``SRADTS``): the model run once per token group, each group on its own tokens only at its
    own time, equal to one pass with attention separated between groups and per-token time.

    ``group_forward``: ``inputs[g]`` is a full model input (the noisy sample at group g's time), ``times[g]``
    that time per sample ``(B,)`` (the linear path's t in [0, 1], 1 = noise; the adapter converts it to the
    model's own convention), ``args``/``kwargs`` the model's conditioning, ``token_index[g]`` the positions ``(B, n_g)`` of group g's tokens; the
    passes gather those tokens after the patch embedding and positions, run the blocks up to the deepest of
    ``taps`` (or all of them and the per-token output layer when ``output``), and draw any per-step
    randomness of the forward (label dropout) once for all groups. ``unpatchify``: output tokens in the
    model's token order ``(B, T, P)`` -> the model's output layout (``x``: the model input they came from,
    whose grid a family may need). ``num_tokens``: tokens of an input.
    ``group_support``: None if this model can run so, else the reason it cannot.
    """

    def num_tokens(self, model: nn.Module, x: Tensor) -> int: ...

    def group_support(self, model: nn.Module) -> str | None: ...

    def group_forward(self, model: nn.Module, inputs: Sequence[Tensor], times: Sequence[Tensor],
                      token_index: Sequence[Tensor], args: tuple, kwargs: dict, taps: Sequence[int],
                      output: bool) -> GroupPasses: ...

    def unpatchify(self, model: nn.Module, tokens: Tensor, x: Tensor | None = None) -> Tensor: ...


@dataclass
class TokenPass:
    """What ``RunsPerTokenTime.per_token_forward`` returns.

    ``output``: the model's prediction in its own output layout (what its forward returns, e.g.
    ``(B, C, H, W)``), or None when the pass stopped after the deepest tap. ``taps``: block (1-based) ->
    that block's image tokens ``(B, N, D)`` in the model's token order. ``args``/``kwargs``: the
    conditioning as the pass used it (class labels after the model's own dropout for classifier-free
    guidance), for a teacher that should see what the student saw.
    """

    output: Tensor | None
    taps: dict[int, Tensor]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@runtime_checkable
class RunsPerTokenTime(Protocol):
    """Per-token time in one pass (Self-Flow style; ``SRADTS(separate=False)``): every image token has its
    own time, all tokens attend to each other, the timestep embedding and the adaLN modulation act per token.

    ``per_token_support``: None if this model can run so, else the reason it cannot (naming the family).
    ``num_tokens``: image tokens of an input ``x`` (the model's input layout). ``token_values``: per-token
    values ``(B, N)`` laid out like ``x`` (broadcastable to it): every input element gets the value of the
    token that reads it, so a per-token noisy input is ``(1 - m) * x0 + m * noise`` with
    ``m = token_values(model, t, x0)``. ``per_token_forward``: one pass of ``model`` on ``x`` with times
    ``(B, N)`` in [0, 1] (1 = noise; the adapter converts to the model's own timestep convention), all
    blocks and the output layer when ``output``, else only up to the deepest of ``taps``. The model's
    source is never edited: modules whose forward needs per-token conditioning have it swapped on the
    instance for the duration of the pass and restored after it (also on an exception). ``caller``: a
    wrapper of ``model`` (DDP) to call instead of ``model``, whose forward runs ``model``'s.
    """

    def per_token_support(self, model: nn.Module) -> str | None: ...

    def num_tokens(self, model: nn.Module, x: Tensor) -> int: ...

    def token_values(self, model: nn.Module, values: Tensor, x: Tensor) -> Tensor: ...

    def per_token_forward(self, model: nn.Module, x: Tensor, times: Tensor, args: tuple, kwargs: dict,
                          taps: Sequence[int], output: bool, caller: nn.Module | None = None) -> TokenPass: ...
