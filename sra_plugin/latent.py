"""LatentAlignment: SRA 2 (Wang, Jiang et al., CVPR 2026, arXiv 2601.17830).

Abstract: "SRA 2 aligns the intermediate latent features of diffusion transformers with VAE features
via a lightweight projection layer, supervised by a feature alignment loss [...] without extra
representation encoders or dual-model maintenance." The VAE features are the clean latent ``x0`` the
latent-diffusion loop already has; here they are cut into the model's own patch tokens
(``Adapter.patchify``), so token ``i`` of the target holds exactly the latent values that the
model's token ``i`` predicts. No teacher pass and no EMA: the cost is the head's.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn

from .config import MethodConfig, option, shown
from .registry import Adapter
from .student import Objective, Weight, head_name, loss_name, resolve_objective
from .targets import LatentTarget

__all__ = ["LatentAlignment", "LatentConfig"]

TARGET_NORMS = (None, "sample")
TARGET_NORM_DEFAULT: str | None = None
TARGET_NORM_EPS = 1e-6


@dataclass(frozen=True)
class LatentConfig(MethodConfig):
    """SRA 2's options as resolved: the block (1-based), the depth, the head's name, the target's width
    (``C * p * p``) and normalisation, the loss's name."""

    text = "block {layer} of {depth} -> latent patches of {target_dim}, loss={loss!r}, head={head!r}, target_norm={target_norm!r}"

    layer: int = option()
    depth: int = option()
    head: str = option()
    target_dim: int = option()
    target_norm: str | None = option()
    loss: str = shown()


class LatentAlignment(Objective):
    """Align block ``layer``'s tokens, through ``head``, with the clean latent ``x0`` in patch tokens.

    Usage, in an existing latent-diffusion loop::

        align = LatentAlignment(model)
        opt = torch.optim.AdamW([*model.parameters(), *align.parameters()])
        pred = model(x_t, t, y)                              # the block's tokens are kept by a hook
        loss = diff_loss + align(model, x_t, x0, t, y=y)     # x0: this batch's clean latent

    Defaults (docs/methods/sra2.md says why): ``layer=0.3`` of the depth (SiT-XL/2: block 8), the MLP head,
    smooth-L1 with beta 0.05, weight 0.2. ``weight`` may be a number, a 0-dim tensor or a
    schedule ``step -> weight`` (``sra_plugin.schedules``); ``step`` counts calls with gradients
    enabled, as SRA's does when ``update_teacher()`` is not called (set ``align.step`` yourself to count
    optimizer steps under gradient accumulation).
    ``target_dim`` (``C * p * p``) comes from the adapter (``Adapter.patch_dim``) unless given. ``x0`` is the
    clean latent of what the model predicts (``Adapter.target_shape``): of its output channels where the
    input stacks conditioning channels (image-to-video, fill), of the generated image's tokens where an
    edit model appends reference-image tokens.
    ``target_norm="sample"`` z-scores each sample's target (its patchified latent) before the loss, so
    the term's size does not follow the latent's scale (video VAEs give large latents); None aligns
    with the raw values.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: int | float = 0.3,
        head: str | nn.Module = "mlp",
        loss: str | Callable[[Tensor, Tensor], Tensor] = "smooth_l1",
        weight: Weight = 0.2,
        adapter: str | Adapter | None = None,
        target_dim: int | None = None,
        check_finite: bool = False,
        target_norm: str | None = TARGET_NORM_DEFAULT,
    ) -> None:
        super().__init__()
        if target_norm not in TARGET_NORMS:
            raise ValueError(
                f"target_norm={target_norm!r} is not accepted: use 'sample' (z-score each sample's patchified latent) "
                "or None (the raw latent values)"
            )
        student, adapter, blocks, indices, weight = resolve_objective(model, adapter, weight, layer=layer)
        index = indices["layer"]
        if target_dim is None:
            target_dim = adapter.patch_dim(student)
        elif isinstance(target_dim, bool) or not isinstance(target_dim, numbers.Integral) or target_dim < 1:
            raise ValueError(f"target_dim={target_dim!r} is not accepted: use a positive int, C * p * p of the latent patches")
        config = LatentConfig(index, len(blocks), head_name(head), int(target_dim), target_norm, loss_name(loss))
        self._setup(student, adapter, config, {"student": index}, head=head, dims=(adapter.dim(student, blocks[index - 1]), int(target_dim)),
                    loss=loss, weight=weight, check_finite=check_finite)

    def _make_target(self) -> LatentTarget:
        return LatentTarget(self.adapter, self._student, self.target_dim, self.target_norm, TARGET_NORM_EPS)

    def target(self, x0: Tensor) -> Tensor:
        """The clean latent as the model's patch tokens, ``(B, N_img, C * p * p)``; with
        ``target_norm="sample"`` each sample's values z-scored (mean 0, std 1 over all its values)."""
        return self._source.patches(x0)

    def forward(self, model: nn.Module, x_t: Tensor, x0: Tensor, t: Any, *args: Any,
                sample_weight: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The weighted SRA 2 loss for one step. ``args``/``kwargs`` are the model's conditioning, as
        for ``model(x_t, t, ...)``; ``sample_weight`` (``(B,)``) weighs each sample's loss."""
        return self._run(model, x_t, t, args, kwargs, sample_weight, x0=x0)
