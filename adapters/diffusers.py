"""diffusers transformers: ``SD3Transformer2DModel``, ``FluxTransformer2DModel``,
``DiTTransformer2DModel``, ``PixArtTransformer2DModel`` (optional extra ``sra-plugin[diffusers]``).

Facts relied on, checked against the diffusers 0.42.1 sources (``models/transformers/``) and, for
Flux's older single blocks, against the pre-0.35 ``transformer_flux.py``:

- Every model is called with the library's own keywords: ``model(hidden_states=x, timestep=t,
  **conditioning)``. Users pass the conditioning by keyword, e.g.
  ``sra(model, x_t, x_s, t, s, encoder_hidden_states=..., pooled_projections=...)``, with ``t`` and
  ``s`` in the model's own convention: SD3 ``sigma * 1000``; Flux ``sigma`` in [0, 1] (the model
  multiplies by 1000 itself); DiT and PixArt DDPM steps 0..999.
- SD3: ``transformer_blocks``, each returning ``(encoder_hidden_states, hidden_states)``; the last
  block (``context_pre_only``) returns ``None`` for the first. A ControlNet residual is added after
  the block, so it is not part of the block's tokens.
- Flux: ``transformer_blocks`` (double stream) then ``single_transformer_blocks``, numbered
  consecutively. Since 0.35 every block returns ``(encoder_hidden_states, hidden_states)``. Before,
  single blocks took and returned one ``[text; image]`` tensor; its image tokens are the last
  ``N`` tokens, ``N`` being the number of image tokens of the model's input ``hidden_states``
  ``(B, N, C)`` (recorded on each call).
- DiT and PixArt: ``transformer_blocks`` of ``BasicTransformerBlock``, each returning one
  ``(B, N, D)`` tensor, no extra tokens.

What the teacher sees on diffusers DiT: its class labels are dropped for classifier-free guidance
inside **every block**: each block's ``norm1.emb.class_embedder`` is a ``LabelEmbedding`` with
``dropout_prob = 0.1`` (fixed by ``AdaLayerNormZero``, not configurable) that, in training mode,
replaces each label by the null id ``num_classes`` independently per block and per call (the final
layer re-embeds through block 0's embedder, dropping again). So the student's block ``k`` sees a
label with probability 0.9, independently of the other blocks, and no single set of "labels the
student used" exists. The teacher runs in eval mode, where nothing is dropped: it sees the labels
exactly as passed, in every block. To give both the same conditioning, drop labels in the data
pipeline (set them to ``num_classes``) and switch the in-block dropout off::

    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..registry import Adapter, ModelCall, register_adapter


def _is_diffusers(model: nn.Module, class_name: str) -> bool:
    # By class name and module, so that resolving any model never imports diffusers.
    return any(c.__name__ == class_name and c.__module__.startswith("diffusers.") for c in type(model).__mro__)


class DiffusersAdapter(Adapter):
    """Shared by the diffusers models: keyword calls, ``transformer_blocks``, width ``inner_dim``."""

    class_name = ""

    def matches(self, model: nn.Module) -> bool:
        return _is_diffusers(model, self.class_name)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.transformer_blocks)

    def dim(self, model: nn.Module, block: nn.Module) -> int:
        return int(model.inner_dim)

    def forward(self, model: nn.Module, x: Tensor, t: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError(
                f"{type(model).__name__} takes its conditioning by keyword: got {len(args)} positional "
                "argument(s) after t, s; pass them as e.g. encoder_hidden_states=..., pooled_projections=..."
            )
        for key in ("hidden_states", "timestep"):
            if key in kwargs:
                raise TypeError(
                    f"{key}= was passed to sra(...), but sra gives the model hidden_states=x_t/x_s and "
                    "timestep=t/s itself: remove it"
                )
        return model(hidden_states=x, timestep=t, **kwargs)


class SD3Adapter(DiffusersAdapter):
    name = "diffusers-sd3"
    class_name = "SD3Transformer2DModel"

    def tokens(self, output: Any, model: nn.Module, call: ModelCall | None = None) -> Tensor:
        return output[1]


class FluxAdapter(DiffusersAdapter):
    name = "diffusers-flux"
    class_name = "FluxTransformer2DModel"

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [*model.transformer_blocks, *model.single_transformer_blocks]

    def tokens(self, output: Any, model: nn.Module, call: ModelCall | None = None) -> Tensor:
        if isinstance(output, (tuple, list)):
            return output[1]
        # diffusers < 0.35: one [text; image] tensor; the model's hidden_states (B, N, C) has N image tokens.
        hidden_states = call.get("hidden_states", 0) if call is not None else None
        if not (isinstance(hidden_states, Tensor) and hidden_states.dim() == 3):
            raise RuntimeError(
                "a Flux single block returned one [text; image] tensor, but the number of image tokens is unknown: "
                "call the model with hidden_states of shape (B, N, C)"
            )
        return output[:, -hidden_states.shape[1]:]


class DiTTransformerAdapter(DiffusersAdapter):
    """The teacher sees the labels as passed; the student's blocks drop them each on their own (module docstring)."""

    name = "diffusers-dit"
    class_name = "DiTTransformer2DModel"


class PixArtAdapter(DiffusersAdapter):
    name = "diffusers-pixart"
    class_name = "PixArtTransformer2DModel"


for _adapter in (SD3Adapter(), FluxAdapter(), DiTTransformerAdapter(), PixArtAdapter()):
    register_adapter(_adapter)
