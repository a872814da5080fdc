"""diffusers transformers (optional extra ``sra-plugin[diffusers]``): the image and video models that
training tools fine-tune. One adapter class, :class:`DiffusersAdapter`, holds what they share; each
family is a handful of facts on a subclass (its block lists, where its image tokens are, how it is
called, how it patchifies).

Facts relied on, checked against the diffusers 0.42.1 sources (``models/transformers/``) and, for
Flux's older single blocks, against the pre-0.35 ``transformer_flux.py``:

Calls. Every model is called with the library's own keywords: ``model(hidden_states=x, timestep=t,
**conditioning)``, except HiDream (``timesteps=``) and Z-Image (``x=``, ``t=``). ``sra(model, x_t, x_s,
t, s, **conditioning)`` passes the conditioning by keyword, exactly as the training loop passes it to
the model, and ``t``/``s`` in the model's own convention (see the table of docs/backbones.md).

Blocks, numbered consecutively in the order the forward runs them:

- ``transformer_blocks``: SD3, QwenImage, CogView4, Sana, PixArt, DiT, LTX, CogVideoX, Mochi;
  then ``single_transformer_blocks``: Flux, Flux2, Chroma, HunyuanImage, HunyuanVideo.
- AuraFlow: ``joint_transformer_blocks`` then ``single_transformer_blocks``.
- HiDream: ``double_stream_blocks`` then ``single_stream_blocks`` (each a ``HiDreamBlock`` wrapping
  ``.block``; the wrapper is what the forward calls, so it is what is hooked).
- Wan, SkyReelsV2: ``blocks``.
- Lumina2, Z-Image: ``noise_refiner`` (image tokens only) then ``layers``; ``context_refiner`` (and
  Z-Image's ``siglip_refiner``) see only text or reference features and are not blocks. Likewise the
  text ``token_refiner`` inside HunyuanVideo/Image's ``context_embedder``.

Block outputs and where the image tokens are (``N`` = the number of image tokens of the call):

- ``(text, image)``: SD3 (the last block returns ``(None, image)``), Flux (>= 0.35, single blocks
  too), Flux2/Chroma/AuraFlow double blocks, QwenImage.
- ``(image, text)``: HunyuanVideo, HunyuanImage (single blocks too), CogVideoX, CogView4, Mochi,
  HiDream double blocks.
- image only: Wan, SkyReelsV2, LTX, Sana, PixArt, DiT.
- one merged ``[text; image]`` tensor: Flux2, Chroma and AuraFlow single blocks (AuraFlow's text
  stream starts with 8 learned register tokens), Flux single blocks before 0.35: the last ``N``.
- ``[image; text...]``: HiDream single blocks: the first ``N``. HiDream pads a non-square image to
  ``max_seq`` tokens (double blocks too): the first ``N`` are the real ones.
- Z-Image: ``[image; pad; caption]`` in ``layers`` and ``[image; pad]`` in ``noise_refiner``, the image
  padded to a multiple of 32 tokens: the first ``N``.
- Lumina2: ``[caption; image; padding]`` in ``layers``, the caption length per sample
  (``encoder_attention_mask[i].sum()``): sample ``i``'s image tokens start there.
- QwenImage (edit): ``hidden_states`` may hold the target's tokens followed by reference images'
  (``img_shapes[i]`` lists them): the first ``prod(img_shapes[0][0])`` are the target's.
- Flux, Flux2, Chroma (Kontext-style edit): ``hidden_states`` may hold the generated image's packed
  tokens followed by reference images' (``FluxKontextPipeline`` and ``Flux2Pipeline`` concatenate them
  along the sequence and crop the prediction to the first ones). ``img_ids`` tells them apart: the
  generated image's rows have a first coordinate of 0, a reference's 1 (Kontext) or 10, 20, ...
  (Flux2). The generated tokens must come first; any other layout is refused, not guessed.

``N`` is read from the model's input in the same call: ``hidden_states.shape[1]`` for packed inputs
(Flux family), the grid over the patch size for latents (``(H/p)(W/p)``, frames too for Z-Image).

Patchify (the clean latent in the model's token layout, for ``LatentAlignment``): the exact inverse of
each model's own unpatchify at the end of its forward. The target holds the channels the model
predicts, ``out_channels`` (``config.out_channels`` or, unset, ``in_channels``), not the input's: Wan
and SkyReelsV2 I2V (in 36, out 16), CogVideoX and HunyuanVideo I2V, Flux Fill (in 384, out 64 packed)
stack conditioning channels onto the noisy latent. DiT and PixArt with ``out_channels == 2 *
in_channels`` learn a variance in the second half (their pipelines keep the first): the target is
``in_channels``. Per token there are ``out_channels * prod(patch)`` values (each model's ``proj_out``). Per token, the values run ``(p, q, C)``
(channels last) for SD3, DiT, PixArt, AuraFlow, Sana, Lumina2, HiDream, Wan, SkyReelsV2, Mochi and
Z-Image, and ``(C, p, q)`` (channels first) for CogView4, HunyuanImage, HunyuanVideo and CogVideoX.
Models whose ``hidden_states`` are already packed tokens ``(B, N, C)`` (Flux, Flux2, Chroma,
QwenImage, LTX: the pipeline packs them) predict exactly those tokens, so ``patchify`` takes ``x0`` in
that same packed layout and returns it unchanged (a latent of another shape is refused). CogVideoX
takes ``(B, F, C, H, W)``, as its ``hidden_states``; Z-Image ``(B, C, F, H, W)``.

SRA-DTS (``SRADTS``, ``protocols.RunsTokenGroups``): one pass of the model's own forward per token group,
the group's image tokens gathered after the patch embedding, the blocks run on them alone, the pass ended
at ``proj_out`` (per token). Where each family's gather point and positions are (diffusers 0.42.1):
Flux and QwenImage embed packed tokens one by one with a Linear (``x_embedder``, ``img_in``), so the group's
tokens are gathered before the call; Flux's rotary positions come from ``img_ids`` (gathered rows), QwenImage's
from ``img_shapes`` inside the forward (``pos_embed``'s first output, gathered there), both one set for the
batch (the attention processors broadcast them over it). SD3, PixArt and DiT add their positional table
inside ``pos_embed`` (a conv patch embedding): gathered at its output. Wan: ``patch_embedding``'s output (flattened by
the forward into tokens) and ``rope``'s ``(1, N, 1, D)`` tables, which broadcast over the batch and so may be
gathered per sample. In all six the output norm and ``proj_out`` (DiT: ``proj_out_2``) act per token (adaLN modulation by the
sample's time embedding), and the text tokens enter every pass whole (joint attention or cross-attention).

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

import inspect
import math
import numbers
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..hooks import StopForward, _eager, _end_stopped_fsdp_forward, _in_backward
from ..module_state import restoring_model_state
from ..protocols import GroupPasses
from ..registry import Adapter, ModelCall, patchify_latent, register_adapter
from ._pertoken import DiffusersPerTokenTime  # per-token time in one pass (Wan, Flux, SD3): see _pertoken.py


def _is_diffusers(model: nn.Module, class_name: str) -> bool:
    # By class name and module, so that resolving any model never imports diffusers.
    return any(c.__name__ == class_name and c.__module__.startswith("diffusers.") for c in type(model).__mro__)


def _config(model: nn.Module, key: str, default: Any = None) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return default
    value = config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)
    return default if value is None else value


def _forward_default(model: nn.Module, name: str) -> Any:
    return inspect.signature(type(model).forward).parameters[name].default


class DiffusersAdapter(DiffusersPerTokenTime, Adapter):
    """Shared by the diffusers models. A family sets:

    - ``class_name``: the diffusers class it serves;
    - ``block_lists``: attribute paths of its block lists, in the order the forward runs them;
    - ``x_key``, ``t_key``: the forward's keywords for the latent and the time;
    - ``image_index``: the image stream's position in a block's tuple output;
    - ``merged``: ``None`` (every block's image stream holds only image tokens), ``"last"`` or
      ``"first"`` (a tensor output, or a padded stream, holds the ``N`` image tokens last / first;
      ``num_image_tokens`` says how many);
    - ``layout``: ``None`` (no fixed patch layout), ``"packed"`` (``hidden_states`` are already the
      tokens), ``"last"`` / ``"first"`` (a latent grid; a token's values channels last / first);
    - ``learned_sigma``: ``out_channels == 2 * in_channels`` means a predicted variance, not latent;
    - ``channel_axis``: the channel axis of a latent-grid ``hidden_states``.
    """

    class_name = ""
    block_lists: tuple[str, ...] = ("transformer_blocks",)
    x_key = "hidden_states"
    t_key = "timestep"
    image_index = 0
    merged: str | None = None
    layout: str | None = None
    learned_sigma = False
    channel_axis = 1

    def matches(self, model: nn.Module) -> bool:
        return _is_diffusers(model, self.class_name)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        found: list[nn.Module] = []
        for path in self.block_lists:
            found.extend(getattr(model, path, None) or ())
        return found

    def dim(self, model: nn.Module, block: nn.Module) -> int:
        inner = getattr(model, "inner_dim", None)
        if isinstance(inner, numbers.Integral):
            return int(inner)
        heads, head_dim = _config(model, "num_attention_heads"), _config(model, "attention_head_dim")
        if heads and head_dim:
            return int(heads) * int(head_dim)
        for key in ("hidden_size", "dim"):
            if _config(model, key):
                return int(_config(model, key))
        return super().dim(model, block)

    # ------------------------------------------------------------------ calls
    def forward(self, model: nn.Module, x: Tensor, t: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError(
                f"{type(model).__name__} takes its conditioning by keyword: got {len(args)} positional "
                "argument(s) after t, s; pass them as e.g. encoder_hidden_states=..., pooled_projections=..."
            )
        for key in (self.x_key, self.t_key):
            if key in kwargs:
                raise TypeError(
                    f"{key}= was passed to sra(...), but sra gives {type(model).__name__} {self.x_key}=x_t/x_s and "
                    f"{self.t_key}=t/s itself: remove it"
                )
        return model(**{self.x_key: x, self.t_key: t}, **kwargs)

    def model_input(self, model: nn.Module, call: ModelCall | None) -> Any:
        value = call.get(self.x_key, 0) if call is not None else None
        if value is None:
            raise ValueError(
                f"the number of image tokens of {type(model).__name__} comes from its input {self.x_key}=, "
                "which this forward did not receive"
            )
        return value

    # ------------------------------------------------------------------ tokens
    def num_image_tokens(self, model: nn.Module, call: ModelCall | None) -> int:
        """How many image tokens the call's input makes (for ``merged`` families)."""
        raise NotImplementedError

    def num_target_tokens(self, model: nn.Module, call: ModelCall | None) -> int | None:
        """How many of the image tokens are the generated image's, which come first (the rest are
        reference images' an edit model sees); None: all of them."""
        return None

    def tokens(self, output: Any, model: nn.Module, call: ModelCall | None = None) -> Tensor:
        stream = output[self.image_index] if isinstance(output, (tuple, list)) else output
        if self.merged is not None:
            n = self.num_image_tokens(model, call)
            if stream.shape[1] < n:
                raise RuntimeError(
                    f"a block of {type(model).__name__} returned {stream.shape[1]} tokens, fewer than the {n} image "
                    f"tokens of its input: adapter {self.name!r} does not fit this model"
                )
            if stream.shape[1] > n:
                stream = stream[:, -n:] if self.merged == "last" else stream[:, :n]
        target = self.num_target_tokens(model, call)
        return stream if target is None or target == stream.shape[1] else stream[:, :target]

    # ------------------------------------------------------------------ patchify
    def patch_size(self, model: nn.Module) -> int | tuple[int, ...]:
        return int(_config(model, "patch_size"))

    def latent(self, model: nn.Module, x0: Tensor) -> Tensor:
        """``x0`` as ``(B, C, H, W)`` or ``(B, C, F, H, W)``, the grid ``patchify_latent`` cuts."""
        return x0

    def predicted_channels(self, model: nn.Module) -> int:
        """Latent channels the model predicts (for packed models: before packing)."""
        channels = int(_config(model, "in_channels"))
        out = int(_config(model, "out_channels", channels))
        return channels if self.learned_sigma and out == 2 * channels else out

    def patch_values(self, model: nn.Module) -> int:
        """Values per patch and channel: the product of the patch sizes (``p * p`` for an int)."""
        patch = self.patch_size(model)
        return int(patch) ** 2 if isinstance(patch, numbers.Integral) else math.prod(int(p) for p in patch)

    def patch_dim(self, model: nn.Module) -> int:
        """Values per target token: the predicted channels times the patch, what ``proj_out`` gives a token."""
        if self.layout is None:
            return super().patch_dim(model)
        return self.predicted_channels(model) * self.patch_values(model)

    def target_shape(self, model: nn.Module, x_t: Tensor, call: ModelCall) -> tuple[int, ...]:
        if self.layout is None or not isinstance(x_t, Tensor):
            return super().target_shape(model, x_t, call)
        if self.layout == "packed":
            if x_t.dim() != 3:
                return tuple(x_t.shape)
            inputs = ModelCall(call.args, {**call.kwargs, self.x_key: x_t})
            n = self.num_target_tokens(model, inputs)
            return (x_t.shape[0], x_t.shape[1] if n is None else n, self.patch_dim(model))
        shape = list(x_t.shape)
        if len(shape) >= 4:  # a latent grid; anything else is refused by patchify with its own message
            shape[self.channel_axis] = self.predicted_channels(model)
        return tuple(shape)

    def patchify(self, model: nn.Module, x0: Tensor) -> Tensor:
        if self.layout is None:
            return super().patchify(model, x0)
        if not isinstance(x0, Tensor):
            raise TypeError(f"x0={type(x0).__name__} is not accepted: use a tensor laid out as {type(model).__name__}'s {self.x_key}")
        if self.layout == "packed":
            width = self.patch_dim(model)
            if x0.dim() != 3 or x0.shape[-1] != width:
                raise ValueError(
                    f"x0 of shape {tuple(x0.shape)} is not accepted for {type(model).__name__}: its {self.x_key} are packed "
                    f"tokens, so give x0 packed the same way, (B, N, {width}): the clean latent of the "
                    f"{self.predicted_channels(model)} channels it predicts, as the pipeline packs latents for the model"
                )
            return x0
        latent = self.latent(model, x0)
        channels = self.predicted_channels(model)
        if latent.dim() >= 2 and latent.shape[1] != channels:
            taken = int(_config(model, "in_channels"))
            why = "" if taken == channels else f" (its input takes {taken}: the rest are conditioning channels, not target)"
            raise ValueError(
                f"x0 of shape {tuple(x0.shape)} is not accepted for {type(model).__name__}: it predicts {channels} "
                f"latent channels{why}; pass the clean latent of those channels"
            )
        return patchify_latent(latent, self.patch_size(model), channels_last=self.layout == "last")

    # ------------------------------------------------------------------ SRA-DTS: separated group passes
    # ``RunsTokenGroups`` (``sra_plugin.protocols``). One pass of the model's own forward per token group: the
    # group's image tokens are gathered right after the family's patch (and position) embedding, any rotary
    # positions are gathered the same way, the blocks run on those tokens only at the group's scalar time,
    # and the pass ends at ``proj_out``, whose per-token output is what the passes return (the model's
    # unpatchify, which needs every token, is done by ``unpatchify`` after the groups are put back in order).
    # Text tokens are the call's own, whole, in every pass. A family opts in by setting
    # ``group_time_scale``; the others refuse in ``group_support`` with ``group_refusal``.
    group_time_scale: float | None = None
    """The model's time for the linear path's t in [0, 1] (1 = noise): 1000 where the model takes sigma * 1000,
    1 where it takes sigma; None: this family has no per-group pass."""
    group_refusal = (
        "its separated token-group passes are not written: SRADTS runs on the diffusers Flux, SD3/SD3.5, QwenImage, "
        "Wan, PixArt and DiT transformers (each needs its own gather point after the patch embedding and its own "
        "positional inputs gathered per group)"
    )
    shared_positions = False
    """True where the forward builds one set of rotary positions for the whole batch (Flux, QwenImage): samples
    whose groups differ then run in passes of their own."""
    group_batch_keys: tuple[str, ...] = ()
    """Conditioning keywords with one entry per sample, sliced when samples run apart (``shared_positions``)."""
    group_refused_keys: dict[str, str] = {}
    """Conditioning keywords a pass on a subset of the tokens cannot take, and why."""
    group_output = "proj_out"
    """The per-token output projection, whose output a pass returns (the last module before unpatchify)."""

    def group_support(self, model: nn.Module) -> str | None:
        return self.group_refusal if self.group_time_scale is None else None

    def num_tokens(self, model: nn.Module, x: Tensor) -> int:
        channels = int(_config(model, "in_channels"))
        if self.layout == "packed":
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != channels:
                raise ValueError(
                    f"x0 of shape {tuple(getattr(x, 'shape', ()))} is not accepted by {type(model).__name__}: use packed "
                    f"tokens (B, N, {channels}), laid out as its {self.x_key}"
                )
            return int(x.shape[1])
        patch = self.patch_size(model)
        patch = (int(patch),) * 2 if isinstance(patch, numbers.Integral) else tuple(int(p) for p in patch)
        if not isinstance(x, Tensor) or x.dim() != 2 + len(patch) or x.shape[1] != channels or any(
                n % p for n, p in zip(x.shape[2:], patch)):
            grid = "(B, C, H, W)" if len(patch) == 2 else "(B, C, F, H, W)"
            raise ValueError(
                f"x0 of shape {tuple(getattr(x, 'shape', ()))} is not accepted by {type(model).__name__}: use {grid} with "
                f"C = {channels} and sizes multiples of the patch {patch}"
            )
        return _grid_tokens(x, patch)

    def unpatchify(self, model: nn.Module, tokens: Tensor, x: Tensor | None = None) -> Tensor:
        """Output tokens ``(B, N, P)`` in token order -> the model's output: unchanged for packed families,
        the latent grid of ``x`` (the model input) for the others, values ``(p..., C)`` per token."""
        if self.layout == "packed":
            return tokens
        if not isinstance(x, Tensor):
            raise TypeError(f"x={type(x).__name__} is not accepted: {type(model).__name__}'s output grid comes from its input, give it")
        patch = self.patch_size(model)
        patch = (int(patch),) * (x.dim() - 2) if isinstance(patch, numbers.Integral) else tuple(int(p) for p in patch)
        return _grid_from_tokens(tokens, tuple(x.shape[2:]), patch)

    def _check_group_call(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        name = type(model).__name__
        if args:
            raise TypeError(
                f"{name} takes its conditioning by keyword: got {len(args)} positional argument(s) after x0, noise; "
                "pass them as e.g. encoder_hidden_states=..."
            )
        for key in (self.x_key, self.t_key):
            if key in kwargs:
                raise TypeError(f"{key}= was passed, but SRADTS gives {name} {self.x_key}= and {self.t_key}= itself: remove it")
        for key, why in self.group_refused_keys.items():
            if kwargs.get(key) is not None:
                raise ValueError(f"{key}= is not accepted by SRADTS on {name}: {why}")

    def _group_inputs(self, model: nn.Module, x: Tensor, index: Tensor, kwargs: dict) -> dict:
        """The call's input keywords for one pass: the latent as given (gathered after the embedding by
        ``_group_hooks``), or, for packed families, the group's tokens themselves."""
        return {self.x_key: x}

    def _group_hooks(self, model: nn.Module, index: Tensor) -> list[tuple[nn.Module, Any]]:
        """``(module, fn)``: ``module``'s output is replaced by ``fn(output)`` in a pass, to gather the group's
        tokens ``index`` ``(B, n)`` after the embedding, and its positions."""
        return []

    def _stream(self, output: Any, n: int) -> Tensor:
        """The image tokens (n of them) of a block's output in a group pass."""
        stream = output[self.image_index] if isinstance(output, (tuple, list)) else output
        if self.merged is not None and stream.shape[1] > n:
            stream = stream[:, -n:] if self.merged == "last" else stream[:, :n]
        return stream

    def _chunks(self, index: Tensor) -> list[tuple[slice, Tensor]]:
        """Samples that can share a pass: all of them, unless the family's positions are one set for the
        batch and the samples' groups differ (then each sample alone)."""
        if not self.shared_positions or bool((index == index[:1]).all()):
            return [(slice(None), index)]
        return [(slice(b, b + 1), index[b:b + 1]) for b in range(index.shape[0])]

    def _rows(self, kwargs: dict, rows: slice, batch: int) -> dict:
        if rows == slice(None):
            return dict(kwargs)
        out = dict(kwargs)
        for key in self.group_batch_keys:
            value = out.get(key)
            if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch:
                out[key] = value[rows]
            elif isinstance(value, (list, tuple)) and len(value) == batch:
                out[key] = value[rows]
        return out

    def group_forward(self, model: nn.Module, inputs: Sequence[Tensor], times: Sequence[Tensor],
                      token_index: Sequence[Tensor], args: tuple, kwargs: dict, taps: Sequence[int],
                      output: bool) -> GroupPasses:
        self._check_group_call(model, args, kwargs)
        blocks = self.blocks(model)
        last = len(blocks) if output else max(taps)
        proj = getattr(model, self.group_output, None)
        if output and not isinstance(proj, nn.Module):
            raise RuntimeError(f"{type(model).__name__} has no {self.group_output}: adapter {self.name!r} does not fit this model")
        passes = GroupPasses([] if output else None, {k: [] for k in taps}, (), dict(kwargs))
        for x, t, index in zip(inputs, times, token_index):
            found: dict[Any, list[Tensor]] = {k: [] for k in (*taps, "out")}
            for rows, part in self._chunks(index):
                self._one_pass(model, x[rows], t[rows], part, self._rows(kwargs, rows, x.shape[0]), blocks, taps,
                               last, proj if output else None, found)
            for k in taps:
                passes.taps[k].append(torch.cat(found[k]) if len(found[k]) > 1 else found[k][0])
            if output:
                passes.outputs.append(torch.cat(found["out"]) if len(found["out"]) > 1 else found["out"][0])
        return passes

    def _one_pass(self, model: nn.Module, x: Tensor, t: Tensor, index: Tensor, kwargs: dict, blocks: list,
                  taps: Sequence[int], last: int, proj: nn.Module | None, found: dict) -> None:
        """One forward of the model on the group's tokens; block taps and ``proj``'s output go into ``found``."""
        n = index.shape[1]
        seen: dict[Any, Tensor] = {}

        def keep(key: Any, module: nn.Module, read: Any, stop: bool) -> Any:
            def hook(fired_on: nn.Module, hook_args: tuple, out: Any) -> None:
                if fired_on is not module or _in_backward() or key in seen:
                    return None
                seen[key] = read(out)
                if stop:
                    raise StopForward
                return None
            return module.register_forward_hook(hook)

        scale = torch.as_tensor(self.group_time_scale, dtype=t.dtype, device=t.device)
        call = {**kwargs, **self._group_inputs(model, x, index, kwargs), self.t_key: t * scale}
        gathers = self._group_hooks(model, index)
        tapped = [blocks[k - 1] for k in sorted(set(taps))]
        # modules compiled in place run eagerly here: their compiled call would ignore these hooks
        with _eager(model, *[m for m, _ in gathers], *tapped, *([proj] if proj is not None else [])), \
                restoring_model_state(model):
            handles = [_on_output(module, fn) for module, fn in gathers]
            handles += [keep(k, blocks[k - 1], lambda out: self._stream(out, n), proj is None and k == last)
                        for k in sorted(set(taps))]
            if proj is not None:
                handles.append(keep("out", proj, lambda out: out, True))
            try:
                model(**call)
            except StopForward:
                _end_stopped_fsdp_forward(model)
            finally:
                for handle in handles:
                    handle.remove()
        missing = [k for k in (*taps, *(["out"] if proj is not None else [])) if k not in seen]
        if missing:
            raise RuntimeError(
                f"{type(model).__name__}'s forward did not run {missing} in a group pass (skip_layers=, or a forward "
                f"that is not {self.class_name}'s): adapter {self.name!r} cannot take those tokens"
            )
        for key, value in seen.items():
            if value.shape[1] != n:
                raise RuntimeError(
                    f"{type(model).__name__} gave {value.shape[1]} tokens at {key!r} in a pass on {n} tokens: adapter "
                    f"{self.name!r} does not gather this model's tokens"
                )
            found[key].append(value)


def _on_output(module: nn.Module, fn: Any) -> Any:
    """A forward hook replacing ``module``'s output by ``fn(output)``, on this module only, never in backward."""
    def hook(fired_on: nn.Module, args: tuple, output: Any) -> Any:
        if fired_on is module and not _in_backward():
            return fn(output)
        return None
    return module.register_forward_hook(hook)


def _gather(tokens: Tensor, index: Tensor) -> Tensor:
    """``tokens`` ``(B, N, ...)`` -> ``(B, n, ...)``: each sample's rows ``index`` ``(B, n)``; a batch of one
    in ``tokens`` (positions shared by the batch) is gathered for every sample."""
    if tokens.shape[0] != index.shape[0]:
        tokens = tokens.expand(index.shape[0], *tokens.shape[1:])
    shaped = index.reshape(*index.shape, *([1] * (tokens.dim() - 2))).expand(-1, -1, *tokens.shape[2:])
    return tokens.gather(1, shaped)


def _grid_from_tokens(tokens: Tensor, extent: tuple[int, ...], patch: tuple[int, ...]) -> Tensor:
    """The inverse of ``patchify_latent(..., channels_last=True)``: ``(B, N, prod(patch) * C)`` with values
    ``(p..., C)`` per token, tokens row-major over the grid -> ``(B, C, *extent)``."""
    grid = [n // p for n, p in zip(extent, patch)]
    b, c = tokens.shape[0], tokens.shape[-1] // math.prod(patch)
    x = tokens.reshape(b, *grid, *patch, c)
    k = len(grid)
    order = [0, 2 * k + 1] + [a for i in range(k) for a in (1 + i, 1 + k + i)]  # (B, C, g1, p1, g2, p2, ...)
    return x.permute(order).reshape(b, c, *extent)


def _packed_tokens(adapter: DiffusersAdapter, model: nn.Module, call: ModelCall | None) -> int:
    x = adapter.model_input(model, call)
    if not (isinstance(x, Tensor) and x.dim() == 3):
        raise ValueError(f"{type(model).__name__} expects {adapter.x_key} as packed tokens (B, N, C); got {getattr(x, 'shape', type(x).__name__)}")
    return int(x.shape[1])


def _grid_tokens(x: Tensor, patch: Sequence[int]) -> int:
    """Image tokens of a latent ``(..., H, W)`` or ``(..., F, H, W)`` cut into patches ``patch`` (trailing dims)."""
    return math.prod(int(n) // int(p) for n, p in zip(x.shape[-len(patch):], patch))


# ---------------------------------------------------------------------- image models
class SD3Adapter(DiffusersAdapter):
    """SRA-DTS: ``pos_embed`` (the conv patch embedding with the positional table, cropped to the grid, added)
    is where the group's tokens are gathered; the text tokens join every pass whole (joint attention)."""

    name = "diffusers-sd3"
    class_name = "SD3Transformer2DModel"
    image_index = 1
    layout = "last"
    group_time_scale = 1000.0
    group_refused_keys = {
        "block_controlnet_hidden_states": "ControlNet residuals hold one entry per image token of the whole image; a group pass holds only its group's tokens",
        "skip_layers": "it leaves blocks out (skip-layer guidance, for sampling); SRADTS trains on every block",
    }

    def _group_hooks(self, model: nn.Module, index: Tensor) -> list[tuple[nn.Module, Any]]:
        return [(model.pos_embed, lambda out: _gather(out, index))]


class FluxAdapter(DiffusersAdapter):
    """Blocks return ``(text, image)``; before diffusers 0.35 single blocks returned one ``[text; image]`` tensor.

    SRA-DTS: the tokens are packed and embedded one by one (``x_embedder`` is a Linear), and the rotary
    positions come from ``img_ids``, so a group pass is the model's own forward on the group's tokens with
    their ``img_ids`` rows, the text tokens (``txt_ids``) whole. ``img_ids`` is one set for the whole batch,
    so samples whose groups differ run in passes of their own (``shared_positions``). Edit calls (reference
    image tokens, ``img_ids[:, 0] != 0``) are refused.
    """

    name = "diffusers-flux"
    class_name = "FluxTransformer2DModel"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    image_index = 1
    merged = "last"
    layout = "packed"
    group_time_scale = 1.0  # Flux's forward multiplies the time by 1000 itself
    shared_positions = True
    group_batch_keys = ("encoder_hidden_states", "pooled_projections", "guidance")
    group_refused_keys = {"controlnet_block_samples": "ControlNet residuals hold one entry per image token of the whole image; a group pass holds only its group's tokens",
                          "controlnet_single_block_samples": "ControlNet residuals hold one entry per image token of the whole image; a group pass holds only its group's tokens"}

    def _group_inputs(self, model: nn.Module, x: Tensor, index: Tensor, kwargs: dict) -> dict:
        name = type(model).__name__
        ids = kwargs.get("img_ids")
        for key in ("img_ids", "txt_ids"):
            if not isinstance(kwargs.get(key), Tensor):
                raise TypeError(f"{key}={type(kwargs.get(key)).__name__} is not accepted: {name} with SRADTS needs {key}= as a tensor, as its forward")
        ids = ids[0] if ids.dim() == 3 else ids
        if _generated_prefix(ids, x.shape[1], name) is not None:
            raise ValueError(
                f"img_ids marks some of the {x.shape[1]} tokens of {name} as a reference image's (img_ids[:, 0] != 0): "
                "SRADTS does not split edit calls into groups; give only the generated image's tokens"
            )
        return {self.x_key: _gather(x, index), "img_ids": ids[index[0]]}

    def num_image_tokens(self, model: nn.Module, call: ModelCall | None) -> int:
        return _packed_tokens(self, model, call)

    def num_target_tokens(self, model: nn.Module, call: ModelCall | None) -> int | None:
        ids = call.get("img_ids") if call is not None else None
        if not isinstance(ids, Tensor):
            return None
        return _generated_prefix(ids, _packed_tokens(self, model, call), type(model).__name__)


@torch.compiler.disable  # reads values of img_ids: under torch.compile a clean graph break, not a traced .item()
def _generated_prefix(ids: Tensor, n_image: int, model: str) -> int | None:
    """How many of the ``n_image`` tokens are the generated image's (first, ``img_ids[:, 0] == 0``); None: all."""
    ids = ids[0] if ids.dim() == 3 else ids
    if ids.dim() != 2 or ids.shape[0] != n_image:
        raise ValueError(
            f"img_ids of shape {tuple(ids.shape)} does not fit hidden_states' {n_image} tokens: "
            f"{model} needs one id row per image token"
        )
    generated = ids[:, 0] == 0
    n = int(generated.sum())
    if n == n_image:
        if torch.unique(ids, dim=0).shape[0] < n_image:  # two images on one grid: a reference not told apart
            raise ValueError(
                f"img_ids gives several of the {n_image} image tokens of {model} the same position, all "
                "with img_ids[:, 0] == 0: SRA cannot tell the generated image's tokens from a reference image's. Give "
                "the reference tokens img_ids[:, 0] != 0, after the generated ones (as FluxKontextPipeline does)"
            )
        return None
    if n == 0 or not bool(generated[:n].all()):
        raise ValueError(
            f"img_ids does not say which of the {n_image} image tokens of {model} are the generated "
            f"image's: for an edit call SRA needs them first in hidden_states, with img_ids[:, 0] == 0, and the "
            "reference images' after them with img_ids[:, 0] != 0 (as FluxKontextPipeline and Flux2Pipeline build them); "
            f"here {n} rows have img_ids[:, 0] == 0 {'but not as the first rows' if n else ''}".rstrip()
        )
    return n


class Flux2Adapter(FluxAdapter):
    name = "diffusers-flux2"
    class_name = "Flux2Transformer2DModel"
    group_time_scale = None  # Flux's group passes, not checked on Flux2's forward
    group_refusal = DiffusersAdapter.group_refusal + "; Flux2 is not Flux: its ids, modulation and time are its own"


class ChromaAdapter(FluxAdapter):
    name = "diffusers-chroma"
    class_name = "ChromaTransformer2DModel"
    group_time_scale = None
    group_refusal = DiffusersAdapter.group_refusal + "; Chroma is not Flux: its modulation and masks are its own"


class QwenImageAdapter(DiffusersAdapter):
    """SRA-DTS: packed tokens embedded one by one (``img_in``, a Linear), so the group's tokens are gathered
    before the call; the rotary positions come from ``img_shapes`` inside the forward (``pos_embed``'s image
    part, one set for the batch), gathered per group at ``pos_embed``'s output. Samples whose groups differ
    run in passes of their own. Edit calls (reference images in ``img_shapes``) and the edit models'
    ``zero_cond_t`` (modulation chosen per token by its position among the images) are refused."""

    name = "diffusers-qwenimage"
    class_name = "QwenImageTransformer2DModel"
    image_index = 1
    merged = "first"
    layout = "packed"
    group_time_scale = 1.0  # the forward takes sigma (its time projection scales by 1000)
    shared_positions = True
    group_batch_keys = ("encoder_hidden_states", "encoder_hidden_states_mask", "guidance", "additional_t_cond", "img_shapes")
    group_refused_keys = {"controlnet_block_samples": "ControlNet residuals hold one entry per image token of the whole image; a group pass holds only its group's tokens"}

    def group_support(self, model: nn.Module) -> str | None:
        if _config(model, "zero_cond_t", False):
            return ("zero_cond_t=True (the edit models) modulates each token by where it sits among the target and "
                    "reference images, counted over the whole sequence; a group pass holds only some of the target's tokens")
        if type(getattr(model, "pos_embed", None)).__name__ != "QwenEmbedRope":
            return f"its pos_embed is {type(getattr(model, 'pos_embed', None)).__name__}, not the QwenEmbedRope whose image positions the group passes gather"
        return super().group_support(model)

    def _group_inputs(self, model: nn.Module, x: Tensor, index: Tensor, kwargs: dict) -> dict:
        shapes = kwargs.get("img_shapes")
        accepted = f"one image per sample, [[(1, h, w)]] * B with h * w = {x.shape[1]} (the tokens of x0)"
        if not isinstance(shapes, (list, tuple)) or len(shapes) != x.shape[0]:
            raise ValueError(f"img_shapes={shapes!r} is not accepted by SRADTS on {type(model).__name__}: use {accepted}")
        for entry in shapes:
            images = list(entry) if isinstance(entry, (list, tuple)) and entry and isinstance(entry[0], (list, tuple)) else [entry]
            if len(images) != 1 or math.prod(int(n) for n in images[0]) != x.shape[1]:
                raise ValueError(
                    f"img_shapes entry {entry!r} is not accepted by SRADTS on {type(model).__name__}: use {accepted} "
                    "(edit calls with reference images are not split into groups)"
                )
        return {self.x_key: _gather(x, index)}

    def _group_hooks(self, model: nn.Module, index: Tensor) -> list[tuple[nn.Module, Any]]:
        rows = index[0]  # one set of positions per pass (``shared_positions``)
        return [(model.pos_embed, lambda out: (out[0][rows], *out[1:]))]

    def num_image_tokens(self, model: nn.Module, call: ModelCall | None) -> int:
        shapes = call.get("img_shapes") if call is not None else None
        if shapes:
            first = shapes[0]
            target = first[0] if isinstance(first, (list, tuple)) and first and isinstance(first[0], (list, tuple)) else first
            return math.prod(int(n) for n in target)
        return _packed_tokens(self, model, call)

    def num_target_tokens(self, model: nn.Module, call: ModelCall | None) -> int | None:
        return self.num_image_tokens(model, call)


class AuraFlowAdapter(DiffusersAdapter):
    name = "diffusers-auraflow"
    class_name = "AuraFlowTransformer2DModel"
    block_lists = ("joint_transformer_blocks", "single_transformer_blocks")
    image_index = 1
    merged = "last"
    layout = "last"

    def num_image_tokens(self, model: nn.Module, call: ModelCall | None) -> int:
        p = self.patch_size(model)
        return _grid_tokens(self.model_input(model, call), (p, p))


class HiDreamAdapter(DiffusersAdapter):
    name = "diffusers-hidream"
    class_name = "HiDreamImageTransformer2DModel"
    block_lists = ("double_stream_blocks", "single_stream_blocks")
    t_key = "timesteps"
    merged = "first"
    layout = "last"

    def num_image_tokens(self, model: nn.Module, call: ModelCall | None) -> int:
        x = self.model_input(model, call)
        if isinstance(x, Tensor) and x.dim() == 4:
            p = self.patch_size(model)
            return _grid_tokens(x, (p, p))
        sizes = call.get("img_sizes") if call is not None else None
        counts = {int(h) * int(w) for h, w in (sizes.tolist() if isinstance(sizes, Tensor) else sizes or ())}
        if len(counts) != 1:
            raise ValueError(
                f"{type(model).__name__} was called with packed hidden_states and img_sizes={sizes!r}: SRA needs "
                "img_sizes with the same size for every sample"
            )
        return counts.pop()

    def latent(self, model: nn.Module, x0: Tensor) -> Tensor:
        if x0.dim() != 4:
            raise ValueError(f"x0 of shape {tuple(x0.shape)} is not accepted for {type(model).__name__}: use the latent (B, C, H, W)")
        return x0


class HunyuanImageAdapter(DiffusersAdapter):
    name = "diffusers-hunyuanimage"
    class_name = "HunyuanImageTransformer2DModel"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    layout = "first"

    def patch_size(self, model: nn.Module) -> tuple[int, ...]:
        return tuple(int(p) for p in _config(model, "patch_size"))


class CogView4Adapter(DiffusersAdapter):
    name = "diffusers-cogview4"
    class_name = "CogView4Transformer2DModel"
    layout = "first"


class SanaAdapter(DiffusersAdapter):
    name = "diffusers-sana"
    class_name = "SanaTransformer2DModel"
    layout = "last"


class Lumina2Adapter(DiffusersAdapter):
    name = "diffusers-lumina2"
    class_name = "Lumina2Transformer2DModel"
    block_lists = ("noise_refiner", "layers")
    layout = "last"

    def tokens(self, output: Any, model: nn.Module, call: ModelCall | None = None) -> Tensor:
        p = self.patch_size(model)
        n = _grid_tokens(self.model_input(model, call), (p, p))
        if output.shape[1] == n:  # noise_refiner: image tokens only
            return output
        mask = call.get("encoder_attention_mask", 3) if call is not None else None
        if not isinstance(mask, Tensor):
            raise ValueError(f"{type(model).__name__}'s image tokens follow the caption, whose length comes from encoder_attention_mask=, which this forward did not receive")
        start = mask.sum(dim=1).to(device=output.device, dtype=torch.long)  # each sample's caption length
        index = (start[:, None] + torch.arange(n, device=output.device))[..., None].expand(-1, -1, output.shape[-1])
        return output.gather(1, index)


class ZImageAdapter(DiffusersAdapter):
    name = "diffusers-zimage"
    class_name = "ZImageTransformer2DModel"
    block_lists = ("noise_refiner", "layers")
    x_key = "x"
    t_key = "t"
    merged = "first"
    layout = "last"

    def _patch(self, model: nn.Module, call: ModelCall | None = None) -> tuple[int, int, int]:
        p = call.get("patch_size") if call is not None else None
        pf = call.get("f_patch_size") if call is not None else None
        p = _forward_default(model, "patch_size") if p is None else p
        pf = _forward_default(model, "f_patch_size") if pf is None else pf
        return int(pf), int(p), int(p)

    def num_image_tokens(self, model: nn.Module, call: ModelCall | None) -> int:
        x = self.model_input(model, call)
        images = list(x) if isinstance(x, (list, tuple)) else list(x.unbind(0)) if isinstance(x, Tensor) and x.dim() == 5 else None
        if not images or not all(isinstance(i, Tensor) and i.dim() == 4 for i in images):
            raise ValueError(f"{type(model).__name__} x= must be images (C, F, H, W), stacked or in a list, for SRA")
        counts = {_grid_tokens(i, self._patch(model, call)) for i in images}
        if len(counts) != 1:
            raise ValueError(
                f"x= holds images of {len(counts)} different sizes ({sorted(counts)} tokens): "
                f"{type(model).__name__} with SRA needs one image size per batch (tokens (B, N, D))"
            )
        return counts.pop()

    def patch_size(self, model: nn.Module) -> tuple[int, int, int]:
        return self._patch(model)

    def patch_dim(self, model: nn.Module) -> int:
        # One embedder per patch size, in all_x_embedder["{p}-{pf}"]: the default patch size's.
        pf, p, _ = self._patch(model)
        return int(model.all_x_embedder[f"{p}-{pf}"].in_features)

    def latent(self, model: nn.Module, x0: Any) -> Tensor:
        if x0.dim() != 5:
            raise ValueError(f"x0 of shape {tuple(x0.shape)} is not accepted for {type(model).__name__}: use (B, C, F, H, W), as its x=")
        return x0


class PixArtAdapter(DiffusersAdapter):
    """SRA-DTS: gathered at ``pos_embed``'s output (conv patch embedding plus its sin-cos table); the text
    comes in by cross-attention, whole in every pass. ``attention_mask`` (over the image tokens) is refused.
    PixArt is a DDPM model: SRADTS trains it on the linear path, t * 1000 as its timestep."""

    name = "diffusers-pixart"
    class_name = "PixArtTransformer2DModel"
    layout = "last"
    learned_sigma = True
    group_time_scale = 1000.0
    group_refused_keys = {"attention_mask": "it masks the image tokens of the whole image; a group pass holds only its group's tokens"}

    def _group_hooks(self, model: nn.Module, index: Tensor) -> list[tuple[nn.Module, Any]]:
        return [(model.pos_embed, lambda out: _gather(out, index))]


class DiTTransformerAdapter(DiffusersAdapter):
    """The teacher sees the labels as passed; the student's blocks drop them each on their own (module docstring).

    SRA-DTS: gathered at ``pos_embed``'s output, as PixArt; the pass ends at ``proj_out_2`` (per token). Refused
    while any block drops labels itself (``norm1.emb.class_embedder.dropout_prob > 0``, the default): each
    block draws its own dropout on every call, so the groups' passes would not see the same labels."""

    name = "diffusers-dit"
    class_name = "DiTTransformer2DModel"
    layout = "last"
    learned_sigma = True
    group_time_scale = 1000.0
    group_output = "proj_out_2"

    def group_support(self, model: nn.Module) -> str | None:
        dropping = [i for i, block in enumerate(getattr(model, "transformer_blocks", ()))
                    if getattr(getattr(getattr(block.norm1, "emb", None), "class_embedder", None), "dropout_prob", 0) > 0]
        if dropping:
            return (f"its blocks {dropping} drop class labels for classifier-free guidance themselves "
                    "(norm1.emb.class_embedder.dropout_prob > 0), each block with its own draw on every call, so the two "
                    "groups' passes would see different labels; drop labels in the data pipeline (set them to num_classes) "
                    "and set block.norm1.emb.class_embedder.dropout_prob = 0.0 on every block")
        return super().group_support(model)

    def _group_hooks(self, model: nn.Module, index: Tensor) -> list[tuple[nn.Module, Any]]:
        return [(model.pos_embed, lambda out: _gather(out, index))]


# ---------------------------------------------------------------------- video models
class WanAdapter(DiffusersAdapter):
    """SRA-DTS: the group's video tokens are gathered at ``patch_embedding``'s output (a Conv3d: handed on as
    ``(B, C, n, 1, 1)``, which the forward flattens into the ``(B, n, C)`` tokens), and the rotary table
    (``rope``'s output, computed from the latent's shape, ``(1, N, 1, D)``) per sample at the same rows, so the
    samples of a batch keep groups of their own in one pass. Image-to-video models (more input channels than
    output: conditioning stacked onto the noisy latent) are refused."""

    name = "diffusers-wan"
    class_name = "WanTransformer3DModel"
    block_lists = ("blocks",)
    layout = "last"
    group_time_scale = 1000.0

    def patch_size(self, model: nn.Module) -> tuple[int, ...]:
        return tuple(int(p) for p in _config(model, "patch_size"))

    def group_support(self, model: nn.Module) -> str | None:
        reason = super().group_support(model)
        if reason is None and int(_config(model, "in_channels")) != self.predicted_channels(model):
            return (f"in_channels={_config(model, 'in_channels')} but out_channels={self.predicted_channels(model)}: "
                    "conditioning channels are stacked onto the noisy latent (image-to-video), and SRADTS builds every "
                    "input channel from x0 and noise")
        return reason

    def _group_hooks(self, model: nn.Module, index: Tensor) -> list[tuple[nn.Module, Any]]:
        def tokens(out: Tensor) -> Tensor:
            flat = out.flatten(2)  # (B, C, N)
            return flat.gather(2, index[:, None, :].expand(-1, flat.shape[1], -1))[..., None, None]

        def rotary(out: tuple) -> tuple:
            return tuple(_gather(f, index) for f in out)  # (1, N, 1, D) -> (B, n, 1, D)

        return [(model.patch_embedding, tokens), (model.rope, rotary)]


class SkyReelsV2Adapter(WanAdapter):
    name = "diffusers-skyreels-v2"
    class_name = "SkyReelsV2Transformer3DModel"
    group_time_scale = None
    group_refusal = DiffusersAdapter.group_refusal + "; SkyReelsV2 is not Wan: its forward (diffusion forcing) is its own"


class HunyuanVideoAdapter(DiffusersAdapter):
    name = "diffusers-hunyuanvideo"
    class_name = "HunyuanVideoTransformer3DModel"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    layout = "first"

    def patch_size(self, model: nn.Module) -> tuple[int, int, int]:
        p = int(_config(model, "patch_size"))
        return int(_config(model, "patch_size_t", 1)), p, p


class LTXVideoAdapter(DiffusersAdapter):
    name = "diffusers-ltx"
    class_name = "LTXVideoTransformer3DModel"
    layout = "packed"

    def patch_values(self, model: nn.Module) -> int:
        return 1  # the pipeline patchifies; proj_out gives a token out_channels values


class CogVideoXAdapter(DiffusersAdapter):
    name = "diffusers-cogvideox"
    class_name = "CogVideoXTransformer3DModel"
    layout = "first"
    channel_axis = 2  # hidden_states (B, F, C, H, W)

    def patch_size(self, model: nn.Module) -> tuple[int, int, int]:
        p = int(_config(model, "patch_size"))
        return int(_config(model, "patch_size_t", 1)), p, p

    def latent(self, model: nn.Module, x0: Tensor) -> Tensor:
        if x0.dim() != 5:
            raise ValueError(f"x0 of shape {tuple(x0.shape)} is not accepted for {type(model).__name__}: use (B, F, C, H, W), as its hidden_states")
        return x0.transpose(1, 2)  # (B, F, C, H, W) -> (B, C, F, H, W)


class MochiAdapter(DiffusersAdapter):
    name = "diffusers-mochi"
    class_name = "MochiTransformer3DModel"
    layout = "last"

    def patch_size(self, model: nn.Module) -> tuple[int, int, int]:
        p = int(_config(model, "patch_size"))
        return 1, p, p


FAMILIES: tuple[DiffusersAdapter, ...] = (
    SD3Adapter(), FluxAdapter(), Flux2Adapter(), ChromaAdapter(), QwenImageAdapter(), AuraFlowAdapter(),
    HiDreamAdapter(), HunyuanImageAdapter(), CogView4Adapter(), SanaAdapter(), Lumina2Adapter(), ZImageAdapter(),
    PixArtAdapter(), DiTTransformerAdapter(),
    WanAdapter(), SkyReelsV2Adapter(), HunyuanVideoAdapter(), LTXVideoAdapter(), CogVideoXAdapter(), MochiAdapter(),
)

for _adapter in FAMILIES:
    register_adapter(_adapter)
