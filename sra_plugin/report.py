"""Which layers? Similarity of every (student block i at t, teacher block j at s) pair, and a probe per block.

For a model (the student, fed the noisier ``x_t`` at ``t``) and a teacher (its EMA, or any model of
the same family, fed the less noisy ``x_s`` at ``s``; by default the model itself), this reads every
block's image tokens through the adapter registry (forward hooks on ``adapter.blocks(model)``, tokens
from ``adapter.tokens``, the call through ``adapter.forward``) and computes

- ``cka[i, j]``: linear CKA (Kornblith et al., 2019) between student block ``i+1``'s features on
  ``x_t`` and teacher block ``j+1``'s features on ``x_s``, over the same images. By default from the
  unbiased HSIC estimator (Song et al., 2012; the "debiased CKA" of Nguyen et al., 2021:
  ``debiased_cka``), because the plain estimate ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``
  (``linear_cka``, ``estimator="biased"``) is pulled towards 1 by few samples: two independent random
  64-feature sets read 0.95 at 4 images, 0.89 at 8, 0.50 at 64, where the debiased one reads about 0
  (spread about 1.4 / n). Both are 1 for identical features, invariant to orthogonal transforms,
  isotropic scaling and shifts of either side, and need no labels; the debiased one can be slightly
  negative. The report warns below 32 images (``FEW_IMAGES``) and when every pair scores alike (an
  untrained model: the ranking then means nothing).
  ``pool="mean"``: one row per image, its tokens averaged. ``pool="tokens"``: one row per token, at
  ``tokens_per_image`` evenly spaced token positions that are the same on both sides (so both sides
  need the same token count).
- with labels, ``student_probe[i]`` / ``teacher_probe[j]``: held-out accuracy of a linear probe (ridge
  regression on one-hot labels over standardized, mean-pooled tokens; fit on a fixed random part of
  the images, scored on the rest) for every block on each side.

Python::

    from sra_plugin.report import layer_report
    rep = layer_report(model, [(x_t, x_s, t, s, y_null)], teacher=ema, labels=y, student_layer=3, teacher_layer=8)
    print(rep.table()); rep.heatmap("layers.png")

Each batch is ``(x_t, x_s, t, s, *cond)``, the arguments of ``sra(model, x_t, x_s, t, s, *cond)``, or a
mapping with keys ``x_t``, ``x_s``, ``t``, ``s`` and optionally ``args`` (tuple) and ``kwargs`` (dict).
Command line (a model built by an importable factory, weights from a checkpoint, clean latents and
conditioning from a ``torch.save``d dict, the latents under ``x0`` unless ``--x-key`` says otherwise)::

    python -m sra_plugin.report --model examples.models.sit:SiT --model-kwargs '{"input_size": 32, ...}' \\
        --checkpoint run.pt --state-key model --teacher-state-key ema --data images.pt --labels-key y \\
        --cond-value 10 --t 0.5 --s 0.4 --png layers.png

Conditioning: ``--cond-key KEY`` / ``--cond-value INT`` (one positional argument after t, such as class
labels), ``--cond-kwarg NAME=KEY[@AXIS]`` (per image, by keyword: ``encoder_hidden_states=prompt_embeds``)
and ``--shared-kwarg NAME=KEY`` (the same for every batch: ``img_ids``). ``--t``/``--s`` are noise levels
in [0, 1]; ``--time`` says what the model is given: ``unit`` (as is), ``sigma1000`` (x 1000), ``ddpm``
(integer steps, x_t from DDPM's linear betas).

A high CKA says the two blocks' features already agree (up to a linear map that CKA ignores); it does
not say that aligning them helps training. Use it to see where a pair sits, not as a verdict.
matplotlib is needed only for ``heatmap`` (it is imported there).
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .registry import Adapter, ModelCall, resolve_adapter, resolve_blocks, token_reader
from .wrappers import unwrap

__all__ = ["linear_cka", "debiased_cka", "cka_matrix", "block_features", "ridge_probe", "LayerReport", "layer_report", "main"]

POOLS = ("mean", "tokens")


# ------------------------------------------------------------------------------------------- CKA
def _as_matrix(x: Tensor | np.ndarray, name: str) -> Tensor:
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.dim() != 2:
        raise ValueError(f"{name} of shape {tuple(x.shape)} is not accepted: use (samples, features)")
    return x


def linear_cka(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Linear CKA between feature matrices ``x`` (n, d1) and ``y`` (n, d2) over the same n samples.

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc``, ``Yc``; in [0, 1].
    NaN when either side is constant (no variance to compare)."""
    x, y = _as_matrix(x, "x"), _as_matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples and y {y.shape[0]}: CKA compares the same samples")
    if x.shape[0] < 2:
        raise ValueError("CKA needs at least 2 samples")
    return _cka_centred(x - x.mean(0), y - y.mean(0))


def _cka_centred(xc: Tensor, yc: Tensor, nx: float | None = None, ny: float | None = None) -> float:
    nx = float(torch.linalg.matrix_norm(xc.T @ xc)) if nx is None else nx
    ny = float(torch.linalg.matrix_norm(yc.T @ yc)) if ny is None else ny
    if nx == 0.0 or ny == 0.0:
        return float("nan")
    return float(torch.linalg.matrix_norm(yc.T @ xc) ** 2) / (nx * ny)


@dataclass
class _GramStats:
    """What the unbiased HSIC needs of one side's linear Gram matrix ``K = X X^T`` with its diagonal
    zeroed, without forming the (n, n) matrix: ``X``, ``K``'s diagonal, its row sums and their total."""

    x: Tensor
    diag: Tensor
    rows: Tensor
    total: float

    @classmethod
    def of(cls, x: Tensor) -> "_GramStats":
        diag = (x * x).sum(1)
        rows = x @ x.sum(0) - diag
        return cls(x, diag, rows, float(rows.sum()))


def _hsic_unbiased(a: _GramStats, b: _GramStats, cross: float | None = None) -> float:
    """Song et al. (2012)'s unbiased HSIC of linear kernels, with ``K~``, ``L~`` the Gram matrices with
    zeroed diagonals: ``[tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``.
    ``tr(K~L~) = ||X^T Y||_F^2 - sum_i K_ii L_ii``; ``cross``: ``||X^T Y||_F^2`` if already known."""
    n = a.x.shape[0]
    cross = float(torch.linalg.matrix_norm(b.x.T @ a.x) ** 2) if cross is None else cross
    trace = cross - float(a.diag @ b.diag)
    value = trace + a.total * b.total / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(a.rows @ b.rows)
    return value / (n * (n - 3))


def _debiased_cka(a: _GramStats, b: _GramStats, aa: float, bb: float) -> float:
    if not (aa > 0.0 and bb > 0.0):
        return float("nan")
    return _hsic_unbiased(a, b) / math.sqrt(aa * bb)


MIN_SAMPLES = 4
"""The unbiased HSIC divides by n - 3: below 4 samples it does not exist."""

FEW_IMAGES = 32
"""Below this many images the report warns. The debiased CKA of two independent random feature sets
(64, 8 or 384 features, 200 draws each) has mean about 0 at every n but a spread (sd) of about 1.4 / n:
0.70 at 4 images, 0.21 at 8, 0.10 at 16, 0.05 at 32, 0.022 at 64, 0.011 at 128; at 16 images 4% of the
draws read |CKA| > 0.2, at 32 none. Under 32 images, pairs that differ by 0.1 can differ by chance.
Measured by ``benchmarks/cka_small_n.py --features 8 64 384`` (``benchmarks/results/cka_small_n.json``)."""


def noise_level(n: int) -> float:
    """About the spread (sd) of the debiased CKA of unrelated features over ``n`` samples (``FEW_IMAGES``)."""
    return 1.4 / max(n, 1)


FLAT_SPREAD = 0.01
"""Ranked pairs whose CKAs all lie within ``max(FLAT_SPREAD, 2 * noise_level(n))`` of each other have no
ranking: an untrained adaLN-zero model, whose blocks are still identities, gives every pair the same score."""


def debiased_cka(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Linear CKA from the unbiased HSIC estimator (Song et al., 2012; the "debiased CKA" of Nguyen et
    al., 2021): near 0 for independent features at any sample count, 1 for identical ones.

    The plain (biased) estimate ``linear_cka`` of two independent random feature sets reads about 0.95
    at 4 samples, 0.89 at 8 and 0.50 at 64 (64 features); this one reads about 0 at each (its spread is
    what shrinks with n). NaN when a side has no variance left. Needs at least 4 samples."""
    x, y = _as_matrix(x, "x"), _as_matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples and y {y.shape[0]}: CKA compares the same samples")
    if x.shape[0] < MIN_SAMPLES:
        raise ValueError(f"debiased CKA needs at least {MIN_SAMPLES} samples, got {x.shape[0]}")
    a, b = _GramStats.of(x - x.mean(0)), _GramStats.of(y - y.mean(0))
    return _debiased_cka(a, b, _hsic_unbiased(a, a), _hsic_unbiased(b, b))


ESTIMATORS = ("debiased", "biased")


def cka_matrix(student: Sequence[Tensor], teacher: Sequence[Tensor], estimator: str = "biased") -> np.ndarray:
    """``out[i, j]``: CKA of ``student[i]`` and ``teacher[j]``, lists of (n, d) feature matrices;
    ``estimator="biased"`` (``linear_cka``) or ``"debiased"`` (``debiased_cka``, what ``layer_report`` uses)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not accepted: use one of {list(ESTIMATORS)}")
    xs = [_as_matrix(f, f"student[{i}]") for i, f in enumerate(student)]
    ys = [_as_matrix(f, f"teacher[{j}]") for j, f in enumerate(teacher)]
    if estimator == "debiased":
        return _debiased_matrix(xs, ys)
    xs = [x - x.mean(0) for x in xs]
    ys = [y - y.mean(0) for y in ys]
    nxs = [float(torch.linalg.matrix_norm(x.T @ x)) for x in xs]
    nys = [float(torch.linalg.matrix_norm(y.T @ y)) for y in ys]
    out = np.empty((len(xs), len(ys)))
    for i, (x, nx) in enumerate(zip(xs, nxs)):
        for j, (y, ny) in enumerate(zip(ys, nys)):
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"student block {i + 1} has {x.shape[0]} rows and teacher block {j + 1} {y.shape[0]}")
            out[i, j] = _cka_centred(x, y, nx, ny)
    return out


def _debiased_matrix(xs: list[Tensor], ys: list[Tensor]) -> np.ndarray:
    counts = {x.shape[0] for x in xs} | {y.shape[0] for y in ys}
    if len(counts) != 1:
        raise ValueError(f"student and teacher blocks have different row counts {sorted(counts)}: CKA compares the same samples")
    if counts.pop() < MIN_SAMPLES:
        raise ValueError(f"debiased CKA needs at least {MIN_SAMPLES} samples (images, or tokens with pool='tokens')")
    sx = [_GramStats.of(x - x.mean(0)) for x in xs]
    sy = [_GramStats.of(y - y.mean(0)) for y in ys]
    hx = [_hsic_unbiased(a, a) for a in sx]
    hy = [_hsic_unbiased(b, b) for b in sy]
    out = np.empty((len(xs), len(ys)))
    for i, (a, aa) in enumerate(zip(sx, hx)):
        for j, (b, bb) in enumerate(zip(sy, hy)):
            out[i, j] = _debiased_cka(a, b, aa, bb)
    return out


# ------------------------------------------------------------------------------------- features
def _token_positions(n_tokens: int, k: int) -> Tensor:
    if k >= n_tokens:
        return torch.arange(n_tokens)
    return torch.linspace(0, n_tokens - 1, k).round().long().unique()


@torch.no_grad()
def block_features(
    model: nn.Module,
    inputs: Iterable[tuple[Tensor, Any, tuple, dict]],
    adapter: str | Adapter | None = None,
    pool: str = "mean",
    tokens_per_image: int = 16,
) -> tuple[list[Tensor], list[Tensor]]:
    """Every block's features of ``model`` over ``inputs`` (``(x, t, args, kwargs)`` per batch).

    Returns ``(pooled, mean)``: per block, the features for CKA in ``pool`` form ((images, D) or
    (images * tokens, D)) and the mean-pooled (images, D) ones for the probe, float32 on the CPU. The
    model runs in eval mode, without gradient, and its mode is restored."""
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r} is not accepted: use one of {list(POOLS)}")
    model, adapter, blocks = resolve_blocks(model, adapter)
    read = token_reader(adapter)
    calls: list[ModelCall] = []
    seen: list[Tensor | None] = [None] * len(blocks)

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module is model:
            calls.append(ModelCall(args, kwargs))

    def on_block(index: int, block: nn.Module):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if module is block and seen[index] is None:  # the first run of the block in this forward
                seen[index] = read(output, model, calls[-1] if calls else ModelCall()).detach()

        return hook

    handles = [model.register_forward_pre_hook(on_call, with_kwargs=True)]
    handles += [b.register_forward_hook(on_block(i, b)) for i, b in enumerate(blocks)]
    pooled: list[list[Tensor]] = [[] for _ in blocks]
    means: list[list[Tensor]] = [[] for _ in blocks]
    was_training = model.training
    model.eval()
    try:
        for x, t, args, kwargs in inputs:
            calls.clear()
            seen[:] = [None] * len(blocks)
            adapter.forward(model, x, t, *args, **kwargs)
            for i, tok in enumerate(seen):
                if tok is None:
                    raise RuntimeError(f"block {i + 1} of {type(model).__name__} did not run in the forward")
                if tok.dim() != 3:
                    raise ValueError(f"block {i + 1}'s tokens have shape {tuple(tok.shape)}: expected (B, N, D)")
                tok = tok.float().cpu()
                means[i].append(tok.mean(1))
                if pool == "tokens":
                    idx = _token_positions(tok.shape[1], tokens_per_image)
                    pooled[i].append(tok[:, idx].reshape(-1, tok.shape[-1]))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    mean = [torch.cat(m) for m in means]
    return (mean if pool == "mean" else [torch.cat(p) for p in pooled]), mean


def ridge_probe(features: Tensor, labels: Tensor, test_fraction: float = 0.3, seed: int = 0, ridge: float = 1e-2) -> float:
    """Held-out accuracy of a linear probe: ridge regression onto one-hot labels (with a bias) over
    features standardized on the fit part; the images are split once by ``seed``."""
    x = _as_matrix(features, "features")
    y = torch.as_tensor(labels).long().cpu()
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels of shape {tuple(y.shape)} do not match {x.shape[0]} feature rows")
    n = x.shape[0]
    n_test = max(1, int(round(n * test_fraction)))
    if n - n_test < 2:
        raise ValueError(f"{n} images are too few for a probe: give more batches")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, test = perm[n_test:], perm[:n_test]
    mu, sd = x[fit].mean(0), x[fit].std(0).clamp_min(1e-8)
    xs = (x - mu) / sd
    xs = torch.cat([xs, torch.ones(n, 1, dtype=xs.dtype)], 1)
    classes = torch.unique(y[fit])
    onehot = (y[fit, None] == classes[None]).to(xs.dtype)
    a = xs[fit]
    reg = ridge * len(fit) * torch.eye(a.shape[1], dtype=a.dtype)
    reg[-1, -1] = 0.0  # no penalty on the bias
    w = torch.linalg.solve(a.T @ a + reg, a.T @ onehot)
    pred = classes[(xs[test] @ w).argmax(1)]
    return float((pred == y[test]).double().mean())


# ---------------------------------------------------------------------------------------- report
@dataclass
class LayerReport:
    """``cka[i, j]``: student block ``i+1`` at t vs teacher block ``j+1`` at s; probes per block (or None)."""

    cka: np.ndarray
    student_probe: np.ndarray | None
    teacher_probe: np.ndarray | None
    pool: str
    n_images: int
    t_mean: float
    s_mean: float
    default_pair: tuple[int, int] | None = None
    estimator: str = "debiased"

    @property
    def ranking_spread(self) -> float:
        """Highest minus lowest CKA among the ranked pairs (a later teacher block); NaN without pairs."""
        values = [c for *_, c in self.ranked_pairs()]
        return max(values) - min(values) if values else float("nan")

    @property
    def ranking_is_flat(self) -> bool:
        """True when the ranked pairs score alike (within ``FLAT_SPREAD`` or twice the estimator's noise at
        this many images): the ranking then says nothing about which pair to pick."""
        spread = self.ranking_spread
        return math.isfinite(spread) and spread < max(FLAT_SPREAD, 2 * noise_level(self.n_images))

    def notes(self) -> list[str]:
        """Warnings that belong next to the numbers: too few images, a ranking that means nothing."""
        notes = []
        if self.n_images < FEW_IMAGES:
            notes.append(
                f"only {self.n_images} images: CKA of unrelated features varies by about +-{noise_level(self.n_images):.2f} "
                f"here; use at least {FEW_IMAGES} (the command line's default is 512)"
            )
        if self.ranking_is_flat:
            notes.append(
                f"every pair with a later teacher block scores within {self.ranking_spread:.3f} of the others: "
                "the ranking means nothing here (an untrained model, whose blocks still pass their input through, "
                "or images too few or too alike); look at a trained checkpoint"
            )
        return notes

    def ranked_pairs(self, later_only: bool = True) -> list[tuple[int, int, float]]:
        """(student block, teacher block, CKA), 1-based, highest CKA first; ``later_only``: teacher block > student block."""
        pairs = [
            (i + 1, j + 1, float(self.cka[i, j]))
            for i in range(self.cka.shape[0])
            for j in range(self.cka.shape[1])
            if (j > i or not later_only) and math.isfinite(self.cka[i, j])
        ]
        return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))

    def rank_of(self, student_block: int, teacher_block: int, later_only: bool = True) -> int:
        """1-based rank of a pair among ``ranked_pairs(later_only)``."""
        for k, (i, j, _) in enumerate(self.ranked_pairs(later_only), 1):
            if (i, j) == (student_block, teacher_block):
                return k
        raise ValueError(f"pair {student_block}->{teacher_block} is not among the ranked pairs")

    def layersync_pair(self) -> tuple[int, int] | None:
        """A pair for ``LayerSync`` (None without probes): the target is the block whose linear probe on
        ``x_t`` is highest (LayerSync aligns weaker blocks to the model's most semantic one, in the same
        forward), the student the block at half its depth (the paper's SiT-XL pair is 8 -> 16)."""
        if self.student_probe is None or len(self.student_probe) < 2:
            return None
        target = int(np.argmax(self.student_probe)) + 1
        target = max(target, 2)  # the student must come before it
        return max(1, target // 2), target

    def table(self, top: int = 5) -> str:
        rows, cols = self.cka.shape
        head = f"{self.estimator} linear CKA ({self.pool}-pooled, {self.n_images} images): student block at t={self.t_mean:.3g} (rows) vs teacher block at s={self.s_mean:.3g} (columns)"
        lines = [head, "      " + "".join(f"{j + 1:>7}" for j in range(cols))]
        for i in range(rows):
            cells = []
            for j in range(cols):
                mark = "*" if self.default_pair == (i + 1, j + 1) else " "
                cells.append(f"{self.cka[i, j]:>6.3f}{mark}")
            lines.append(f"{i + 1:>5} " + "".join(cells))
        if self.default_pair is not None:
            i, j = self.default_pair
            if j > i:
                n_pairs = len(self.ranked_pairs())
                lines.append(f"* the default pair {i}->{j}: CKA {self.cka[i - 1, j - 1]:.3f}, rank {self.rank_of(i, j)} of {n_pairs} pairs with a later teacher block")
        lines.append("highest CKA with a later teacher block: " + ", ".join(f"{i}->{j} {c:.3f}" for i, j, c in self.ranked_pairs()[:top]))
        if self.student_probe is not None:
            lines.append("linear probe accuracy per block (ridge, mean-pooled, held-out images):")
            lines.append("  block  " + "".join(f"{k + 1:>7}" for k in range(len(self.student_probe))))
            lines.append("  at t   " + "".join(f"{v:>7.3f}" for v in self.student_probe))
            lines.append("  at s   " + "".join(f"{v:>7.3f}" for v in self.teacher_probe))
            pair = self.layersync_pair()
            if pair is not None:
                lines.append(f"LayerSync: target block {pair[1]} (highest probe at t), student block {pair[0]}: "
                             f"LayerSync(model, {pair[0]}, {pair[1]})")
        lines += [f"note: {note}" for note in self.notes()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "cka": self.cka.tolist(), "estimator": self.estimator, "ranking_is_flat": self.ranking_is_flat,
            "notes": self.notes(), "pool": self.pool, "n_images": self.n_images, "t_mean": self.t_mean,
            "s_mean": self.s_mean, "rows": "student block at t (1-based)", "columns": "teacher block at s (1-based)",
            "top_pairs_later_teacher": [list(p) for p in self.ranked_pairs()[:10]],
        }
        if self.student_probe is not None:
            d["student_probe"] = self.student_probe.tolist()
            d["teacher_probe"] = self.teacher_probe.tolist()
            d["layersync_pair"] = self.layersync_pair()
        if self.default_pair is not None:
            i, j = self.default_pair
            d["default_pair"] = [i, j]
            d["default_pair_cka"] = float(self.cka[i - 1, j - 1])
            if j > i:
                d["default_pair_rank"] = self.rank_of(i, j)
                d["pairs_ranked"] = len(self.ranked_pairs())
        return d

    def heatmap(self, path: str | Path, title: str | None = None) -> Path:
        """Write the CKA matrix (and the probes, if any) as a PNG; needs matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("LayerReport.heatmap needs matplotlib: pip install matplotlib") from None
        path = Path(path)
        rows, cols = self.cka.shape
        with_probe = self.student_probe is not None
        fig, axes = plt.subplots(1, 2 if with_probe else 1, figsize=(9.5 if with_probe else 5.2, 4.4), dpi=120, squeeze=False)
        ax = axes[0, 0]
        low = float(np.nanmin(self.cka)) if np.isfinite(self.cka).any() else 0.0
        im = ax.imshow(self.cka, vmin=min(0.0, low), vmax=1, cmap="viridis", origin="upper")
        ax.set_xticks(range(cols), [str(j + 1) for j in range(cols)])
        ax.set_yticks(range(rows), [str(i + 1) for i in range(rows)])
        ax.set_xlabel(f"teacher block at s (mean {self.s_mean:.2g})")
        ax.set_ylabel(f"student block at t (mean {self.t_mean:.2g})")
        for i in range(rows):
            for j in range(cols):
                ax.text(j, i, f"{self.cka[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w" if self.cka[i, j] < 0.6 else "k")
        if self.default_pair is not None:
            i, j = self.default_pair
            ax.add_patch(plt.Rectangle((j - 1.5, i - 1.5), 1, 1, fill=False, ec="red", lw=2))
        ax.set_title(title or f"{self.estimator} linear CKA ({self.pool}-pooled tokens, {self.n_images} images)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
        if with_probe:
            ax2 = axes[0, 1]
            ax2.plot(range(1, len(self.student_probe) + 1), self.student_probe, "o-", label="student, at t")
            ax2.plot(range(1, len(self.teacher_probe) + 1), self.teacher_probe, "s-", label="teacher, at s")
            ax2.set_xlabel("block")
            ax2.set_ylabel("linear probe accuracy (held out)")
            ax2.legend(fontsize=8)
            ax2.grid(alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path


def _split_batch(batch: Any, index: int) -> tuple[Tensor, Tensor, Any, Any, tuple, dict]:
    if isinstance(batch, Mapping):
        missing = [k for k in ("x_t", "x_s", "t", "s") if k not in batch]
        if missing:
            raise ValueError(f"batch {index} lacks {missing}: a mapping needs x_t, x_s, t, s (and optionally args, kwargs)")
        return batch["x_t"], batch["x_s"], batch["t"], batch["s"], tuple(batch.get("args", ())), dict(batch.get("kwargs", {}))
    if isinstance(batch, (tuple, list)) and len(batch) >= 4:
        x_t, x_s, t, s, *cond = batch
        return x_t, x_s, t, s, tuple(cond), {}
    raise TypeError(f"batch {index} is a {type(batch).__name__}: use (x_t, x_s, t, s, *cond) or a mapping with x_t, x_s, t, s")


def _mean_time(values: list[Any]) -> float:
    flat = [torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in values]
    return float(torch.cat(flat).mean()) if flat else float("nan")


def layer_report(
    model: nn.Module,
    batches: Iterable[Any],
    teacher: nn.Module | None = None,
    labels: Tensor | Sequence[int] | None = None,
    pool: str = "mean",
    adapter: str | Adapter | None = None,
    student_layer: int | None = None,
    teacher_layer: int | None = None,
    tokens_per_image: int = 16,
    probe_seed: int = 0,
    estimator: str = "debiased",
) -> LayerReport:
    """CKA of every (student block at t, teacher block at s) pair over ``batches``, and with ``labels``
    (one per image, in batch order) a linear probe per block on each side.

    ``teacher`` None: the model itself on ``x_s`` (an EMA or another model of the same family gives its
    own blocks). ``student_layer``/``teacher_layer`` (1-based) mark the pair in use in the table and heatmap.
    ``estimator``: ``"debiased"`` (``debiased_cka``, not pulled towards 1 by few images) or ``"biased"``
    (``linear_cka``). Warns below ``FEW_IMAGES`` images and when the ranking is flat (``LayerReport.notes``)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not accepted: use one of {list(ESTIMATORS)}")
    batches = [_split_batch(b, k) for k, b in enumerate(batches)]
    if not batches:
        raise ValueError("batches is empty: give at least one (x_t, x_s, t, s, *cond)")
    teacher_model = model if teacher is None else teacher
    adapter_s = resolve_adapter(unwrap(model), adapter)
    adapter_t = resolve_adapter(unwrap(teacher_model), adapter)
    s_feat, s_mean = block_features(model, [(b[0], b[2], b[4], b[5]) for b in batches], adapter_s, pool, tokens_per_image)
    t_feat, t_mean = block_features(teacher_model, [(b[1], b[3], b[4], b[5]) for b in batches], adapter_t, pool, tokens_per_image)
    n_images = s_mean[0].shape[0]
    if estimator == "debiased" and n_images < MIN_SAMPLES:
        raise ValueError(f"{n_images} images are too few: the debiased CKA needs at least {MIN_SAMPLES} (use {FEW_IMAGES} or more)")
    cka = cka_matrix(s_feat, t_feat, estimator)
    student_probe = teacher_probe = None
    if labels is not None:
        y = torch.as_tensor(labels).reshape(-1)
        if y.shape[0] != n_images:
            raise ValueError(f"labels has {y.shape[0]} entries for {n_images} images: give one label per image, in batch order")
        student_probe = np.array([ridge_probe(f, y, seed=probe_seed) for f in s_mean])
        teacher_probe = np.array([ridge_probe(f, y, seed=probe_seed) for f in t_mean])
    pair = None
    if student_layer is not None and teacher_layer is not None:
        if not (1 <= student_layer <= cka.shape[0] and 1 <= teacher_layer <= cka.shape[1]):
            raise ValueError(f"pair {student_layer}->{teacher_layer} is outside the {cka.shape[0]}x{cka.shape[1]} blocks")
        pair = (int(student_layer), int(teacher_layer))
    report = LayerReport(
        cka=cka, student_probe=student_probe, teacher_probe=teacher_probe, pool=pool, n_images=n_images,
        t_mean=_mean_time([b[2] for b in batches]), s_mean=_mean_time([b[3] for b in batches]), default_pair=pair,
        estimator=estimator,
    )
    for note in report.notes():
        warnings.warn(f"layer_report: {note}", RuntimeWarning, stacklevel=2)
    return report


# ---------------------------------------------------------------------------------- command line
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


def main(argv: list[str] | None = None) -> LayerReport:
    p = argparse.ArgumentParser(prog="python -m sra_plugin.report", description=__doc__.split("\n\n")[0],
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
    args = p.parse_args(argv)
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
    try:
        report = layer_report(model, batches, teacher=teacher, labels=labels, pool=args.pool, estimator=args.estimator,
                              student_layer=args.student_layer, teacher_layer=args.teacher_layer)
    except TypeError as error:  # a forward that misses (or does not take) the conditioning given
        p.error(f"{type(model).__name__}'s forward failed: {error}\nIts conditioning is probably missing or misplaced: {CONDITIONING_HELP}")
    print(report.table())
    report.heatmap(args.png)
    print(f"wrote {args.png}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
