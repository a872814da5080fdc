"""The measures behind the layer report, on feature matrices (samples, features): linear CKA (Kornblith et
al., 2019) in its plain form (``linear_cka``) and from the unbiased HSIC estimator (Song et al., 2012;
the "debiased CKA" of Nguyen et al., 2021: ``debiased_cka``), a matrix of either over two lists of blocks
(``cka_matrix``), and a ridge-regression linear probe (``ridge_probe``). No model, no hooks: the report
(``sra_plugin.report``) reads the features and calls these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["linear_cka", "debiased_cka", "cka_matrix", "ridge_probe", "MIN_SAMPLES", "FEW_IMAGES", "FLAT_SPREAD",
           "ESTIMATORS", "POOLS", "noise_level"]

POOLS = ("mean", "tokens")
"""Rows of the CKA: one per image (its tokens averaged), or one per token at fixed positions."""


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
