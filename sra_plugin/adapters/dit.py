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

Per-token time in one pass (``RunsPerTokenTime``, ``SRADTS(separate=False)``): the model's own forward with
``t`` of shape ``(B, N)``, its time embedder, label embedder, blocks and final layer given per-token forwards on
the instance for the pass (``adapters/_pertoken.py``); blocks must be upstream ``DiTBlock``-like, ``(x, c)``.

SRA-DTS (``RunsTokenGroups``): one pass per token group is ``x_embedder`` -> ``+ pos_embed`` -> the group's
tokens gathered -> ``blocks`` with ``c = t_embedder(t_g) + y_embedder(y)`` -> ``final_layer`` (per token), and
``unpatchify`` after the groups' outputs are put back in token order. The labels are embedded (and dropped
for CFG, in training mode) once for all groups, as the single forward of the official SRA-DTS code does.
Blocks may take ``(x, c)`` (DiT, SiT, REPA/SRA) or ``(x, c, separation_mask)`` (the official SRA-DTS SiT,
whose blocks and final layer want ``c`` per token, ``(B, n, D)``); a block taking anything else (rotary
positions, as LightningDiT's ``feat_rope``) is refused, since its positions would have to be gathered too.
"""

from __future__ import annotations

import inspect
import math
from typing import Sequence

from torch import Tensor, nn

from ..protocols import GroupPasses, TokenPass
from ..registry import Adapter, ModelCall, register_adapter
from . import _pertoken
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

    # ------------------------------------------------------------------ SRA-DTS: one pass per token group
    GROUP_PARTS = ("x_embedder", "pos_embed", "t_embedder", "y_embedder", "final_layer", "unpatchify")
    BLOCK_EXTRAS = {"separation_mask"}  # the official SRA-DTS SiT's mask argument, left at None per group

    def _block_extras(self, model: nn.Module) -> list[str]:
        """The arguments of the first block's forward beyond ``(x, c)``."""
        try:
            params = list(inspect.signature(model.blocks[0].forward).parameters.values())
        except (TypeError, ValueError, IndexError):
            return []
        params = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        return [p.name for p in params[2:]]

    def group_support(self, model: nn.Module) -> str | None:
        missing = [part for part in self.GROUP_PARTS if getattr(model, part, None) is None]
        if missing:
            return f"it has no {', '.join(missing)} (a DiT/SiT has x_embedder, pos_embed, t_embedder, y_embedder, final_layer, unpatchify)"
        other = [name for name in self._block_extras(model) if name not in self.BLOCK_EXTRAS]
        if other:
            return (f"its blocks ({type(model.blocks[0]).__name__}) take {other} besides (x, c), e.g. rotary positions, "
                    "which a pass on a subset of the tokens would have to gather too")
        return None

    def num_tokens(self, model: nn.Module, x: Tensor) -> int:
        p, q = patch_size_of(model.x_embedder, self.name)
        if x.dim() != 4 or x.shape[-2] % p or x.shape[-1] % q:
            raise ValueError(f"x0 of shape {tuple(x.shape)} is not accepted by {type(model).__name__}: use (B, C, H, W) with H, W multiples of the patch size {p}x{q}")
        tokens = (x.shape[-2] // p) * (x.shape[-1] // q)
        table = model.pos_embed.shape[-2]
        if tokens != table:
            raise ValueError(f"x0 of shape {tuple(x.shape)} makes {tokens} tokens but {type(model).__name__}.pos_embed holds {table}: use the model's input size")
        return tokens

    @staticmethod
    def _labels(args: tuple, kwargs: dict) -> Tensor:
        """The class labels ``y`` of ``forward(x, t, y)``, given positionally or as ``y=``."""
        extra = [f"positional #{i}" for i in range(1, len(args))] + [k for k in kwargs if k != "y"]
        if extra or (args and "y" in kwargs) or not (args or "y" in kwargs):
            raise TypeError(
                f"conditioning args={len(args)} kwargs={sorted(kwargs)} is not accepted for a DiT/SiT: give exactly the "
                f"class labels, positionally or as y= (got extra: {extra or 'none'})"
            )
        return args[0] if args else kwargs["y"]

    def group_forward(self, model: nn.Module, inputs: Sequence[Tensor], times: Sequence[Tensor],
                      token_index: Sequence[Tensor], args: tuple, kwargs: dict, taps: Sequence[int],
                      output: bool) -> GroupPasses:
        y = self._labels(args, kwargs)
        used: list[Tensor] = []
        table = getattr(model.y_embedder, "embedding_table", None)
        handle = table.register_forward_pre_hook(lambda module, a: used.append(a[0])) if isinstance(table, nn.Module) else None
        try:
            y_embedding = model.y_embedder(y, model.training)  # CFG dropout, once for every group
        finally:
            if handle is not None:
                handle.remove()
        if isinstance(y_embedding, tuple):  # the official SRA-DTS SiT returns (embeddings, labels)
            y_embedding = y_embedding[0]
        labels = used[0] if used else y
        per_token = "separation_mask" in self._block_extras(model)
        blocks = list(model.blocks)
        last = len(blocks) if output else max(taps)
        passes = GroupPasses([] if output else None, {k: [] for k in taps},
                             (labels,) if args else (), {} if args else {"y": labels})
        for x, t, index in zip(inputs, times, token_index):
            h = model.x_embedder(x) + model.pos_embed
            h = h.gather(1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            c = model.t_embedder(t) + y_embedding
            if per_token:
                c = c.unsqueeze(1).expand(-1, h.shape[1], -1)
            for number, block in enumerate(blocks[:last], 1):
                h = block(h, c)
                if number in passes.taps:
                    passes.taps[number].append(h)
            if output:
                passes.outputs.append(model.final_layer(h, c))
        return passes

    def unpatchify(self, model: nn.Module, tokens: Tensor, x: Tensor | None = None) -> Tensor:
        return model.unpatchify(tokens)  # a square grid, read from the token count by the model itself

    # ------------------------------------------------------------------ per-token time in one pass (RunsPerTokenTime)
    def per_token_support(self, model: nn.Module) -> str | None:
        reason = _pertoken.dit_support(model)
        if reason is None and not isinstance(getattr(model, "pos_embed", None), Tensor):
            reason = "it has no pos_embed (a DiT/SiT adds a fixed position table)"
        return reason

    def token_values(self, model: nn.Module, values: Tensor, x: Tensor) -> Tensor:
        return _pertoken.grid_values(values, x, patch_size_of(model.x_embedder, self.name))

    def per_token_forward(self, model: nn.Module, x: Tensor, times: Tensor, args: tuple, kwargs: dict,
                          taps: Sequence[int], output: bool, caller: nn.Module | None = None) -> TokenPass:
        """The model's own forward on ``(x, times (B, N), y)`` with the per-token forwards of
        ``_pertoken.dit_swaps`` in place."""
        reason = self.per_token_support(model)
        if reason is not None:
            raise ValueError(f"model={type(model).__name__} cannot run per-token time: {reason}")
        self._labels(args, kwargs)  # exactly the class labels, as for the group passes
        _pertoken.check_times(model, times, x, self.num_tokens(model, x))
        return _pertoken.run_pass(self, model, x, times, args, kwargs, _pertoken.dit_swaps(model), taps, output, caller)


register_adapter(DiTAdapter())
