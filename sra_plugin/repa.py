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
from typing import Any, Callable

from torch import Tensor, nn

from .losses import build_loss
from .heads import NotAView
from .registry import Adapter, ModelCall
from .student import Objective, Weight, head_on_model, placed_like, resolve_objective
from .targets import EncoderTarget, encoder_reader

__all__ = ["REPA", "REPAProjector"]


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

    target_name = "encoder"

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
        loss_fn = build_loss(loss)
        _, target_dim = encoder_reader(encoder, encoder_tokens, encoder_dim)
        if isinstance(projector_dim, bool) or not isinstance(projector_dim, numbers.Integral) or projector_dim < 1:
            raise ValueError(f"projector_dim={projector_dim!r} is not accepted: use a positive int")
        dim = adapter.dim(student, blocks[index - 1])
        if head == "mlp":
            head_module = placed_like(REPAProjector(dim, target_dim, int(projector_dim)), student)
        else:
            head_module = head_on_model(head, dim, target_dim, student)

        self.adapter = adapter
        self.depth = len(blocks)
        self.taps = {"student": index}
        self.target_dim = target_dim
        self._set_objective(head, head_module, loss, loss_fn, weight, check_finite)
        object.__setattr__(self, "_encoder", encoder)  # the user's frozen encoder: not a submodule, not in the state
        object.__setattr__(self, "_encoder_read", encoder_tokens)
        self._init_student(student)

    _transient = (*Objective._transient, "_encoder_target")

    def _attach(self) -> None:
        super()._attach()
        read, _ = encoder_reader(self._encoder, self._encoder_read, self.target_dim)
        object.__setattr__(self, "_encoder_target", EncoderTarget(self._encoder, read))

    @property
    def encoder(self) -> nn.Module:
        return self._encoder

    @property
    def layer(self) -> int:
        return self.student_layer

    def _check_inputs(self, x_t: Tensor, t: Any, call: ModelCall, images: Any = None) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images={type(images).__name__} is not accepted: REPA needs images=, the batch's clean images as the encoder takes them")
        if images.dim() == 0 or x_t.dim() == 0 or images.shape[0] != x_t.shape[0]:
            raise ValueError(f"images has shape {tuple(images.shape)} but x_t {tuple(x_t.shape)}: give one image per sample")
        self._check_times(x_t.shape[0] if x_t.dim() else None, t=t)

    def _target(self, model: nn.Module, x_t: Tensor, taps: dict, watched: dict, t: Any, args: tuple, kwargs: dict,
                images: Tensor) -> Tensor:
        return self._encoder_target.tokens(images, taps["student"].shape[1], x_t)

    def forward(self, model: nn.Module, x_t: Tensor, t: Any, *args: Any, images: Tensor | None = None,
                sample_weight: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The weighted REPA loss of one step; ``args``/``kwargs`` are the model's conditioning."""
        return self._run(model, x_t, t, args, kwargs, sample_weight, images=images)

    def _identity(self) -> dict[str, Any]:
        return {"layer": self.student_layer, "depth": self.depth, "head": self.head_name, "encoder_dim": self.target_dim}

    def extra_repr(self) -> str:
        return (
            f"adapter={self.adapter.name!r}, block {self.student_layer} of {self.depth} -> {type(self._encoder).__name__} "
            f"tokens of {self.target_dim}, loss={self.loss_name!r}, head={self.head_name!r}"
        )
