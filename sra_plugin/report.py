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

The maths (CKA, probe) is in ``sra_plugin.cka`` (its public names are importable from here too), the
command line's arguments and inputs in ``sra_plugin.report_cli``.

A high CKA says the two blocks' features already agree (up to a linear map that CKA ignores); it does
not say that aligning them helps training. Use it to see where a pair sits, not as a verdict.
matplotlib is needed only for ``heatmap`` (it is imported there).
"""

from __future__ import annotations

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

from . import report_cli
from .cka import (ESTIMATORS, FEW_IMAGES, FLAT_SPREAD, MIN_SAMPLES, POOLS, cka_matrix, debiased_cka, linear_cka,
                  noise_level, ridge_probe)
from .hooks import reading_blocks
from .registry import Adapter, resolve_adapter, resolve_blocks
from .wrappers import unwrap

__all__ = ["linear_cka", "debiased_cka", "cka_matrix", "block_features", "ridge_probe", "LayerReport", "layer_report", "main"]


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
    seen: list[Tensor | None] = [None] * len(blocks)

    def keep(index: int, tokens: Tensor) -> None:
        if seen[index] is None:  # the first run of the block in this forward
            seen[index] = tokens.detach()

    pooled: list[list[Tensor]] = [[] for _ in blocks]
    means: list[list[Tensor]] = [[] for _ in blocks]
    was_training = model.training
    model.eval()
    try:
        with reading_blocks(model, blocks, adapter, keep):
            for x, t, args, kwargs in inputs:
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
        model.train(was_training)
    mean = [torch.cat(m) for m in means]
    return (mean if pool == "mean" else [torch.cat(p) for p in pooled]), mean


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


def main(argv: list[str] | None = None) -> LayerReport:
    """``python -m sra_plugin.report``: prints the table, writes the heatmap (and JSON); the arguments and the
    inputs they name are ``sra_plugin.report_cli``'s."""
    p = report_cli.parser(__doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    model, teacher, batches, labels = report_cli.inputs(args, p)
    try:
        report = layer_report(model, batches, teacher=teacher, labels=labels, pool=args.pool, estimator=args.estimator,
                              student_layer=args.student_layer, teacher_layer=args.teacher_layer)
    except TypeError as error:  # a forward that misses (or does not take) the conditioning given
        p.error(f"{type(model).__name__}'s forward failed: {error}\nIts conditioning is probably missing or misplaced: "
                f"{report_cli.CONDITIONING_HELP}")
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
