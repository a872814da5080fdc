"""U-ViT (Bao et al., baofff/U-ViT): class-conditional ``UViT`` and text-to-image ``UViT`` alike.

Facts relied on (upstream ``libs/uvit.py``, ``libs/uvit_t2i.py``): blocks run ``in_blocks``, then
``mid_block``, then ``out_blocks`` (each out block also takes the matching in block's output as a
skip), so block ``k`` counts across the three in that order (``depth + 1`` blocks for an even
``depth``). Every block returns one ``(B, extras + N, D)`` tensor whose first ``model.extras``
tokens are conditioning (time and label, or time and the text context); the image tokens are the
rest. ``forward(x, timesteps, y)`` or ``forward(x, timesteps, context)``: the default call
``model(x, t, *args, **kwargs)`` fits both. Labels are dropped for classifier-free guidance in the
data pipeline, not in the model, so the teacher gets the conditioning exactly as passed.
``use_checkpoint`` checkpoints inside each block (reentrant, upstream's default), so the block's
output, which SRA reads, still carries its gradient.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..registry import Adapter, ModelCall, register_adapter
from ._patches import patchify_image


class UViTAdapter(Adapter):
    name = "uvit"

    def matches(self, model: nn.Module) -> bool:
        return (
            isinstance(getattr(model, "in_blocks", None), nn.ModuleList)
            and isinstance(getattr(model, "mid_block", None), nn.Module)
            and isinstance(getattr(model, "out_blocks", None), nn.ModuleList)
            and isinstance(getattr(model, "extras", None), int)
        )

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [*model.in_blocks, model.mid_block, *model.out_blocks]

    def tokens(self, output: Any, model: nn.Module, call: ModelCall | None = None) -> Tensor:
        return output[:, model.extras:]

    def dim(self, model: nn.Module, block: nn.Module) -> int:
        return int(model.embed_dim)

    def patchify(self, model: nn.Module, x0: Tensor) -> Tensor:
        """``x0`` in the layout of upstream ``unpatchify`` (``"B (h w) (p1 p2 C) -> B C (h p1) (w p2)"``,
        applied to the tokens after the ``extras``): row-major patches of ``patch_embed.patch_size``."""
        return patchify_image(model.patch_embed, x0, self.name)

    def forward(self, model: nn.Module, x: Tensor, t: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return model(x, t, *args, **kwargs)
        # With use_checkpoint, upstream blocks checkpoint whatever the grad mode; in the teacher's
        # no-grad pass torch then warns on every block that no input requires grad.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="None of the inputs have requires_grad=True")
            return model(x, t, *args, **kwargs)


register_adapter(UViTAdapter())
