"""REPA (Yu et al., "Representation Alignment for Generation", arXiv 2410.06940): block ``L_s`` of the
user's forward, through an MLP projector, aligned per token to the patch features of a frozen pretrained
image encoder (e.g. DINOv2) on the clean images.

Facts from the official code (github.com/sihyun-yu/REPA, ``models/sit.py`` and ``loss.py``): projector
``Linear(D, 2048) -> SiLU -> Linear(2048, 2048) -> SiLU -> Linear(2048, D_enc)``; per token
``-cos(projected, encoder token)``, averaged over tokens and samples; ``proj_coeff`` (weight) 0.5;
``encoder_depth`` 8 on SiT-XL/2 (28 blocks). Here ``loss="cosine"`` is ``1 - cos``: the same gradient,
shifted by 1. The official loop resizes and normalizes the images for its encoder (DINOv2: 224 px,
ImageNet mean/std); here ``images`` are passed to the encoder as given, so prepare them for it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn

from .config import MethodConfig, option, shown
from .heads import NotAView
from .registry import Adapter
from .student import Objective, Weight, head_name, loss_name, placed_like, resolve_objective
from .targets import EncoderTarget, encoder_reader

__all__ = ["REPA", "REPAConfig", "REPAProjector"]


@dataclass(frozen=True)
class REPAConfig(MethodConfig):
    """REPA's options as resolved: the block (1-based), the depth, the head's name, the encoder tokens'
    width, the loss's name, the projector's hidden width, the encoder's class name."""

    text = "block {layer} of {depth} -> {encoder} tokens of {encoder_dim}, loss={loss!r}, head={head!r}"

    layer: int = option()
    depth: int = option()
    head: str = option()
    encoder_dim: int = option()
    loss: str = shown()
    projector_dim: int = shown()
    encoder: str = shown()


class REPAProjector(NotAView, nn.Sequential):
    """REPA's projector: ``Linear(D, h) -> SiLU -> Linear(h, h) -> SiLU -> Linear(h, D_enc)``, h = 2048.

    Initialised as the official code leaves it (github.com/sihyun-yu/REPA, ``models/sit.py``: its
    ``initialize_weights`` runs over every ``nn.Linear`` of the model, projectors included): each
    weight xavier-uniform, each bias zero. Drawn from torch's global generator, so ``torch.manual_seed``
    fixes it."""

    def __init__(self, dim: int, target_dim: int, hidden: int = 2048) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, target_dim))
        for module in self:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)


class REPA(Objective):
    """Align block ``layer``'s tokens, through ``head``, with a frozen encoder's patch tokens on ``images``.

    Usage::

        repa = REPA(model, encoder)                   # encoder: e.g. a timm ViT with your DINOv2 weights
        pred = model(x_t, t, y)
        loss = diff_loss + repa(model, x_t, t, y, images=images)

    Defaults: ``layer=0.3`` of the depth (SiT-XL: block 8), ``head="mlp"`` (REPA's 3-layer projector,
    ``projector_dim=2048``), ``loss="cosine"`` per token, ``weight=0.5``. The encoder runs under
    ``no_grad`` in eval mode and gets no gradient; it is not part of this module's parameters or state.
    If its patch grid differs from the model's token grid, its grid is resized to the model's
    (bilinear, antialiased; ``targets.resize_grid``).
    """

    def __init__(
        self,
        model: nn.Module,
        encoder: nn.Module,
        layer: int | float = 0.3,
        head: str | nn.Module = "mlp",
        loss: str | Callable[[Tensor, Tensor], Tensor] = "cosine",
        weight: Weight = 0.5,
        encoder_tokens: Callable[[nn.Module, Tensor], Tensor] | None = None,
        encoder_dim: int | None = None,
        projector_dim: int = 2048,
        adapter: str | Adapter | None = None,
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        student, adapter, blocks, indices, weight = resolve_objective(model, adapter, weight, layer=layer)
        index = indices["layer"]
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder={type(encoder).__name__} is not accepted: use the frozen image encoder, an nn.Module")
        if encoder is student:
            raise ValueError("encoder is the model itself: REPA aligns to a separate, frozen image encoder (e.g. DINOv2)")
        _, target_dim = encoder_reader(encoder, encoder_tokens, encoder_dim)
        if isinstance(projector_dim, bool) or not isinstance(projector_dim, numbers.Integral) or projector_dim < 1:
            raise ValueError(f"projector_dim={projector_dim!r} is not accepted: use a positive int")
        object.__setattr__(self, "_encoder", encoder)  # the user's frozen encoder: not a submodule, not in the state
        object.__setattr__(self, "_encoder_read", encoder_tokens)
        config = self._config(index, len(blocks), head_name(head), target_dim, loss_name(loss), int(projector_dim),
                              type(encoder).__name__)
        self._setup(student, adapter, config, {"student": index}, head=head, dims=(adapter.dim(student, blocks[index - 1]), target_dim),
                    loss=loss, weight=weight, check_finite=check_finite)

    _config = REPAConfig
    zscore = False  # iREPA z-scores the encoder's tokens

    def build_head(self, head: str | nn.Module, dim: int, target_dim: int, student: nn.Module) -> nn.Module:
        """``"mlp"`` is REPA's projector (``REPAProjector``, hidden width ``projector_dim``)."""
        if head == "mlp":
            return placed_like(REPAProjector(dim, target_dim, self.projector_dim), student)
        return super().build_head(head, dim, target_dim, student)

    def _make_target(self) -> EncoderTarget:
        read, _ = encoder_reader(self._encoder, self._encoder_read, self.encoder_dim)
        return EncoderTarget(self._encoder, read, self.zscore)

    @property
    def encoder(self) -> nn.Module:
        return self._encoder

    @property
    def target_dim(self) -> int:
        return self.encoder_dim

    def forward(self, model: nn.Module, x_t: Tensor, t: Any, *args: Any, images: Tensor | None = None,
                sample_weight: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The weighted REPA loss of one step; ``args``/``kwargs`` are the model's conditioning."""
        return self._run(model, x_t, t, args, kwargs, sample_weight, images=images)
