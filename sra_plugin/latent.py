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
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .losses import build_loss
from .registry import Adapter, ModelCall
from .student import Objective, Weight, head_on_model, resolve_objective

__all__ = ["LatentAlignment"]

TARGET_NORMS = (None, "sample")
TARGET_NORM_DEFAULT: str | None = None
TARGET_NORM_EPS = 1e-6


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
        loss_fn = build_loss(loss)
        if target_dim is None:
            target_dim = adapter.patch_dim(student)
        elif isinstance(target_dim, bool) or not isinstance(target_dim, numbers.Integral) or target_dim < 1:
            raise ValueError(f"target_dim={target_dim!r} is not accepted: use a positive int, C * p * p of the latent patches")
        dim = adapter.dim(student, blocks[index - 1])
        head_module = head_on_model(head, dim, int(target_dim), student)

        self.adapter = adapter
        self.depth = len(blocks)
        self.taps = {"student": index}
        self.target_dim = int(target_dim)
        self.target_norm = target_norm
        self._set_objective(head, head_module, loss, loss_fn, weight, check_finite)
        self._init_student(student)

    @property
    def layer(self) -> int:
        """The aligned block, 1-based."""
        return self.student_layer

    def target(self, x0: Tensor) -> Tensor:
        """The clean latent as the model's patch tokens, ``(B, N_img, C * p * p)``; with
        ``target_norm="sample"`` each sample's values z-scored (mean 0, std 1 over all its values)."""
        patches = self.adapter.patchify(self._student, x0)
        if self.target_norm == "sample":
            flat = patches.float().flatten(1)
            mean = flat.mean(1).view(-1, *[1] * (patches.dim() - 1))
            std = flat.std(1).view(-1, *[1] * (patches.dim() - 1))
            patches = ((patches.float() - mean) / (std + TARGET_NORM_EPS)).to(patches.dtype)
        return patches

    def _check_inputs(self, x_t: Tensor, t: Any, call: ModelCall, x0: Any = None) -> None:
        if not isinstance(x0, Tensor):
            raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
        expected = tuple(self.adapter.target_shape(self._student, x_t, call))
        if tuple(x0.shape) != expected:
            same = "" if expected == tuple(x_t.shape) else (
                f", not x_t's {tuple(x_t.shape)}: the model predicts only the noisy latent's channels/tokens, "
                "not the conditioning channels or reference tokens stacked onto its input")
            raise ValueError(
                f"x0 has shape {tuple(x0.shape)}, but {type(self._student).__name__} on this x_t wants the clean latent "
                f"of shape {expected}{same}: pass the clean latent of this batch (the one x_t was made from), "
                "in the layout the model predicts"
            )
        self._check_times(x_t.shape[0] if x_t.dim() else None, t=t)

    def _target(self, model: nn.Module, x_t: Tensor, taps: dict, watched: dict, t: Any, args: tuple, kwargs: dict, x0: Tensor) -> Tensor:
        tokens = taps["student"]
        with torch.no_grad():
            target = self.target(x0.detach())
        if target.dim() != 3 or target.shape[:2] != tokens.shape[:2] or target.shape[-1] != self.target_dim:
            raise ValueError(
                f"patchified x0 has shape {tuple(target.shape)} but block {self.student_layer} gives tokens "
                f"{tuple(tokens.shape)} and the head outputs {self.target_dim} values per token: the adapter's "
                "patchify does not fit this model (or pass target_dim=)"
            )
        return target

    def _check_finite(self, student: Tensor, target: Tensor | None) -> None:
        if not bool(torch.isfinite(student).all()):
            raise FloatingPointError(f"non-finite student features at block {self.student_layer}")

    def forward(self, model: nn.Module, x_t: Tensor, x0: Tensor, t: Any, *args: Any,
                sample_weight: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The weighted SRA 2 loss for one step. ``args``/``kwargs`` are the model's conditioning, as
        for ``model(x_t, t, ...)``; ``sample_weight`` (``(B,)``) weighs each sample's loss."""
        return self._run(model, x_t, t, args, kwargs, sample_weight, x0=x0)

    def _identity(self) -> dict[str, Any]:
        return {"layer": self.student_layer, "depth": self.depth, "head": self.head_name, "target_dim": self.target_dim,
                "target_norm": self.target_norm}

    def extra_repr(self) -> str:
        return (
            f"adapter={self.adapter.name!r}, block {self.student_layer} of {self.depth} -> latent patches "
            f"of {self.target_dim}, loss={self.loss_name!r}, head={self.head_name!r}, target_norm={self.target_norm!r}"
        )
