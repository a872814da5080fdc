"""Per-token time in one pass (Self-Flow style, ``SRADTS(separate=False)``): the machinery the adapters share
(``protocols.RunsPerTokenTime``), and the per-token forwards of the families that need them.

Every image token gets its own time; all tokens attend to each other. What changes against the model's
ordinary forward is only the conditioning: the timestep embedding becomes one vector per token and every
adaLN modulation (shift, scale, gate) is applied per token. The pass runs through the model's own forward;
the modules whose forward needs per-token conditioning get a per-token forward set **on the instance** for
the duration of the pass (``swapped_forwards``), restored after it, also when it raises. The user's source
and classes are never changed, and a module that is not swapped runs its own forward.

Families:

- DiT / SiT (the upstream layout, ``examples/models``): ``t_embedder`` embeds a ``(B, N)`` time token by
  token, ``y_embedder``'s ``(B, D)`` label embedding is returned as ``(B, 1, D)`` so that the forward's
  ``c = t + y`` is ``(B, N, D)``, each ``DiTBlock`` and the ``FinalLayer`` apply their ``adaLN_modulation``
  per token (the upstream block's computation, restated with per-token shift, scale and gate).
- diffusers Wan (``WanTransformer3DModel``): takes a ``(B, N)`` timestep natively (the Wan 2.2 TI2V path of
  its forward: per-token ``temb`` and modulation in every block and in the output norm); nothing is
  swapped. Its timestep is ``sigma * 1000``.
- diffusers Flux (``FluxTransformer2DModel``, >= 0.35 block layout): ``time_text_embed`` embeds the time per
  image token (plus the per-sample guidance and pooled-text terms, in the order diffusers adds them) and
  returns the mean over the image tokens, which the forward hands on as ``temb``: the text tokens are
  modulated with it (the mean of the image tokens' time embedding, as Self-Flow implementations do). The
  double-stream blocks modulate their image stream per token (``norm1``, the gates, ``norm2``'s shift and
  scale) and their text stream with ``temb``; the single-stream blocks modulate ``[text; image]`` with
  ``[temb, per-token embedding]``; ``norm_out`` (``AdaLayerNormContinuous``) per token.
- diffusers SD3 / SD3.5 (``SD3Transformer2DModel``): the same time embedding (without guidance) and output
  norm as Flux; each ``JointTransformerBlock`` modulates its image stream per token (SD3.5's second attention
  too) and its text stream with ``temb``, the mean. Its timestep is ``sigma * 1000``.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..hooks import StopForward, _eager, _end_stopped_fsdp_forward, attach
from ..module_state import restoring_model_state
from ..protocols import TokenPass
from ..registry import Adapter, ModelCall, token_reader

__all__ = ["swapped_forwards", "run_pass", "grid_values", "prediction", "dit_support", "dit_swaps",
           "DiffusersPerTokenTime"]

_MISSING = object()


@contextmanager
def swapped_forwards(swaps: Sequence[tuple[nn.Module, Callable[..., Any]]], name: str = "forward") -> Iterator[None]:
    """Set ``module.forward = fn`` (or the attribute ``name``) on each module instance for the duration of the
    block; on exit (also on an exception) each module gets back exactly what it had: its class's forward, or
    the forward an earlier tool had set on the instance."""
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for module, fn in swaps:
            saved.append((module, module.__dict__.get(name, _MISSING)))
            module.__dict__[name] = fn
        yield
    finally:
        for module, previous in reversed(saved):
            if previous is _MISSING:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = previous


def _call_swapped(module: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with swapped_forwards([(module, fn)]):
        return module(*args, **kwargs)


def _checkpointing(model: nn.Module, swaps: Sequence[tuple[nn.Module, Callable[..., Any]]]) -> list[tuple[nn.Module, Any]]:
    """Replacements for diffusers' ``_gradient_checkpointing_func`` (set by ``enable_gradient_checkpointing``)
    on ``model`` and its submodules. Checkpointing recomputes a block during backward, after the pass has
    restored the block's own forward: the recompute would then differ from the forward it replays. These
    make a checkpointed swapped module recompute with its per-token forward too."""
    by_module = {id(module): fn for module, fn in swaps}
    replaced = []
    for module in model.modules():
        original = module.__dict__.get("_gradient_checkpointing_func")
        if not callable(original):
            continue

        def checkpoint(function: Any, *args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            target = getattr(function, "__self__", function)  # a module, or its bound __call__
            fn = by_module.get(id(target))
            if fn is None:
                return _original(function, *args, **kwargs)
            return _original(partial(_call_swapped, target, fn), *args, **kwargs)

        replaced.append((module, checkpoint))
    return replaced


def grid_values(values: Tensor, x: Tensor, patch: Sequence[int]) -> Tensor:
    """Per-token values ``(B, N)`` of a latent ``x`` ``(B, C, *grid)`` cut into ``patch`` (its trailing
    dims, tokens row-major over the patch grid) as ``(B, 1, *grid)``: each element the value of its token."""
    spatial = x.shape[-len(patch):]
    cells = [int(n) // int(p) for n, p in zip(spatial, patch)]
    out = values.reshape(values.shape[0], 1, *cells)
    for axis, p in enumerate(patch):
        out = out.repeat_interleave(int(p), dim=2 + axis)
    return out


def check_times(model: nn.Module, times: Any, x: Tensor, tokens: int) -> None:
    """``times`` must be a floating ``(B, N)`` tensor for an input ``x`` of ``B`` samples and ``N`` tokens."""
    shape = (x.shape[0], tokens)
    if not isinstance(times, Tensor) or not times.is_floating_point() or tuple(times.shape) != shape:
        what = f"of shape {tuple(times.shape)} ({times.dtype})" if isinstance(times, Tensor) else f"={type(times).__name__}"
        raise ValueError(f"times {what} is not accepted for {type(model).__name__}: use a floating tensor of shape {shape}, "
                         "one time in [0, 1] per token (1 = noise)")


def prediction(output: Any) -> Tensor:
    """The prediction in a forward's return value: a tensor, the first item of a tuple (``return_dict=False``,
    or the REPA/SRA SiT's ``(x, zs)``), or a diffusers output's ``sample``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


def run_pass(adapter: Adapter, model: nn.Module, x: Tensor, t: Any, args: tuple, kwargs: dict,
             swaps: Sequence[tuple[nn.Module, Callable[..., Any]]], taps: Sequence[int], output: bool,
             caller: nn.Module | None = None) -> TokenPass:
    """``adapter.forward(model, x, t, *args, **kwargs)`` with ``swaps`` in place, keeping the image tokens
    of the blocks ``taps`` (1-based); without ``output`` nothing after the deepest tap runs. ``caller``: a
    wrapper to call instead of ``model`` (DDP, whose forward arms its gradient reduction)."""
    blocks = adapter.blocks(model)
    for k in taps:
        if not 1 <= k <= len(blocks):
            raise ValueError(f"taps={list(taps)} is not accepted: {type(model).__name__} has blocks 1..{len(blocks)}")
    read_tokens = token_reader(adapter)
    deepest = max(taps)
    calls: list[ModelCall] = []
    found: dict[int, Tensor] = {}
    watched: dict[str, Any] = {}

    def enter(args: tuple, kwargs: dict) -> None:
        calls.append(ModelCall(args, kwargs))

    def keeper(number: int) -> Callable[[Any], None]:
        def keep(out: Any) -> None:
            found[number] = read_tokens(out, model, calls[-1] if calls else ModelCall())
            if not output and number == deepest:
                raise StopForward

        return keep

    def watcher(name: str, reader: Callable[[tuple, dict], Any]) -> Callable[[tuple, dict], None]:
        return lambda args, kwargs: watched.setdefault(name, reader(args, kwargs))

    handles = [attach(model, enter, pre=True)]
    handles += [attach(module, watcher(name, reader), pre=True) for name, (module, reader) in adapter.watch(model).items()]
    handles += [attach(blocks[k - 1], keeper(k)) for k in sorted(set(taps))]
    result: Any = None
    try:
        with _eager(model, *(blocks[k - 1] for k in taps)), swapped_forwards(swaps), \
                swapped_forwards(_checkpointing(model, swaps), "_gradient_checkpointing_func"), \
                (nullcontext() if output else restoring_model_state(model)):
            try:
                result = adapter.forward(model if caller is None else caller, x, t, *args, **kwargs)
            except StopForward:
                _end_stopped_fsdp_forward(model)
    finally:
        for handle in handles:
            handle.remove()
    missing = [k for k in taps if k not in found]
    if missing:
        raise RuntimeError(f"blocks {missing} never ran during the forward of {type(model).__name__}: "
                           f"adapter {adapter.name!r} names blocks the forward does not use")
    t_args, t_kwargs = adapter.teacher_inputs(model, args, kwargs, watched)
    return TokenPass(prediction(result) if output else None, {k: found[k] for k in taps}, t_args, t_kwargs)


def _params(fn: Callable[..., Any]) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _lacking(module: Any, names: Sequence[str]) -> list[str]:
    return [name for name in names if not isinstance(getattr(module, name, None), nn.Module)]


# ---------------------------------------------------------------------------------------------- DiT / SiT
_DIT_BLOCK_PARTS = ("adaLN_modulation", "norm1", "attn", "norm2", "mlp")
_DIT_FINAL_PARTS = ("adaLN_modulation", "norm_final", "linear")


def dit_support(model: nn.Module) -> str | None:
    """None if ``model`` has the upstream DiT/SiT layout the per-token forwards restate, else why not."""
    lacking = _lacking(model, ("t_embedder", "y_embedder", "blocks", "final_layer"))
    if lacking:
        return f"it has no {', '.join(lacking)} (a DiT/SiT has t_embedder, y_embedder, blocks, final_layer)"
    for number, block in enumerate(model.blocks, 1):
        lacking = _lacking(block, _DIT_BLOCK_PARTS)
        if lacking:
            return f"its block {number} ({type(block).__name__}) has no {', '.join(lacking)} (a DiTBlock has {', '.join(_DIT_BLOCK_PARTS)})"
        if len(_params(block.forward)) != 2:
            return (f"its block {number} ({type(block).__name__}) takes {_params(block.forward)}, not (x, c): extra inputs "
                    "(rotary positions, a separation mask) are outside the DiT block this per-token forward restates")
    lacking = _lacking(model.final_layer, _DIT_FINAL_PARTS)
    if lacking:
        return f"its final_layer ({type(model.final_layer).__name__}) has no {', '.join(lacking)}"
    return None


class _Rows:
    """The distinct (sample, time) pairs of a per-token time ``(B, N)``. A token's conditioning depends on its
    sample and its time only, so the time embedding and every modulation are computed once per pair and
    gathered to the tokens: SRADTS has two pairs per sample, and per-token modulation then costs about what
    per-sample modulation does (computed per token, a DiT block's ``Linear(D, 6D)`` would add half again to
    the block's matrix products)."""

    def __init__(self, t: Tensor) -> None:
        b, n = t.shape
        sample = torch.arange(b, device=t.device).repeat_interleave(n)
        keys = torch.stack([sample.double(), t.reshape(-1).double()], dim=1)  # float64: exact for both
        _, self.inverse = torch.unique(keys, dim=0, return_inverse=True)
        count = int(self.inverse.max()) + 1
        first = torch.full((count,), b * n, device=t.device, dtype=torch.long)
        self.first = first.scatter_reduce(0, self.inverse, torch.arange(b * n, device=t.device), "amin")
        self.sample = self.first // n  # each pair's sample
        self.shape = (b, n)

    def distinct(self, per_token: Tensor) -> Tensor:
        """``(B, N, X)`` -> ``(pairs, X)``: one row per pair (the rows of a pair are equal)."""
        return per_token.reshape(-1, per_token.shape[-1])[self.first]

    def gather(self, rows: Tensor) -> Tensor:
        """``(pairs, X)`` -> ``(B, N, X)``: each token its pair's row."""
        return rows[self.inverse].view(*self.shape, rows.shape[-1])


class _State:
    """What the swapped forwards of one pass share: the time's distinct pairs (set by the time embedder) and,
    for Flux, the pairs' embeddings."""

    rows: _Rows | None = None
    embedding: Tensor | None = None  # (pairs, D)


def _per_pair(state: _State, fn: Callable[[Tensor], Tensor], c: Tensor) -> Tensor:
    """``fn`` (a module acting row by row) on a per-token ``c`` ``(B, N, D)``, once per distinct pair."""
    rows = state.rows
    if rows is None or tuple(c.shape[:2]) != rows.shape:
        return fn(c)
    return rows.gather(fn(rows.distinct(c)))


def _dit_time(original: Callable[[Tensor], Tensor], state: _State, t: Tensor) -> Tensor:
    if t.dim() != 2:
        return original(t)
    state.rows = _Rows(t)  # (B, N): one embedding per token, computed per distinct pair
    return state.rows.gather(original(t.reshape(-1)[state.rows.first]))


def _dit_labels(original: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
    return original(*args, **kwargs).unsqueeze(1)  # (B, 1, D): broadcasts over the tokens in c = t + y


def _dit_block(block: nn.Module, original: Callable[..., Tensor], state: _State, x: Tensor, c: Tensor) -> Tensor:
    if c.dim() != 3:
        return original(x, c)
    modulation = _per_pair(state, block.adaLN_modulation, c)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
    x = x + gate_msa * block.attn(block.norm1(x) * (1 + scale_msa) + shift_msa)
    return x + gate_mlp * block.mlp(block.norm2(x) * (1 + scale_mlp) + shift_mlp)


def _dit_final(layer: nn.Module, original: Callable[..., Tensor], state: _State, x: Tensor, c: Tensor) -> Tensor:
    if c.dim() != 3:
        return original(x, c)
    shift, scale = _per_pair(state, layer.adaLN_modulation, c).chunk(2, dim=-1)
    return layer.linear(layer.norm_final(x) * (1 + scale) + shift)


def dit_swaps(model: nn.Module) -> list[tuple[nn.Module, Callable[..., Any]]]:
    """The per-token forwards of a DiT/SiT (``dit_support`` first), each wrapping the module's current one.
    They rely on the upstream forward's ``c = t_embedder(t) + y_embedder(y)``: a token's ``c`` depends on its
    sample and time only."""
    state = _State()
    swaps: list[tuple[nn.Module, Callable[..., Any]]] = [
        (model.t_embedder, partial(_dit_time, model.t_embedder.forward, state)),
        (model.y_embedder, partial(_dit_labels, model.y_embedder.forward)),
    ]
    swaps += [(block, partial(_dit_block, block, block.forward, state)) for block in model.blocks]
    swaps.append((model.final_layer, partial(_dit_final, model.final_layer, model.final_layer.forward, state)))
    return swaps


# ---------------------------------------------------------------------------------------------- diffusers Flux
_FLUX_TIME = ("CombinedTimestepTextProjEmbeddings", "CombinedTimestepGuidanceTextProjEmbeddings")


def _class_name(module: Any) -> str:
    return type(module).__name__


def _flux_support(model: nn.Module) -> str | None:
    time = getattr(model, "time_text_embed", None)
    if _class_name(time) not in _FLUX_TIME:
        return f"its time_text_embed is {_class_name(time)}, not one of {_FLUX_TIME}"
    for path, cls, norm in (("transformer_blocks", "FluxTransformerBlock", "norm1"),
                            ("single_transformer_blocks", "FluxSingleTransformerBlock", "norm")):
        for number, block in enumerate(getattr(model, path, None) or (), 1):
            if _class_name(block) != cls:
                return f"its {path}[{number - 1}] is {_class_name(block)}, not diffusers' {cls}"
            if getattr(getattr(block, norm, None), "emb", None) is not None:
                return f"its {path}[{number - 1}].{norm} embeds its own conditioning"
            if "encoder_hidden_states" not in _params(type(block).forward):
                return (f"its {cls} takes no encoder_hidden_states (diffusers before 0.35, single blocks on one "
                        "[text; image] tensor): upgrade diffusers to 0.35 or later")
    if _class_name(getattr(model, "norm_out", None)) != "AdaLayerNormContinuous":
        return f"its norm_out is {_class_name(getattr(model, 'norm_out', None))}, not AdaLayerNormContinuous"
    return None


def _flux_time(module: nn.Module, original: Callable[..., Tensor], state: _State, timestep: Tensor,
               *rest: Tensor) -> Tensor:
    if timestep.dim() != 2:
        return original(timestep, *rest)
    pooled = rest[-1]
    rows = state.rows = _Rows(timestep)
    emb = module.timestep_embedder(module.time_proj(timestep.reshape(-1)[rows.first]).to(dtype=pooled.dtype))
    if len(rest) == 2:  # guidance, pooled: added in diffusers' order, (time + guidance) + text
        emb = emb + module.guidance_embedder(module.time_proj(rest[0]).to(dtype=pooled.dtype))[rows.sample]
    state.embedding = emb + module.text_embedder(pooled)[rows.sample]
    return rows.gather(state.embedding).mean(dim=1)  # temb: what the text tokens are modulated with


def _modulation(norm: nn.Module, state: _State, dtype: torch.dtype | None = None) -> Tensor:
    """An adaLN module's ``linear(silu(embedding))`` per image token ``(B, N, k D)``, computed per pair."""
    emb = norm.silu(state.embedding)
    return state.rows.gather(norm.linear(emb if dtype is None else emb.to(dtype)))


def _ada_zero(norm: nn.Module, x: Tensor, state: _State) -> tuple[Tensor, ...]:
    """``AdaLayerNormZero`` with per-token conditioning: every output per token."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(norm, state).chunk(6, dim=-1)
    return norm.norm(x) * (1 + scale_msa) + shift_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _flux_double(block: nn.Module, original: Callable[..., Any], state: _State, hidden_states: Tensor,
                 encoder_hidden_states: Tensor, temb: Tensor, image_rotary_emb: Any = None,
                 joint_attention_kwargs: dict | None = None) -> tuple[Tensor, Tensor]:
    if state.embedding is None:
        return original(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
    norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = _ada_zero(block.norm1, hidden_states, state)
    norm_text, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(encoder_hidden_states, emb=temb)
    attention = block.attn(hidden_states=norm_hidden, encoder_hidden_states=norm_text,
                           image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    attn_output, context_attn_output = attention[0], attention[1]

    hidden_states = hidden_states + gate_msa * attn_output
    norm_hidden = block.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
    hidden_states = hidden_states + gate_mlp * block.ff(norm_hidden)
    if len(attention) == 3:  # an IP-adapter's image attention
        hidden_states = hidden_states + attention[2]

    encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
    norm_text = block.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * block.ff_context(norm_text)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _flux_single(block: nn.Module, original: Callable[..., Any], state: _State, hidden_states: Tensor,
                 encoder_hidden_states: Tensor, temb: Tensor, image_rotary_emb: Any = None,
                 joint_attention_kwargs: dict | None = None) -> tuple[Tensor, Tensor]:
    if state.embedding is None:
        return original(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
    text = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm = block.norm
    text_modulation = norm.linear(norm.silu(temb)).unsqueeze(1).expand(-1, text, -1)
    modulation = torch.cat([text_modulation, _modulation(norm, state)], dim=1)  # [text; image], as the tokens
    shift, scale, gate = modulation.chunk(3, dim=-1)
    norm_hidden = block.norm.norm(hidden_states) * (1 + scale) + shift
    mlp_hidden = block.act_mlp(block.proj_mlp(norm_hidden))
    attn_output = block.attn(hidden_states=norm_hidden, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    hidden_states = residual + gate * block.proj_out(torch.cat([attn_output, mlp_hidden], dim=2))
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text], hidden_states[:, text:]


def _flux_out(norm: nn.Module, original: Callable[..., Tensor], state: _State, x: Tensor,
              conditioning_embedding: Tensor) -> Tensor:
    if state.embedding is None:
        return original(x, conditioning_embedding)
    scale, shift = _modulation(norm, state, x.dtype).chunk(2, dim=-1)
    return norm.norm(x) * (1 + scale) + shift


def _flux_swaps(model: nn.Module) -> list[tuple[nn.Module, Callable[..., Any]]]:
    state = _State()
    swaps: list[tuple[nn.Module, Callable[..., Any]]] = [
        (model.time_text_embed, partial(_flux_time, model.time_text_embed, model.time_text_embed.forward, state))]
    swaps += [(b, partial(_flux_double, b, b.forward, state)) for b in model.transformer_blocks]
    swaps += [(b, partial(_flux_single, b, b.forward, state)) for b in model.single_transformer_blocks]
    swaps.append((model.norm_out, partial(_flux_out, model.norm_out, model.norm_out.forward, state)))
    return swaps


# ---------------------------------------------------------------------------------------------- diffusers SD3 / SD3.5
_SD3_NORMS = ("AdaLayerNormZero", "SD35AdaLayerNormZeroX")


def _sd3_support(model: nn.Module) -> str | None:
    time = getattr(model, "time_text_embed", None)
    if _class_name(time) != "CombinedTimestepTextProjEmbeddings":
        return f"its time_text_embed is {_class_name(time)}, not CombinedTimestepTextProjEmbeddings"
    for number, block in enumerate(getattr(model, "transformer_blocks", None) or ()):
        if _class_name(block) != "JointTransformerBlock":
            return f"its transformer_blocks[{number}] is {_class_name(block)}, not diffusers' JointTransformerBlock"
        if _class_name(getattr(block, "norm1", None)) not in _SD3_NORMS:
            return f"its transformer_blocks[{number}].norm1 is {_class_name(getattr(block, 'norm1', None))}, not one of {_SD3_NORMS}"
        if getattr(block.norm1, "emb", None) is not None:
            return f"its transformer_blocks[{number}].norm1 embeds its own conditioning"
    if _class_name(getattr(model, "norm_out", None)) != "AdaLayerNormContinuous":
        return f"its norm_out is {_class_name(getattr(model, 'norm_out', None))}, not AdaLayerNormContinuous"
    return None


def _feed_forward(block: nn.Module, ff: nn.Module, x: Tensor) -> Tensor:
    """``ff(x)``, in chunks along ``block._chunk_dim`` when diffusers' feed-forward chunking is on."""
    size = getattr(block, "_chunk_size", None)
    if size is None:
        return ff(x)
    dim = block._chunk_dim
    if x.shape[dim] % size:
        raise ValueError(f"feed-forward chunking: dimension {dim} of size {x.shape[dim]} is not divisible by chunk size {size}")
    return torch.cat([ff(part) for part in x.chunk(x.shape[dim] // size, dim=dim)], dim=dim)


def _sd3_block(block: nn.Module, original: Callable[..., Any], state: _State, hidden_states: Tensor,
               encoder_hidden_states: Tensor, temb: Tensor, joint_attention_kwargs: dict | None = None
               ) -> tuple[Tensor | None, Tensor]:
    if state.embedding is None:
        return original(hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)
    kwargs = joint_attention_kwargs or {}
    norm = block.norm1
    dual = bool(block.use_dual_attention)
    modulation = _modulation(norm, state).chunk(9 if dual else 6, dim=-1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation[:6]
    normed = norm.norm(hidden_states)
    norm_hidden = normed * (1 + scale_msa) + shift_msa
    if block.context_pre_only:
        norm_text = block.norm1_context(encoder_hidden_states, temb)
    else:
        norm_text, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(encoder_hidden_states, emb=temb)
    attn_output, context_attn_output = block.attn(hidden_states=norm_hidden, encoder_hidden_states=norm_text, **kwargs)
    hidden_states = hidden_states + gate_msa * attn_output
    if dual:  # SD3.5: a second, image-only attention with its own shift, scale and gate
        shift_msa2, scale_msa2, gate_msa2 = modulation[6:]
        hidden_states = hidden_states + gate_msa2 * block.attn2(hidden_states=normed * (1 + scale_msa2) + shift_msa2, **kwargs)
    norm_hidden = block.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
    hidden_states = hidden_states + gate_mlp * _feed_forward(block, block.ff, norm_hidden)
    if block.context_pre_only:
        return None, hidden_states
    encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
    norm_text = block.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * _feed_forward(block, block.ff_context, norm_text)
    return encoder_hidden_states, hidden_states


def _sd3_swaps(model: nn.Module) -> list[tuple[nn.Module, Callable[..., Any]]]:
    state = _State()
    swaps: list[tuple[nn.Module, Callable[..., Any]]] = [
        (model.time_text_embed, partial(_flux_time, model.time_text_embed, model.time_text_embed.forward, state))]
    swaps += [(b, partial(_sd3_block, b, b.forward, state)) for b in model.transformer_blocks]
    swaps.append((model.norm_out, partial(_flux_out, model.norm_out, model.norm_out.forward, state)))
    return swaps


# ---------------------------------------------------------------------------------------------- diffusers Wan
def _wan_support(model: nn.Module) -> str | None:
    embedder = getattr(model, "condition_embedder", None)
    if embedder is None or "timestep_seq_len" not in _params(embedder.forward):
        return ("its condition_embedder takes no per-token timestep (timestep_seq_len): this diffusers version's Wan "
                "has no (B, N) timestep path; upgrade diffusers")
    return None


# ---------------------------------------------------------------------------------------------- the diffusers mixin
class DiffusersPerTokenTime:
    """``RunsPerTokenTime`` for the diffusers adapters: Wan (native), Flux and SD3 (swapped forwards); every other
    family is refused by ``per_token_support`` with its name. Mixed into ``DiffusersAdapter``."""

    name: str
    class_name: str
    layout: str | None
    x_key: str

    # class name -> (support check, swaps, factor from time in [0, 1] to the model's timestep)
    _PER_TOKEN: dict[str, tuple[Callable[[nn.Module], str | None], Callable[[nn.Module], list], float]] = {
        "WanTransformer3DModel": (_wan_support, lambda model: [], 1000.0),
        "FluxTransformer2DModel": (_flux_support, _flux_swaps, 1.0),
        "SD3Transformer2DModel": (_sd3_support, _sd3_swaps, 1000.0),
    }

    def per_token_support(self, model: nn.Module) -> str | None:
        family = self._PER_TOKEN.get(self.class_name)
        if family is None:
            served = ", ".join(sorted(self._PER_TOKEN))
            return (f"per-token time in one pass is not available for the {self.class_name or type(model).__name__} family "
                    f"(adapter {self.name!r}); it is for {served} and the DiT/SiT family")
        return family[0](model)

    def _patch_tuple(self, model: nn.Module, x: Tensor) -> tuple[int, ...]:
        patch = self.patch_size(model)  # type: ignore[attr-defined]
        patch = (int(patch),) * 2 if isinstance(patch, int) else tuple(int(p) for p in patch)
        if x.dim() != 2 + len(patch):
            raise ValueError(f"x0 of shape {tuple(x.shape)} is not accepted for {type(model).__name__}: use (B, C, "
                             f"{', '.join('FHW'[-len(patch):])}) as its {self.x_key}")
        return patch

    def token_values(self, model: nn.Module, values: Tensor, x: Tensor) -> Tensor:
        if self.layout == "packed":
            return values.unsqueeze(-1)
        return grid_values(values, x, self._patch_tuple(model, x))

    def per_token_forward(self, model: nn.Module, x: Tensor, times: Tensor, args: tuple, kwargs: dict,
                          taps: Sequence[int], output: bool, caller: nn.Module | None = None) -> TokenPass:
        reason = self.per_token_support(model)
        if reason is not None:
            raise ValueError(f"model={type(model).__name__} cannot run per-token time: {reason}")
        _, swaps, scale = self._PER_TOKEN[self.class_name]
        check_times(model, times, x, self.num_tokens(model, x))
        if self.layout == "packed":
            target = self.num_target_tokens(model, ModelCall((), {**kwargs, self.x_key: x}))  # type: ignore[attr-defined]
            if target is not None and target != x.shape[1]:
                raise ValueError(
                    f"{type(model).__name__}'s {self.x_key} holds {x.shape[1]} tokens of which {target} are the generated "
                    "image's (img_ids mark the rest as reference images): per-token time covers generated tokens only; "
                    "train without reference images"
                )
        return run_pass(self, model, x, times * scale, args, kwargs, swaps(model), taps, output, caller)  # type: ignore[arg-type]
