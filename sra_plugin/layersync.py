"""LayerSync (Haghighi, van Delft, Hassan, Alahi, arXiv 2510.12581): an earlier block of the user's own
forward aligned to a deeper block of the same forward. No extra pass, no teacher.

Facts from the official code (github.com/vita-epfl/LayerSync): the two blocks' raw outputs, no
projection head; per token ``-(normalize(z_s) * normalize(z_t)).sum(-1)``, averaged over tokens and the
batch. Here ``loss="cosine"`` is ``1 - cos`` per token: the same gradient, shifted by the constant 1 so
that it is 0 when aligned. The authors' two settings, as ``recipe=`` (``RECIPES``):

- ``"pretraining"`` (the default): ``train.py`` with ``transport/transport.py``: ``--reg-weight 0.2``,
  the deeper block detached (``z_t.detach()``); SiT-XL blocks 8 -> 16 of 28 in the paper.
- ``"lora"``: ``Finetuning-LoRA/loss.py`` (a LoRA fine-tune of Wan in DiffSynth-Studio): weight 0.002,
  the deeper block **not** detached, so the gradient reaches both blocks.

A recipe fills in the weight and whether the target is detached; the blocks stay ``student_layer`` /
``target_layer`` (0.3 and 0.57 of the depth unless given) in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn

from .config import MethodConfig, option, shown
from .registry import Adapter
from .student import Objective, Weight, head_name, loss_name, resolve_objective
from .targets import TapTarget

__all__ = ["LayerSync", "LayerSyncConfig", "RECIPES", "DEFAULT_RECIPE"]

# recipe -> the weight and target detach it fills in where the caller gives none (module docstring).
RECIPES: dict[str, dict[str, Any]] = {
    "pretraining": {"weight": 0.2, "detach_target": True},  # LayerSync train.py / transport/transport.py
    "lora": {"weight": 0.002, "detach_target": False},  # LayerSync Finetuning-LoRA/loss.py (Wan)
}
DEFAULT_RECIPE = "pretraining"


@dataclass(frozen=True)
class LayerSyncConfig(MethodConfig):
    """LayerSync's options as resolved. States saved by 0.3.0 had neither ``recipe`` nor ``detach_target``:
    theirs were the pretraining recipe's."""

    text = ("blocks {student_layer}->{target_layer} of {depth} (same forward, {detach_target}), loss={loss!r}, head={head!r}, "
            "recipe={recipe!r}")

    student_layer: int = option()
    target_layer: int = option()
    depth: int = option()
    head: str = option()
    recipe: str = option(old=DEFAULT_RECIPE)
    detach_target: bool = option(old=True, show=lambda on: "target detached" if on else "target not detached")
    loss: str = shown()


class LayerSync(Objective):
    """Align block ``student_layer`` (through ``head``) with block ``target_layer`` of the same forward.

    Usage, in an existing loop::

        ls = LayerSync(model)                       # SiT-XL: blocks 8 -> 16
        pred = model(x_t, t, y)                     # both blocks' tokens are kept by hooks
        loss = diff_loss + ls(model, x_t, t, y)

    Defaults: ``student_layer=0.3`` and ``target_layer=0.57`` of the depth (28 blocks: 8 and 16),
    ``loss="cosine"`` per token, ``head="identity"`` (the paper's; ``"mlp"``, ``"linear"`` or a module
    put a trainable head on the student side). ``weight`` and ``detach_target`` left as None come from
    ``recipe`` (``RECIPES``): ``"pretraining"`` (the default; the official ``train.py``: weight 0.2,
    target detached, so it gets no gradient) or ``"lora"`` (the official ``Finetuning-LoRA/loss.py``:
    weight 0.002, target not detached, so the gradient reaches both blocks); a value given explicitly
    wins over the recipe's. With ``head="identity"`` it has no parameters: under DDP wrap only the model
    (DDP refuses a module with none, and there is nothing to synchronise); with a head, wrap it too, as SRA.
    """

    def __init__(
        self,
        model: nn.Module,
        student_layer: int | float = 0.3,
        target_layer: int | float = 0.57,
        loss: str | Callable[[Tensor, Tensor], Tensor] = "cosine",
        weight: Weight | None = None,
        head: str | nn.Module = "identity",
        adapter: str | Adapter | None = None,
        check_finite: bool = False,
        recipe: str = DEFAULT_RECIPE,
        detach_target: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(recipe, str) or recipe not in RECIPES:
            raise ValueError(f"recipe={recipe!r} is not accepted: use one of {sorted(RECIPES)}")
        if detach_target is not None and not isinstance(detach_target, bool):
            raise TypeError(
                f"detach_target={detach_target!r} is not accepted: use True (no gradient through the deeper block), "
                "False (gradient through both blocks) or None (the recipe's)"
            )
        weight = RECIPES[recipe]["weight"] if weight is None else weight
        detach_target = RECIPES[recipe]["detach_target"] if detach_target is None else detach_target
        student, adapter, blocks, indices, weight = resolve_objective(
            model, adapter, weight, student_layer=student_layer, target_layer=target_layer)
        first, deeper = indices["student_layer"], indices["target_layer"]
        if deeper <= first:
            raise ValueError(
                f"target_layer={target_layer!r} (block {deeper}) is not deeper than student_layer={student_layer!r} "
                f"(block {first}): LayerSync aligns an earlier block to a later one"
            )
        # A target that trains must carry gradient: a block that ran without (reentrant checkpointing) is refused.
        self.grad_taps = ("student",) if detach_target else ("student", "target")
        config = LayerSyncConfig(first, deeper, len(blocks), head_name(head), recipe, detach_target, loss_name(loss))
        dims = (adapter.dim(student, blocks[first - 1]), adapter.dim(student, blocks[deeper - 1]))
        self._setup(student, adapter, config, {"student": first, "target": deeper}, head=head, dims=dims, loss=loss,
                    weight=weight, check_finite=check_finite)

    def _make_target(self) -> TapTarget:
        return TapTarget("target", self.target_layer, self.detach_target)

    def forward(self, model: nn.Module, x_t: Tensor, t: Any, *args: Any,
                sample_weight: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The weighted LayerSync loss of one step; ``args``/``kwargs`` are the model's conditioning."""
        return self._run(model, x_t, t, args, kwargs, sample_weight)
