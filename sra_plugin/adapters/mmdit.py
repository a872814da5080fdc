"""MMDiT in the style of the Stable Diffusion 3 reference code (Stability-AI ``mmditx.py``).

Facts relied on: blocks in ``model.joint_blocks``; each ``JointBlock`` is called as
``block(context, x, c=c_mod)`` and returns ``(context, x)``, with ``context = None`` from the last
block (its context half is ``pre_only``). Register tokens, if any, are prepended to the context
stream, so the image stream ``x`` (the second element) holds exactly the image tokens.
``forward(x, t, y=None, context=None)`` with ``t = sigma * 1000``; nothing is dropped inside the
model, so the teacher gets the conditioning exactly as passed.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..registry import Adapter, ModelCall, register_adapter
from ._patches import patchify_image


class MMDiTAdapter(Adapter):
    name = "mmdit"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(getattr(model, "joint_blocks", None), nn.ModuleList) and hasattr(model, "x_embedder")

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.joint_blocks)

    def tokens(self, output: Any, model: nn.Module, call: ModelCall | None = None) -> Tensor:
        return output[1]

    def patchify(self, model: nn.Module, x0: Tensor) -> Tensor:
        """``x0`` in the layout ``unpatchify(x, hw)`` reads (``"n h w p q c -> n c (h p) (w q)"``): row-major
        patches of ``x_embedder``'s patch size over the input's own ``(H, W)`` (any aspect ratio)."""
        return patchify_image(model.x_embedder, x0, self.name)

    def dim(self, model: nn.Module, block: nn.Module) -> int:
        qkv = getattr(getattr(getattr(block, "x_block", None), "attn", None), "qkv", None)
        return int(qkv.in_features) if isinstance(qkv, nn.Linear) else super().dim(model, block)


register_adapter(MMDiTAdapter())
