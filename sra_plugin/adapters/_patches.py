"""What the built-in adapters with a convolutional patch embedder share for ``patchify``.

A patch embedder here is a module with a ``patch_size`` (an int or a tuple, as in timm's
``PatchEmbed``, U-ViT's and SD3's) and/or a ``proj`` convolution whose kernel equals its stride, or
such a convolution itself (a bare ``nn.Conv2d`` as the embedder). The model's token ``i`` is the conv
output at grid position ``i`` in row-major order (timm's ``flatten(2).transpose(1, 2)``), so the
clean latent cut into patches row by row, each patch's values ordered ``(p, q, C)``, is the target
the model's own unpatchify inverts (``"n h w p q c -> n c (h p) (w q)"``).

The target holds the channels the model predicts, which are not always the ones it takes in: a model
may stack conditioning channels onto its input (an image-to-video or inpainting model), and one
with ``learn_sigma`` predicts twice its latent's channels (the second half is a variance).
"""

from __future__ import annotations

import numbers

from torch import Tensor, nn

from ..registry import patchify_latent


def _patch_conv(embedder: nn.Module) -> nn.Conv2d | None:
    """The embedder's patch convolution (kernel == stride): the embedder itself or its ``proj``."""
    for conv in (embedder, getattr(embedder, "proj", None)):
        if isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == tuple(conv.stride):
            return conv
    return None


def patch_size_of(embedder: nn.Module, adapter: str) -> tuple[int, int]:
    """``(p, q)`` of a patch embedder: its ``patch_size``, else its patch conv's kernel."""
    size = getattr(embedder, "patch_size", None)
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        return int(size), int(size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, numbers.Integral) for s in size):
        return int(size[0]), int(size[1])
    conv = _patch_conv(embedder)
    if conv is not None:
        return int(conv.kernel_size[0]), int(conv.kernel_size[1])
    raise ValueError(
        f"adapter {adapter!r} cannot tell the patch size of {type(embedder).__name__}: it has neither an int/pair "
        "`patch_size` nor a Conv2d with kernel == stride (itself or as `proj`); override Adapter.patchify for this model"
    )


def input_channels_of(embedder: nn.Module) -> int | None:
    conv = _patch_conv(embedder)
    return None if conv is None else int(conv.in_channels)


def predicted_channels(model: nn.Module, embedder: nn.Module) -> int | None:
    """Channels of the clean latent the model predicts: ``out_channels`` (halved with ``learn_sigma``),
    else what its patch embedder takes in; None if neither is known."""
    out = getattr(model, "out_channels", None)
    if isinstance(out, numbers.Integral) and not isinstance(out, bool):
        return int(out) // 2 if getattr(model, "learn_sigma", False) else int(out)
    return input_channels_of(embedder)


def patchify_image(embedder: nn.Module, x0: Tensor, adapter: str, channels: int | None = None) -> Tensor:
    """``x0`` ``(B, C, H, W)`` as ``(B, (H/p)(W/q), p*q*C)``, row-major patches, ``(p, q, C)`` within one.
    ``channels``: the channels the model predicts (checked against ``x0``), if known."""
    if not isinstance(x0, Tensor):
        raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
    if x0.dim() != 4:
        raise ValueError(f"x0 of shape {tuple(x0.shape)} is not accepted by adapter {adapter!r}: use the clean latent (B, C, H, W)")
    taken = input_channels_of(embedder)
    want = channels if channels is not None else taken
    if want is not None and x0.shape[1] != want:
        why = "" if taken in (None, want) else ": the channels beyond the predicted ones are conditioning, not target"
        extra = "" if taken is None else f" (its patch embedder takes {taken}{why})"
        raise ValueError(
            f"x0 has {x0.shape[1]} channels but the model predicts {want}{extra}: "
            f"pass the clean latent of the predicted channels, shape (B, {want}, H, W)"
        )
    return patchify_latent(x0, patch_size_of(embedder, adapter), channels_last=True)
