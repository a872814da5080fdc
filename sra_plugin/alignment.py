"""SelfRepresentationAlignment: the student's block through a head, aligned to the EMA teacher's later
block on a less noisy input (``targets.TeacherTarget``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .config import MethodConfig, option, shown
from .registry import Adapter
from .losses import build_loss
from .student import Objective, Weight, head_name, loss_name, resolve_objective
from .targets import SelfTeaching

__all__ = ["SelfRepresentationAlignment", "SRAConfig", "RECIPES"]

# recipe -> the loss and weight it fills in where the caller gives none. "paper": arXiv 2505.02831's
# SiT recipe (smooth-L1, beta 0.05, weight 0.2; its weight schedule is ``schedules.paper``). "official":
# the authors' code's current default, cosine over the token axis with weight 0.5 (their code keeps
# smooth-L1 only to reproduce the paper).
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"loss": "smooth_l1", "weight": 0.2},
    "official": {"loss": "cosine_tokens", "weight": 0.5},
}
DEFAULT_RECIPE = "paper"


@dataclass(frozen=True)
class SRAConfig(MethodConfig):
    """SRA's options as resolved: the blocks (1-based) and depth, the head's and loss's names, the recipe,
    the EMA decay and ``compile_teacher``. The teacher's kind adds its part of the saved identity."""

    text = "blocks {student_layer}->{teacher_layer} of {depth}, loss={loss!r}, head={head!r}"

    student_layer: int = option()
    teacher_layer: int = option()
    depth: int = option()
    head: str = option()
    loss: str = shown()
    recipe: str = shown()
    ema_decay: float = shown()
    compile_teacher: bool | dict | None = shown()


class SelfRepresentationAlignment(SelfTeaching, Objective):
    """Self-Representation Alignment (SRA, arXiv 2505.02831) for an unmodified diffusion transformer.

    Paper, Sec. 3.2: "the representation of the earlier layer with higher noise [is aligned] to that
    of the later layer with lower noise", with the later layer read from an EMA copy of the model
    (the teacher) and the earlier one passed through a small projection head.

    Usage, in an existing loop::

        sra = SelfRepresentationAlignment(model)
        pred = model(x_t, t, y)                            # the student's tokens are kept by a hook
        loss = diff_loss + sra(model, x_t, x_s, t, s, y=y)   # teacher on (x_s, s), stopped after L_t
        loss.backward(); opt.step(); opt.zero_grad()
        sra.update_teacher()

    ``loss``/``weight`` left as None come from ``recipe`` (``RECIPES``): ``"paper"`` is smooth-L1
    (beta 0.05) x 0.2, ``"official"`` the authors' current code, ``cosine_tokens`` x 0.5; a ``loss`` or
    ``weight`` given explicitly wins over the recipe's. Layers are 1-based block numbers, negative from
    the end, or fractions of depth (see ``sra_plugin.layers``). ``sra(...)`` returns the weighted loss; ``metrics`` holds the last call's
    figures as floats.

    Many processes: wrap the model in DDP, and either wrap ``sra`` too (``DDP(sra)``,
    ``accelerator.prepare(model, sra, ...)``) or call the bare ``sra`` with the DDP model: then it copies
    rank 0's head at its first training call and averages the head's gradients across the ranks itself
    (``sra_plugin.headsync``; ``sra.checkpoint_with(accelerator)`` keeps its state in accelerate's
    checkpoints). With ``head="identity"`` it has no parameters and DDP refuses it ("not needed"): call it bare.

    Every pass it stops early (teacher, student re-run) restores the LoRA ``scaling`` of the model's
    peft layers, which a forward that scales them at its start and unscales them only at its end
    (diffusers 0.30 with ``joint_attention_kwargs={"scale": s}``; 0.42 unscales in a ``finally``) would leave changed. An owned
    teacher needs the LoRA unmerged (``fuse_lora()``/``merge_adapter()`` make the teacher pass,
    ``teacher_weights()`` and ``update_teacher()`` raise).
    """

    def __init__(
        self,
        model: nn.Module,
        student_layer: int | float = 0.3,
        teacher_layer: int | float = 0.7,
        teacher: str | nn.Module = "ema",
        ema_decay: float = 0.9999,
        head: str | nn.Module = "mlp",
        loss: str | Callable[[Tensor, Tensor], Tensor] | None = None,
        weight: Weight | None = None,
        adapter: str | Adapter | None = None,
        check_finite: bool = False,
        ema_dtype: torch.dtype = torch.float32,
        compile_teacher: bool | dict | None = None,
        recipe: str = DEFAULT_RECIPE,
    ) -> None:
        super().__init__()
        if not isinstance(recipe, str) or recipe not in RECIPES:
            raise ValueError(f"recipe={recipe!r} is not accepted: use one of {sorted(RECIPES)}")
        loss = RECIPES[recipe]["loss"] if loss is None else loss
        weight = RECIPES[recipe]["weight"] if weight is None else weight
        # Everything is validated before anything is created or attached.
        student, adapter, blocks, indices, weight = resolve_objective(
            model, adapter, weight, student_layer=student_layer, teacher_layer=teacher_layer)
        first, last = self._block_pair(indices, student_layer, teacher_layer)
        build_loss(loss)
        dims = self._set_teacher(teacher, student, adapter, blocks, (first, last), ema_decay, ema_dtype, compile_teacher)
        config = SRAConfig(first, last, len(blocks), head_name(head), loss_name(loss), recipe, float(ema_decay), compile_teacher)
        self._setup(student, adapter, config, {"student": first}, head=head, dims=dims, loss=loss, weight=weight,
                    check_finite=check_finite)

    def forward(self, model: nn.Module, x_t: Tensor, x_s: Tensor, t: Any, s: Any, *args: Any,
                sample_weight: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The weighted SRA loss for one step. ``args``/``kwargs`` are the model's conditioning.

        ``sample_weight`` (``(B,)``, optional): the loss is ``weight * mean_b(sample_weight_b * l_b)``,
        ``l_b`` being sample b's alignment loss."""
        return self._run(model, x_t, t, args, kwargs, sample_weight, x_s=x_s, s=s)
