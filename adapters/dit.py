"""DiT / SiT family: facebookresearch DiT, willisma SiT, the REPA/SRA SiT, LightningDiT-like models.

Facts relied on (DiT and SiT upstream ``models.py``): blocks in ``model.blocks``, each returning a
``(B, N, D)`` tensor with no extra tokens; ``forward(x, t, y)``; class labels dropped for CFG inside
the forward by ``y_embedder`` (``LabelEmbedder.token_drop``: dropped labels become the null id
``num_classes``) before ``y_embedder.embedding_table`` is applied. The teacher must see the labels
the student actually used, so the input of ``embedding_table`` is watched and handed to the teacher
(which runs in eval mode and drops nothing itself).

Variants checked against their upstream code: the REPA / SRA SiT returns ``(x, zs)`` from its
forward (only block outputs matter here, and those are tensors); LightningDiT has the same
attribute names and ``forward(x, t=None, y=None)``, but its ``use_checkpoint=True`` wraps every
block in a reentrant checkpoint (``checkpoint(block, x, c, feat_rope, use_reentrant=True)``), where
the student block's tokens carry no gradient: SRA raises a ``RuntimeError`` then, so train
LightningDiT with ``use_checkpoint=False`` or change those calls to ``use_reentrant=False``.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..registry import Adapter, ModelCall, register_adapter
from ._patches import patch_size_of, patchify_image, predicted_channels


class DiTAdapter(Adapter):
    name = "dit"

    def matches(self, model: nn.Module) -> bool:
        return (
            isinstance(getattr(model, "blocks", None), nn.ModuleList)
            and hasattr(model, "x_embedder")
            and hasattr(model, "t_embedder")
        )

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def patchify(self, model: nn.Module, x0: Tensor) -> Tensor:
        """``x0`` cut like ``unpatchify`` reads the final layer: row-major patches of
        ``x_embedder.patch_size``, ``(p, q, C)`` inside each (``"n h w p q c -> n c (h p) (w q)"``).
        With ``learn_sigma`` a token predicts ``2C`` values per pixel; the target is the ``C`` of x0.
        A model whose ``out_channels`` differ from its input's (conditioning channels stacked onto
        x_t) takes as ``x0`` the clean latent of the ``out_channels`` it predicts."""
        return patchify_image(model.x_embedder, x0, self.name, predicted_channels(model, model.x_embedder))

    def patch_dim(self, model: nn.Module) -> int:
        channels = predicted_channels(model, model.x_embedder)
        if channels is None:
            return super().patch_dim(model)
        return channels * math.prod(patch_size_of(model.x_embedder, self.name))

    def target_shape(self, model: nn.Module, x_t: Tensor, call: ModelCall) -> tuple[int, ...]:
        channels = predicted_channels(model, model.x_embedder)
        if channels is None or x_t.dim() != 4:
            return tuple(x_t.shape)
        return (x_t.shape[0], channels, *x_t.shape[2:])

    def watch(self, model: nn.Module) -> dict:
        table = getattr(getattr(model, "y_embedder", None), "embedding_table", None)
        if isinstance(table, nn.Embedding):
            return {"y": (table, lambda args, kwargs: args[0] if args else kwargs["input"])}
        return {}

    def teacher_inputs(self, model: nn.Module, args: tuple, kwargs: dict, watched: dict) -> tuple[tuple, dict]:
        if "y" not in watched:
            return args, kwargs
        if args:  # forward(x, t, y, ...): y is the first conditioning argument
            return (watched["y"], *args[1:]), kwargs
        if "y" in kwargs:
            return args, {**kwargs, "y": watched["y"]}
        return args, kwargs


register_adapter(DiTAdapter())
