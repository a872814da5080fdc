"""timm ``VisionTransformer`` (and subclasses) used as a denoiser backbone.

Facts relied on (timm >= 0.9, checked on 1.0.31 ``timm/models/vision_transformer.py``): blocks in
``model.blocks`` (an ``nn.Sequential``, run one by one, also under ``set_grad_checkpointing()``),
each returning one ``(B, num_prefix_tokens + N, D)`` tensor whose first ``model.num_prefix_tokens``
tokens are the class and register tokens; the image tokens are the rest. Width ``model.embed_dim``.

A plain ``VisionTransformer`` has ``forward(x)`` and no notion of time: it is called as
``model(x, *args, **kwargs)`` and ``t`` / ``s`` are not passed (a noise-unconditional denoiser).
A subclass that overrides ``forward`` (to take the time, e.g. ``forward(x, t, y)``) is called as
``model(x, t, *args, **kwargs)``.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn

from ..registry import Adapter, ModelCall, register_adapter
from ._patches import patchify_image


def _vit_class() -> type | None:
    module = sys.modules.get("timm.models.vision_transformer")  # a timm model exists only if timm is imported
    return getattr(module, "VisionTransformer", None)


class TimmViTAdapter(Adapter):
    name = "timm-vit"

    def matches(self, model: nn.Module) -> bool:
        cls = _vit_class()
        return cls is not None and isinstance(model, cls)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def tokens(self, output: Any, model: nn.Module, call: ModelCall | None = None) -> Tensor:
        return output[:, model.num_prefix_tokens:]

    def patchify(self, model: nn.Module, x0: Tensor) -> Tensor:
        """timm has no unpatchify, so the layout is defined by the patch embedding: image token ``i``
        (after the ``num_prefix_tokens``) is ``patch_embed.proj``'s output at grid position ``i``,
        row-major, and its target is that patch of ``x0`` with values ordered ``(p, q, C)``, the
        DiT/SiT/U-ViT layout. A decoder of your own should unpatchify with
        ``"b (h w) (p q c) -> b c (h p) (w q)"`` so that target and prediction line up."""
        return patchify_image(model.patch_embed, x0, self.name)

    def dim(self, model: nn.Module, block: nn.Module) -> int:
        return int(model.embed_dim)

    def encoder_tokens(self, model: nn.Module, images: Tensor) -> Tensor:
        """A timm ViT as REPA's frozen encoder: ``forward_features`` (the final norm included), without
        the ``num_prefix_tokens`` class and register tokens (``sra_plugin.protocols.EncodesImages``)."""
        return model.forward_features(images)[:, model.num_prefix_tokens:]

    def encoder_dim(self, model: nn.Module) -> int:
        return int(model.num_features)

    def forward(self, model: nn.Module, x: Tensor, t: Any, *args: Any, **kwargs: Any) -> Any:
        if type(model).forward is _vit_class().forward:  # timm's own forward(x): no time input
            return model(x, *args, **kwargs)
        return model(x, t, *args, **kwargs)


register_adapter(TimmViTAdapter())
