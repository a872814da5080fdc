"""What the built-in adapters with a convolutional patch embedder share for ``patchify``.

A patch embedder here is a module with a ``patch_size`` (an int or a tuple, as in timm's
``PatchEmbed``, U-ViT's and SD3's) and/or a ``proj`` convolution whose kernel equals its stride.
The model's token ``i`` is the conv output at grid position ``i`` in row-major order (timm's
``flatten(2).transpose(1, 2)``), so the clean latent cut into patches row by row, each patch's values
ordered ``(p, q, C)``, is the target the model's own unpatchify inverts
(``"n h w p q c -> n c (h p) (w q)"``).
"""

from __future__ import annotations

import numbers

from torch import Tensor, nn

from ..registry import patchify_latent


def patch_size_of(embedder: nn.Module, adapter: str) -> tuple[int, int]:
    """``(p, q)`` of a patch embedder: its ``patch_size``, else its ``proj`` conv's kernel."""
    size = getattr(embedder, "patch_size", None)
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        return int(size), int(size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, numbers.Integral) for s in size):
        return int(size[0]), int(size[1])
    proj = getattr(embedder, "proj", None)
    if isinstance(proj, nn.Conv2d) and tuple(proj.kernel_size) == tuple(proj.stride):
        return int(proj.kernel_size[0]), int(proj.kernel_size[1])
    raise ValueError(
        f"adapter {adapter!r} cannot tell the patch size of {type(embedder).__name__}: it has neither an int/pair "
        "`patch_size` nor a `proj` Conv2d with kernel == stride; override Adapter.patchify for this model"
    )


def patchify_image(embedder: nn.Module, x0: Tensor, adapter: str) -> Tensor:
    """``x0`` ``(B, C, H, W)`` as ``(B, (H/p)(W/q), p*q*C)``, row-major patches, ``(p, q, C)`` within one."""
    if not isinstance(x0, Tensor):
        raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
    if x0.dim() != 4:
        raise ValueError(f"x0 of shape {tuple(x0.shape)} is not accepted by adapter {adapter!r}: use the clean latent (B, C, H, W)")
    proj = getattr(embedder, "proj", None)
    if isinstance(proj, nn.Conv2d) and x0.shape[1] != proj.in_channels:
        raise ValueError(
            f"x0 has {x0.shape[1]} channels but the model's patch embedder takes {proj.in_channels}: "
            "pass the clean latent the model is trained on (shape (B, C, H, W) like x_t)"
        )
    return patchify_latent(x0, patch_size_of(embedder, adapter), channels_last=True)
