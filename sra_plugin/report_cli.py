"""The layer report's command line, ``python -m sra_plugin.report`` (``sra_plugin.report.main`` runs it): its
arguments, and the inputs they name: a model built by an importable factory, weights from a checkpoint,
clean latents and conditioning from a ``torch.save``d dict, made into the report's batches."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from torch import nn

from .cka import ESTIMATORS, FEW_IMAGES, MIN_SAMPLES, POOLS

__all__ = ["parser", "inputs"]


def _load_factory(spec: str):
    import importlib
    import operator

    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"--model {spec!r} is not accepted: use 'package.module:factory' (or 'package:Class.from_pretrained')")
    return operator.attrgetter(attr)(importlib.import_module(module))


def _state(path: Path, key: str | None) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if key:
        if key not in state:
            raise ValueError(f"key {key!r} is not in {path}: it holds {sorted(state)}")
        state = state[key]
    return state


TIMES = {
    "unit": "the model gets t and s as given, in [0, 1]",
    "sigma1000": "the model gets 1000 * t (the timestep most diffusers flow-matching transformers take; the README's table says which)",
    "ddpm": "the model gets the integer step round(1000 * t), at most 999, and x_t comes from DDPM's linear betas "
            "(1e-4 to 0.02 over 1000 steps)",
}

CONDITIONING_HELP = (
    "pass the model's conditioning from --data: --cond-key KEY or --cond-value INT (one positional argument after t, "
    "e.g. class labels y, or the null label num_classes for unconditional features), --cond-kwarg NAME=KEY (per image, "
    "by keyword, e.g. encoder_hidden_states=prompt_embeds) and --shared-kwarg NAME=KEY (the same value for every "
    "batch, e.g. img_ids=img_ids)"
)


def _named_keys(values: list[str], flag: str, p: argparse.ArgumentParser, axis: bool = False) -> list[tuple[str, str, int]]:
    """``NAME=KEY`` (``NAME`` alone: ``KEY == NAME``), with ``axis``: optionally ``@AXIS``, the image axis."""
    triples = []
    for value in values:
        name, _, key = value.partition("=")
        key, _, at = (key or name).rpartition("@") if axis and "@" in (key or name) else (key or name, "", "0")
        if not name.isidentifier() or not key or not at.lstrip("-").isdigit():
            form = "NAME=KEY[@AXIS]" if axis else "NAME=KEY"
            p.error(f"{flag} {value!r} is not accepted: use {form} (or NAME, for KEY == NAME), NAME a keyword of the model's forward")
        triples.append((name, key, int(at)))
    return triples


def _data_entry(data: Mapping, key: str, flag: str, p: argparse.ArgumentParser) -> Any:
    if key not in data:
        p.error(f"{flag}: key {key!r} is not in --data, which holds {sorted(data)}")
    return data[key]


def _per_image(value: Any, key: str, flag: str, n: int, p: argparse.ArgumentParser, axis: int = 0) -> Any:
    if isinstance(value, Tensor) and -value.dim() <= axis < value.dim() and value.shape[axis] >= n:
        return value
    if isinstance(value, (list, tuple)) and axis == 0 and len(value) >= n:
        return value
    size = tuple(value.shape) if isinstance(value, Tensor) else (len(value) if isinstance(value, (list, tuple)) else type(value).__name__)
    p.error(f"{flag}: --data[{key!r}] ({size}) is not per image along axis {axis}: use a tensor or list with one entry per "
            f"image (at least {n}) on that axis, or --shared-kwarg for a value every batch shares")


def _images(value: Any, axis: int, lo: int, hi: int) -> Any:
    return value.narrow(axis, lo, hi - lo) if isinstance(value, Tensor) else value[lo:hi]


def _to(value: Any, device: str) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value.to(device) if isinstance(value, Tensor) else value


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments of ``python -m sra_plugin.report``."""
    p = argparse.ArgumentParser(prog="python -m sra_plugin.report", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="factory of the model, 'package.module:callable' "
                   "(an attribute path works too: 'package:Class.from_pretrained')")
    p.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments of the factory")
    p.add_argument("--checkpoint", type=Path, default=None, help="torch.save'd state of the model (and maybe its EMA)")
    p.add_argument("--state-key", default=None, help="key of the model's state dict in --checkpoint (none: the whole file)")
    p.add_argument("--teacher-checkpoint", type=Path, default=None, help="state of the teacher (default: --checkpoint)")
    p.add_argument("--teacher-state-key", default=None, help="key of the teacher's state dict (e.g. 'ema'); "
                   "without it and without --teacher-checkpoint the teacher is the model itself")
    p.add_argument("--data", type=Path, required=True, help="torch.save'd dict holding the clean latents (and conditioning)")
    p.add_argument("--x-key", default="x0", help="key of the clean latents in --data, one per image, in the layout the "
                   "model takes: (N, C, H, W), packed (N, tokens, C), video (N, C, F, H, W)")
    p.add_argument("--labels-key", default=None, help="key of integer labels (N,) in --data, for the probes")
    p.add_argument("--cond-key", default=None, help="key of per-image conditioning passed positionally after t (e.g. labels y)")
    p.add_argument("--cond-value", type=int, default=None, help="a constant integer conditioning for every image, passed "
                   "positionally after t (e.g. the null label, num_classes, of a class-conditional model)")
    p.add_argument("--cond-kwarg", action="append", default=[], metavar="NAME=KEY",
                   help="per-image conditioning passed by keyword NAME, from --data[KEY], cut into batches along its first axis, "
                   "or along AXIS with NAME=KEY@AXIS (repeatable)")
    p.add_argument("--shared-kwarg", action="append", default=[], metavar="NAME=KEY",
                   help="conditioning passed unchanged to every batch by keyword NAME, from --data[KEY] (repeatable)")
    p.add_argument("--time", choices=tuple(TIMES), default="unit",
                   help="time convention of the model: " + "; ".join(f"{k}: {v}" for k, v in TIMES.items()))
    p.add_argument("--t", type=float, default=0.5, help="student noise level in [0, 1] (1: pure noise)")
    p.add_argument("--s", type=float, default=0.4, help="teacher noise level in [0, 1]")
    p.add_argument("--path", choices=("linear", "cosine"), default=None,
                   help="how x_t is made from x0 and noise for --time unit/sigma1000 (default linear; --time ddpm uses DDPM's)")
    p.add_argument("--images", type=int, default=512, help="images used (the first N)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--pool", choices=POOLS, default="mean")
    p.add_argument("--estimator", choices=ESTIMATORS, default="debiased", help="CKA estimator (biased: pulled towards 1 by few images)")
    p.add_argument("--student-layer", type=int, default=None, help="mark this student block (1-based)")
    p.add_argument("--teacher-layer", type=int, default=None, help="mark this teacher block (1-based)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--device", default="cpu")
    p.add_argument("--png", type=Path, default=Path("layer_report.png"))
    p.add_argument("--json", type=Path, default=None)
    return p


def inputs(args: argparse.Namespace, p: argparse.ArgumentParser) -> tuple[nn.Module, nn.Module | None, list[dict], Any]:
    """``(model, teacher, batches, labels)`` for ``layer_report`` from the parsed ``args``; what does not fit is
    refused through ``p.error`` naming the flag."""
    if args.images < MIN_SAMPLES or args.batch_size < 1:
        p.error(f"--images must be >= {MIN_SAMPLES} and --batch-size >= 1")
    if args.cond_key is not None and args.cond_value is not None:
        p.error("give --cond-key or --cond-value, not both")
    for flag, value in (("--t", args.t), ("--s", args.s)):
        if not 0.0 <= value <= 1.0:
            p.error(f"{flag} {value} is not accepted: give a noise level in [0, 1]; --time {args.time} converts it for the model")
    if args.time == "ddpm" and args.path is not None:
        p.error("--path is not used with --time ddpm (x_t comes from DDPM's own schedule): leave it out")
    cond_kwargs = _named_keys(args.cond_kwarg, "--cond-kwarg", p, axis=True)
    shared_kwargs = _named_keys(args.shared_kwarg, "--shared-kwarg", p)
    from .noise import CosinePath, DDPMPath, LinearPath

    factory = _load_factory(args.model)
    kwargs = json.loads(args.model_kwargs)
    model = factory(**kwargs)
    if args.checkpoint is not None:
        model.load_state_dict(_state(args.checkpoint, args.state_key))
    teacher = None
    if args.teacher_checkpoint is not None or args.teacher_state_key is not None:
        source = args.teacher_checkpoint or args.checkpoint
        if source is None:
            p.error("--teacher-state-key needs --checkpoint or --teacher-checkpoint")
        teacher = factory(**kwargs)
        teacher.load_state_dict(_state(source, args.teacher_state_key))
        teacher = teacher.to(args.device)
    model = model.to(args.device)
    data = torch.load(args.data, map_location="cpu", weights_only=True)
    x0 = _data_entry(data, args.x_key, "--x-key", p)[: args.images].float()
    n = len(x0)
    if n < MIN_SAMPLES:
        p.error(f"--data[{args.x_key!r}] holds {n} images: the report needs at least {MIN_SAMPLES} ({FEW_IMAGES} or more to be read)")
    positional = None
    if args.cond_key is not None:
        positional = _per_image(_data_entry(data, args.cond_key, "--cond-key", p), args.cond_key, "--cond-key", n, p)
    per_image = {name: (_per_image(_data_entry(data, key, "--cond-kwarg", p), key, "--cond-kwarg", n, p, axis), axis)
                 for name, key, axis in cond_kwargs}
    shared = {name: _to(_data_entry(data, key, "--shared-kwarg", p), args.device) for name, key, _ in shared_kwargs}
    if args.time == "ddpm":
        path, steps = DDPMPath.linear(), len(DDPMPath.linear().alphas_cumprod)
        model_time = lambda v: torch.full((len(xb),), min(round(steps * v), steps - 1), dtype=torch.long)  # noqa: E731
        path_time = model_time
    else:
        path = CosinePath() if args.path == "cosine" else LinearPath()
        scale = 1000.0 if args.time == "sigma1000" else 1.0
        model_time = lambda v: torch.full((len(xb),), v * scale)  # noqa: E731
        path_time = lambda v: torch.full((len(xb),), v)  # noqa: E731
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(x0.shape, generator=gen)
    batches = []
    dev = args.device
    for lo in range(0, n, args.batch_size):
        xb, nb = x0[lo : lo + args.batch_size], noise[lo : lo + args.batch_size]
        hi = lo + len(xb)
        x_t, x_s = path(xb, nb, path_time(args.t)), path(xb, nb, path_time(args.s))
        cond: tuple = ()
        if positional is not None:
            cond = (_to(positional[lo:hi], dev),)
        elif args.cond_value is not None:
            cond = (torch.full((len(xb),), args.cond_value, dtype=torch.long, device=dev),)
        batch_kwargs = {**shared, **{name: _to(_images(value, axis, lo, hi), dev) for name, (value, axis) in per_image.items()}}
        batches.append({"x_t": x_t.to(dev), "x_s": x_s.to(dev), "t": model_time(args.t).to(dev), "s": model_time(args.s).to(dev),
                        "args": cond, "kwargs": batch_kwargs})
    labels = _data_entry(data, args.labels_key, "--labels-key", p)[:n] if args.labels_key else None
    return model, teacher, batches, labels
