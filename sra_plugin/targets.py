"""The target protocol: every source of what an objective aligns the student's tokens to answers one
call, ``target(step)``, with one small ``Step`` (the call's inputs and conditioning, the taps of the
student's forward, the token grid). An objective is taps + target + head + loss + weight
(``student.Objective``); a method picks its target here:

- ``TeacherTarget``: a later block of its EMA teacher on a less noisy input (SRA; SRA-DTS runs its own
  per-group passes on the same teacher). The teacher's kind (``teacher.TeacherKind``) is an object;
  ``SelfTeaching`` gives an objective the teacher's public side (``teacher``, ``teacher_weights()``,
  ``update_teacher()``).
- ``LatentTarget``: the clean latent, patchified in the model's token order (SRA 2).
- ``TapTarget``: a deeper tap of the same forward, detached or not (LayerSync).
- ``EncoderTarget``: the patch tokens of a frozen image encoder (REPA, iREPA).
- ``NoTarget``: none (Dispersive).
"""

from __future__ import annotations

import math
import numbers
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import is_real
from .capture import run_until
from .protocols import EncodesImages
from .registry import Adapter, ModelCall, resolve_adapter
from .teacher import EMATeacher, TeacherKind, UserEMA, check_teacher_options, eval_mode, owned_ema

__all__ = ["Step", "Target", "TeacherTarget", "SelfTeaching", "LatentTarget", "TapTarget", "NoTarget",
           "EncoderTarget", "check_times", "encoder_reader", "grid_of", "resize_grid"]


def check_times(batch: int | None, **times: Any) -> None:
    """Each time is a tensor or a number, with one value per sample or one for all."""
    for name, value in times.items():
        if not (isinstance(value, Tensor) or is_real(value)):
            raise TypeError(f"{name} must be a tensor or a number, got {type(value).__name__}")
        b = value.shape[0] if isinstance(value, Tensor) and value.dim() > 0 else None
        if b is not None and b not in (batch, 1):
            raise ValueError(f"{name} has batch size {b} but x_t has {batch}: give one time per sample, or one for all")


@dataclass
class Step:
    """One call of an objective, as its target sees it.

    ``model``: the model as the call gave it (wrapped or not); ``student``: the unwrapped model;
    ``x_t``, ``t``: the student's input and time; ``call``: the model's conditioning; ``inputs``: the
    method's own inputs (``x_s`` and ``s``, ``x0``, ``images``); ``taps``: name -> the student's tokens
    ``(B, N, D)`` of that block (filled once the forward was matched or re-run); ``watched``: what the
    student's forward used, for the adapter's ``teacher_inputs``.
    """

    model: nn.Module
    student: nn.Module
    x_t: Tensor
    t: Any
    call: ModelCall
    inputs: dict[str, Any]
    taps: dict[str, Tensor] = field(default_factory=dict)
    watched: dict = field(default_factory=dict)

    @property
    def batch(self) -> int | None:
        return self.x_t.shape[0] if self.x_t.dim() else None

    @property
    def grid(self) -> tuple[int, int] | None:
        """The ``(h, w)`` grid of the student's tokens on an image input ``(B, C, H, W)``; None for other inputs."""
        if self.x_t.dim() != 4:
            return None
        return grid_of(self.taps["student"].shape[1], self.x_t.shape[-2], self.x_t.shape[-1], "the model's block")


class Target:
    """Base of the target sources. ``check(step)`` checks the method's inputs it reads (before any work);
    ``begin()`` runs before a step's work; ``step -> tokens`` (None: no target); ``metrics(step)`` adds its
    figures. ``name`` names its side in metrics (``<name>_norm``) and errors, ``layer`` its block if any."""

    name = "target"
    layer: int | None = None
    extra_metrics: tuple[str, ...] = ()
    checks_finite = True  # whether check_finite=True checks its tokens too

    def check(self, step: Step) -> None:
        """Check the inputs of ``step`` this target reads."""

    def begin(self) -> None:
        """Before the work of a call, past every check."""

    def __call__(self, step: Step) -> Tensor | None:
        raise NotImplementedError

    def metrics(self, step: Step) -> dict[str, Any]:
        return {}


class NoTarget(Target):
    """No target: the loss reads the student's taps alone (Dispersive)."""

    def __call__(self, step: Step) -> None:
        return None


class TapTarget(Target):
    """Another tap of the same forward (LayerSync's deeper block), detached or, to train both blocks, not."""

    def __init__(self, tap: str, layer: int, detach: bool) -> None:
        self.tap, self.layer, self.detach = tap, layer, detach

    def __call__(self, step: Step) -> Tensor:
        tokens = step.taps[self.tap]
        return tokens.detach() if self.detach else tokens


class LatentTarget(Target):
    """The clean latent ``x0`` as the model's patch tokens ``(B, N_img, C * p * p)`` (SRA 2); with
    ``norm="sample"`` each sample's values z-scored (mean 0, std 1 over all its values)."""

    checks_finite = False  # the data, not features: check_finite names the student side only

    def __init__(self, adapter: Adapter, student: nn.Module, dim: int, norm: str | None, eps: float = 1e-6) -> None:
        self.adapter, self.student, self.dim, self.norm, self.eps = adapter, student, dim, norm, eps

    def patches(self, x0: Tensor) -> Tensor:
        patches = self.adapter.patchify(self.student, x0)
        if self.norm == "sample":
            flat = patches.float().flatten(1)
            shape = (-1, *[1] * (patches.dim() - 1))
            patches = ((patches.float() - flat.mean(1).view(shape)) / (flat.std(1).view(shape) + self.eps)).to(patches.dtype)
        return patches

    def check(self, step: Step) -> None:
        x0 = step.inputs["x0"]
        if not isinstance(x0, Tensor):
            raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
        expected = tuple(self.adapter.target_shape(self.student, step.x_t, step.call))
        if tuple(x0.shape) != expected:
            same = "" if expected == tuple(step.x_t.shape) else (
                f", not x_t's {tuple(step.x_t.shape)}: the model predicts only the noisy latent's channels/tokens, "
                "not the conditioning channels or reference tokens stacked onto its input")
            raise ValueError(
                f"x0 has shape {tuple(x0.shape)}, but {type(self.student).__name__} on this x_t wants the clean latent "
                f"of shape {expected}{same}: pass the clean latent of this batch (the one x_t was made from), "
                "in the layout the model predicts"
            )

    def __call__(self, step: Step) -> Tensor:
        tokens = step.taps["student"]
        with torch.no_grad():
            target = self.patches(step.inputs["x0"].detach())
        if target.dim() != 3 or target.shape[:2] != tokens.shape[:2] or target.shape[-1] != self.dim:
            raise ValueError(
                f"patchified x0 has shape {tuple(target.shape)} but the student's block gives tokens "
                f"{tuple(tokens.shape)} and the head outputs {self.dim} values per token: the adapter's "
                "patchify does not fit this model (or pass target_dim=)"
            )
        return target


def grid_of(tokens: int, height: int, width: int, what: str) -> tuple[int, int]:
    """The ``(h, w)`` token grid of ``tokens`` tokens over a ``height x width`` picture: ``h * w ==
    tokens`` and ``h / w == height / width``."""
    h = round(math.sqrt(tokens * height / width))
    if h < 1 or tokens % h or abs(h / (tokens // h) - height / width) > 1e-6 * max(1.0, height / width):
        raise ValueError(
            f"{what}: {tokens} tokens do not form a grid with the aspect ratio of its input ({height}x{width}); "
            "REPA needs image tokens on a 2-D grid (pass encoder_tokens= to read them yourself)"
        )
    return h, tokens // h


def resize_grid(tokens: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """``(B, h*w, D)`` tokens on grid ``grid`` resampled to grid ``size``: bilinear with antialiasing
    (an area-like average when shrinking), per channel, in float32."""
    b, n, d = tokens.shape
    if tuple(grid) == tuple(size):
        return tokens
    image = tokens.float().transpose(1, 2).reshape(b, d, *grid)
    resized = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized.reshape(b, d, -1).transpose(1, 2).to(tokens.dtype)


def encoder_reader(encoder: nn.Module, read: Callable | None, dim: int | None) -> tuple[Callable, int]:
    """How to read ``encoder``'s patch tokens and their width: ``read``/``dim`` as given, else the
    registered adapter's ``EncodesImages`` protocol (built in for timm ViTs)."""
    adapter = None
    try:
        adapter = resolve_adapter(encoder)
    except ValueError:
        pass
    if read is None:
        if not isinstance(adapter, EncodesImages):
            raise ValueError(
                f"encoder={type(encoder).__name__} is not accepted: no registered adapter says how to read its patch "
                "tokens; pass encoder_tokens=callable(encoder, images) -> (B, N, D) and encoder_dim=D"
            )
        read = adapter.encoder_tokens
    elif not callable(read):
        raise TypeError(f"encoder_tokens={read!r} is not accepted: use callable(encoder, images) -> (B, N, D) or None")
    if dim is None:
        if not isinstance(adapter, EncodesImages):
            raise ValueError(f"encoder_dim=None is not accepted for encoder={type(encoder).__name__}: give the width D of its tokens")
        dim = adapter.encoder_dim(encoder)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"encoder_dim={dim!r} is not accepted: use a positive int, the width of the encoder's tokens")
    return read, int(dim)


class EncoderTarget(Target):
    """Patch tokens of a frozen ``encoder`` on ``images`` (REPA), computed under ``no_grad`` in eval mode,
    on the model's token grid; with ``zscore`` each token sequence normalised over the token axis as
    ``(z - mean_T) / (std_T + 1e-6)`` (iREPA)."""

    name = "encoder"

    def __init__(self, encoder: nn.Module, read: Callable[[nn.Module, Tensor], Tensor], zscore: bool = False) -> None:
        self.encoder, self.read, self.zscore = encoder, read, zscore

    def check(self, step: Step) -> None:
        images, x_t = step.inputs["images"], step.x_t
        if not isinstance(images, Tensor):
            raise TypeError(f"images={type(images).__name__} is not accepted: REPA needs images=, the batch's clean images as the encoder takes them")
        if images.dim() == 0 or x_t.dim() == 0 or images.shape[0] != x_t.shape[0]:
            raise ValueError(f"images has shape {tuple(images.shape)} but x_t {tuple(x_t.shape)}: give one image per sample")

    def __call__(self, step: Step) -> Tensor:
        z = self.tokens(step.inputs["images"], step.taps["student"].shape[1], step.x_t)
        return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-6) if self.zscore else z

    def tokens(self, images: Tensor, model_tokens: int, model_input: Tensor) -> Tensor:
        with torch.no_grad(), eval_mode(self.encoder):
            found = self.read(self.encoder, images)
        if not isinstance(found, Tensor) or found.dim() != 3 or found.shape[0] != images.shape[0]:
            shape = tuple(found.shape) if isinstance(found, Tensor) else type(found).__name__
            raise ValueError(f"the encoder's tokens have shape {shape}: expected (B, N_enc, D_enc) with B={images.shape[0]}")
        same_count = found.shape[1] == model_tokens
        if model_input.dim() != 4 or images.dim() != 4:
            if same_count:  # no 2-D grid to compare (video, packed tokens): paired by index
                return found.detach()
            raise ValueError(
                f"the encoder gives {found.shape[1]} tokens and the model {model_tokens}: resizing the encoder's grid "
                f"needs 2-D inputs, got x_t {tuple(model_input.shape)} and images {tuple(images.shape)}"
            )
        # Grids, not token counts: an 8x8 encoder grid and a 4x16 model grid both have 64 tokens.
        try:
            grid = grid_of(found.shape[1], images.shape[-2], images.shape[-1], "the encoder's output")
            size = grid_of(model_tokens, model_input.shape[-2], model_input.shape[-1], "the model's block")
        except ValueError:
            if same_count:  # tokens that form no grid of their input's shape: paired by index
                return found.detach()
            raise
        return resize_grid(found.detach(), grid, size)


class TeacherTarget(Target):
    """Block ``layer`` of the teacher on ``(x_s, s)`` (SRA), no gradient, eval mode, the pass stopped after
    that block. ``kind()`` gives the teacher's kind at this moment (``teacher.TeacherKind``); a pass on the
    student's own modules (a shared-weight EMA) runs with ``capture`` paused.

    With ``compile_teacher`` (or a compiled model when it is ``None``) the blocks before ``layer`` that the
    kind allows (an owned copy's) run compiled; block ``layer`` stays eager: the hook that ends the pass is
    on it. The compiled calls live here, not on the modules, so a copy or a pickle of the teacher carries none.
    """

    name = "teacher"
    extra_metrics = ("gap",)

    def __init__(self, kind: Callable[[], TeacherKind], student: nn.Module, adapter: Adapter, layer: int,
                 capture: Any = None, compile_teacher: bool | dict | None = False) -> None:
        self.kind, self.student, self.adapter, self.layer = kind, student, adapter, layer
        self.capture, self.compile_teacher = capture, compile_teacher
        self.module: nn.Module | None = None
        self._compiled_blocks: list | None = None  # built at the first compiled pass

    def check(self, step: Step) -> None:
        x_s, x_t = step.inputs["x_s"], step.x_t
        if not isinstance(x_s, Tensor):
            raise TypeError(f"x_s must be a torch.Tensor, got {type(x_s).__name__}")
        if x_t.shape != x_s.shape:
            raise ValueError(f"x_t has shape {tuple(x_t.shape)} and x_s {tuple(x_s.shape)}: they must match")
        if x_s.dtype != x_t.dtype or x_s.device != x_t.device:
            raise ValueError(
                f"x_s has dtype {x_s.dtype} on {x_s.device} but x_t has {x_t.dtype} on {x_t.device}: "
                "build both from the same x0 and noise"
            )
        check_times(step.batch, s=step.inputs["s"])

    def begin(self) -> None:
        self.kind().begin()

    @contextmanager
    def running(self) -> Iterator[nn.Module]:
        """The module a teacher pass runs on, with the teacher's weights, in eval mode, without gradient."""
        with torch.no_grad(), self.kind().pass_module() as module, eval_mode(module):
            with self.capture.pausing() if self.capture is not None else nullcontext():
                yield module

    def __call__(self, step: Step) -> Tensor:
        t_args, t_kwargs = self.adapter.teacher_inputs(self.student, step.call.args, step.call.kwargs, step.watched)
        with self.running() as module, self._compiled(step.model):
            return run_until(module, self._block_of(module), self.adapter, step.inputs["x_s"], step.inputs["s"], t_args, t_kwargs)

    def metrics(self, step: Step) -> dict[str, Any]:
        t, s = step.t, step.inputs["s"]
        with torch.no_grad():
            if isinstance(t, Tensor) or isinstance(s, Tensor):
                return {"gap": (torch.as_tensor(t) - torch.as_tensor(s)).abs().float().mean()}
            return {"gap": abs(float(t) - float(s))}

    def _block_of(self, module: nn.Module) -> nn.Module:
        """Block ``layer`` of the module the pass runs on (the module changes when ZeRO-3's first use replaces
        an owned copy by the student's modules)."""
        if module is not self.module:
            self.module, self.block = module, self.adapter.blocks(module)[self.layer - 1]
        return self.block

    def _wants_compiled(self, model: nn.Module) -> bool:
        if self.compile_teacher is None:
            return hasattr(model, "_orig_mod") or getattr(self.student, "_compiled_call_impl", None) is not None
        return bool(self.compile_teacher) or self.compile_teacher == {}

    @contextmanager
    def _compiled(self, model: nn.Module) -> Iterator[None]:
        blocks = self.kind().compiled_blocks(self.adapter, self.layer) if self._wants_compiled(model) else []
        if not blocks:
            yield
            return
        if self._compiled_blocks is None:
            options = self.compile_teacher if isinstance(self.compile_teacher, dict) else {}
            self._compiled_blocks = [torch.compile(b._call_impl, **options) for b in blocks]
        for block, call in zip(blocks, self._compiled_blocks):
            block._compiled_call_impl = call
        try:
            yield
        finally:
            for block in blocks:
                block._compiled_call_impl = None


class SelfTeaching:
    """Mixed into an objective whose target is its own EMA teacher (SRA, SRA-DTS): the teacher's kind, kept
    as ``ema`` (the owned EMA, whose state is this objective's ``ema.*``; None for the user's EMA), and the
    teacher's public side. A kind change (ZeRO-3 partitioning) happens at use, save and load, never while
    the saved identity is built."""

    ema: EMATeacher | None

    @staticmethod
    def _block_pair(indices: dict[str, int], student_layer: Any, teacher_layer: Any) -> tuple[int, int]:
        """The student's and the teacher's blocks (1-based); the teacher's must be the same or a later one."""
        first, last = indices["student_layer"], indices["teacher_layer"]
        if last < first:
            raise ValueError(
                f"teacher_layer={teacher_layer!r} (block {last}) comes before student_layer={student_layer!r} "
                f"(block {first}): the teacher's block must be the same or a later one"
            )
        return first, last

    def _set_teacher(self, teacher: str | nn.Module, student: nn.Module, adapter: Adapter, blocks: list[nn.Module],
                     pair: tuple[int, int], ema_decay: float, ema_dtype: torch.dtype,
                     compile_teacher: bool | dict | None) -> tuple[int, int]:
        """Check the teacher options and build an owned EMA (before any hook: a copy carries none of ours);
        the widths of the student's and the teacher's tokens."""
        user = check_teacher_options(teacher, student, ema_decay, ema_dtype, compile_teacher)
        self.ema = owned_ema(student, ema_decay, ema_dtype) if user is None else None
        object.__setattr__(self, "_user_teacher", user)  # the user's EMA: not a submodule, not in the state
        model = student if user is None else user
        return adapter.dim(student, blocks[pair[0] - 1]), adapter.dim(model, adapter.blocks(model)[pair[1] - 1])

    def _kind_now(self) -> TeacherKind:
        return self.ema if self.ema is not None else UserEMA(self._student, self._user_teacher)

    def _teacher_kind(self) -> TeacherKind:
        """The kind to use now; an owned EMA becomes its ZeRO-3 kind once the model is partitioned."""
        if self.ema is not None:
            self.ema = self.ema.adopted()
        return self._kind_now()

    def _make_target(self) -> TeacherTarget:
        return TeacherTarget(self._teacher_kind, self._student, self.adapter, self.teacher_layer, self._capture,
                             self.compile_teacher)

    @property
    def teacher(self) -> nn.Module:
        """The teacher module: the owned EMA copy (also the model to sample from) or the user's EMA model.

        With frozen parameters (LoRA) the owned EMA holds only the trainable ones and has no module of
        its own: use ``with sra.teacher_weights(): model(...)`` to compute with the teacher's weights."""
        return self._teacher_kind().module()

    def teacher_weights(self) -> AbstractContextManager[nn.Module]:
        """Make the user's model compute with the teacher's weights (sampling, evaluation); the training
        weights come back exactly on exit. Not while a training graph through the model is alive."""
        return self._uncounted(self._teacher_kind().on_student())

    def update_teacher(self) -> None:
        """EMA step of an owned teacher (``decay * teacher + (1 - decay) * student``); always advances ``step``.

        Call it after each ``optimizer.step()``. The first call (or the first training call) starts the
        EMA from the model's weights at that moment. With a teacher you keep yourself, update that EMA
        as usual; calling this as well is optional.

        The step rule: ``step`` counts training steps. Once ``update_teacher()`` has been called, it alone
        advances ``step`` (so under gradient accumulation the step counts optimizer steps); before that, and
        if it is never called, every call with gradients enabled advances it. The first call replaces the
        steps that training calls had counted before it (a first optimizer step of 4 accumulated micro-batches
        ends at step 1, not 4). A step that stands still for 1000 training calls after ``update_teacher()``
        was called warns once.

        A call with no optimizer step since the last one does nothing (warned once): under gradient
        accumulation, calling it after ``optimizer.step()`` inside ``accelerator.accumulate`` (which runs at
        every micro-batch) moves the EMA and the step once per optimizer step, as it should. A step is a
        torch optimizer's ``step()`` or an in-place change of a trainable parameter (``sra_plugin.steps``).
        """
        kind = self._teacher_kind()
        kind.check_update()
        self._count_update(kind.update)

    @property
    def _compiled_blocks(self) -> list | None:
        return self._source._compiled_blocks

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), **self._kind_now().identity()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, teacher={self._kind_now().label}"

    def _save_to_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._teacher_kind()  # a state saved under ZeRO-3 holds slices: compare and save like with like
        super()._save_to_state_dict(*args, **kwargs)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._teacher_kind()
        super()._load_from_state_dict(*args, **kwargs)
