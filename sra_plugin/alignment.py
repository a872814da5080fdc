"""SelfRepresentationAlignment: capture the student's block, run the teacher, align through a head."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .losses import build_loss
from .registry import Adapter, ModelCall
from .student import Objective, Weight, head_on_model, resolve_objective
from .teacher import EMATeacher, TeacherPass, check_teacher_options, eval_mode

__all__ = ["SelfRepresentationAlignment", "RECIPES"]

# recipe -> the loss and weight it fills in where the caller gives none. "paper": arXiv 2505.02831's
# SiT recipe (smooth-L1, beta 0.05, weight 0.2; its weight schedule is ``schedules.paper``). "official":
# the authors' code's current default, cosine over the token axis with weight 0.5 (their code keeps
# smooth-L1 only to reproduce the paper).
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"loss": "smooth_l1", "weight": 0.2},
    "official": {"loss": "cosine_tokens", "weight": 0.5},
}
DEFAULT_RECIPE = "paper"


class SelfRepresentationAlignment(Objective):
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
        depth = len(blocks)
        student_index, teacher_index = indices["student_layer"], indices["teacher_layer"]
        if teacher_index < student_index:
            raise ValueError(
                f"teacher_layer={teacher_layer!r} (block {teacher_index}) comes before student_layer={student_layer!r} "
                f"(block {student_index}): the teacher's block must be the same or a later one"
            )
        loss_fn = build_loss(loss)
        user_teacher = check_teacher_options(teacher, student, ema_decay, ema_dtype, compile_teacher)
        teacher_model = user_teacher if user_teacher is not None else student
        dim = adapter.dim(student, blocks[student_index - 1])
        target_dim = adapter.dim(teacher_model, adapter.blocks(teacher_model)[teacher_index - 1])
        head_module = head_on_model(head, dim, target_dim, student)

        self.adapter = adapter
        self.depth = depth
        self.taps = {"student": student_index}
        self.teacher_layer = teacher_index
        self.ema_decay = float(ema_decay)
        self.compile_teacher = compile_teacher
        self.recipe = recipe
        self._set_objective(head, head_module, loss, loss_fn, weight, check_finite)
        # The owned teacher is built before any hook is attached, so a copy carries none of ours.
        self.ema: EMATeacher | None = EMATeacher(student, ema_decay, ema_dtype) if user_teacher is None else None
        object.__setattr__(self, "_user_teacher", user_teacher)
        self._init_student(student)

    _transient = (*Objective._transient, "_teacher_pass")
    metric_names = ("align_loss", "cos_sim", "student_norm", "teacher_norm", "gap")
    target_name = "teacher"

    def _attach(self) -> None:
        super()._attach()
        object.__setattr__(self, "_teacher_pass", TeacherPass(
            self._student, self.adapter, self.teacher_layer, self.ema, self._user_teacher,
            self.compile_teacher, self._capture, eval_mode))

    @property
    def _compiled_blocks(self) -> list | None:
        return self._teacher_pass._compiled_blocks

    @property
    def teacher(self) -> nn.Module:
        """The teacher module: the owned EMA copy (also the model to sample from) or the user's EMA model.

        With frozen parameters (LoRA) the owned EMA holds only the trainable ones and has no module of
        its own: use ``with sra.teacher_weights(): model(...)`` to compute with the teacher's weights."""
        return self._teacher_pass.teacher_module()

    def teacher_weights(self) -> AbstractContextManager[nn.Module]:
        """Make the user's model compute with the teacher's weights (sampling, evaluation); the training
        weights come back exactly on exit. Not while a training graph through the model is alive."""
        return self._uncounted(self._teacher_pass.weights_on_student())

    # ------------------------------------------------------------------ the step
    def _check_inputs(self, x_t: Tensor, t: Any, call: ModelCall, x_s: Any = None, s: Any = None) -> None:
        if not isinstance(x_s, Tensor):
            raise TypeError(f"x_s must be a torch.Tensor, got {type(x_s).__name__}")
        if x_t.shape != x_s.shape:
            raise ValueError(f"x_t has shape {tuple(x_t.shape)} and x_s {tuple(x_s.shape)}: they must match")
        if x_s.dtype != x_t.dtype or x_s.device != x_t.device:
            raise ValueError(
                f"x_s has dtype {x_s.dtype} on {x_s.device} but x_t has {x_t.dtype} on {x_t.device}: "
                "build both from the same x0 and noise"
            )
        self._check_times(x_t.shape[0] if x_t.dim() else None, t=t, s=s)

    def _begin_step(self) -> None:
        self._teacher_pass.begin()

    def _target(self, model: nn.Module, x_t: Tensor, taps: dict, watched: dict, t: Any, args: tuple, kwargs: dict,
                x_s: Tensor, s: Any) -> Tensor:
        return self._teacher_pass.tokens(model, x_s, s, args, kwargs, watched)

    def _after_step(self, t: Any, x_s: Tensor, s: Any) -> None:
        with torch.no_grad():
            if isinstance(t, Tensor) or isinstance(s, Tensor):
                self._metrics["gap"] = (torch.as_tensor(t) - torch.as_tensor(s)).abs().float().mean()
            else:
                self._metrics["gap"] = abs(float(t) - float(s))

    def forward(self, model: nn.Module, x_t: Tensor, x_s: Tensor, t: Any, s: Any, *args: Any,
                sample_weight: Tensor | None = None, **kwargs: Any) -> Tensor:
        """The weighted SRA loss for one step. ``args``/``kwargs`` are the model's conditioning.

        ``sample_weight`` (``(B,)``, optional): the loss is ``weight * mean_b(sample_weight_b * l_b)``,
        ``l_b`` being sample b's alignment loss."""
        return self._run(model, x_t, t, args, kwargs, sample_weight, x_s=x_s, s=s)

    def update_teacher(self) -> None:
        """EMA step of an owned teacher (``decay * teacher + (1 - decay) * student``); always advances ``step``.

        Call it after each ``optimizer.step()``. The first call (or the first ``sra(...)``) starts the
        EMA from the model's weights at that moment. With a teacher you keep yourself, update that EMA
        as usual; calling this as well is optional.

        The step rule (SRA and SRA 2): ``step`` counts training steps. Once ``update_teacher()`` has been
        called, it alone advances ``step`` (so under gradient accumulation the step counts optimizer
        steps); before that, and if it is never called, every call with gradients enabled advances it.
        The first call replaces the steps that training calls had counted before it (a first optimizer
        step of 4 accumulated micro-batches ends at step 1, not 4). A step that stands still
        for 1000 training calls after ``update_teacher()`` was called warns once.

        A call with no optimizer step since the last one does nothing (warned once): under gradient
        accumulation, calling it after ``optimizer.step()`` inside ``accelerator.accumulate`` (which runs at
        every micro-batch) moves the EMA and the step once per optimizer step, as it should. A step is a
        torch optimizer's ``step()`` or an in-place change of a trainable parameter (``sra_plugin.steps``).
        """
        self._teacher_pass.check_update()
        self._count_update(self._teacher_pass.update)

    # ------------------------------------------------------------------ state
    def _identity(self) -> dict[str, Any]:
        if self.ema is not None:
            self.ema.adopt_partitioning()  # a state saved under ZeRO-3 holds slices: compare like with like
        return {
            "student_layer": self.student_layer,
            "teacher_layer": self.teacher_layer,
            "depth": self.depth,
            "head": self.head_name,
            "owned_teacher": self.ema is not None,
            "shared_teacher": self.ema is not None and self.ema.shared,
            **({"zero3_slice_of_rank": self.ema.slice_owner()} if self.ema is not None and self.ema.sharded else {}),
        }

    def extra_repr(self) -> str:
        return (
            f"adapter={self.adapter.name!r}, blocks {self.student_layer}->{self.teacher_layer} of {self.depth}, "
            f"loss={self.loss_name!r}, head={self.head_name!r}, "
            f"teacher={'user EMA' if self.ema is None else ('shared-weight EMA' if self.ema.shared else 'owned EMA')}"
        )
