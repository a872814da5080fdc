"""Compact tables (mean ± std, and in how many seeds each arm beat the baseline) and one picture of the
sample grids of every arm, from the JSON that ``benchmarks/quality.py`` or ``finetune_quality.py`` wrote.

    python benchmarks/evidence_report.py benchmarks/results/evidence3/scratch_mnist16.json \
        --samples benchmarks/results/evidence3/samples_scratch --seed 0 --montage scratch_samples.png

Writes ``<json stem>_summary.md`` beside the JSON (or ``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# Metrics where lower is better; every other one (accuracies, probes) is better higher.
LOWER_IS_BETTER = ("frechet", "diffusion_loss", "seconds", "per_step")


def lower_is_better(metric: str) -> bool:
    return any(key in metric for key in LOWER_IS_BETTER)


def wins(per_seed: list[float], metric: str) -> int:
    """Seeds in which the arm beat the baseline (a tie is no win)."""
    sign = -1 if lower_is_better(metric) else 1
    return sum(1 for d in per_seed if sign * d > 0)


def _fmt(x: float, metric: str) -> str:
    if "seconds" in metric and "per_step" not in metric:
        return f"{x:.0f}"
    if "frechet" in metric:
        return f"{x:.1f}"
    return f"{x:.3f}"


def summary_table(result: dict, metrics: list[str] | None = None) -> str:
    """One row per arm: each metric's mean ± std over seeds, and beside every non-baseline arm's
    value the seeds it beat the baseline in."""
    summary = result["summary"]
    metrics = metrics or [m for m in summary if m not in ("eval_seconds", "train_seconds")]
    first = summary[metrics[0]]
    base = first["difference"]["baseline"]
    arms = [a for a in first if a != "difference"]
    n = len(result["config"]["seed"])
    arrows = {m: "↓" if lower_is_better(m) else "↑" for m in metrics}
    lines = ["| arm | " + " | ".join(f"{m} {arrows[m]}" for m in metrics) + " |", "| --- " * (len(metrics) + 1) + "|"]
    for arm in arms:
        cells = []
        for m in metrics:
            e = summary[m][arm]
            cell = f"{_fmt(e['mean'], m)} ± {_fmt(e['std'], m)}"
            if arm != base:
                cell += f" ({wins(summary[m]['difference'][arm]['per_seed'], m)}/{n})"
            cells.append(cell)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def montage(samples_dir: Path, arms: list[str], seed: int, out: Path, prefix: str = "samples") -> Path:
    """The seed's sample grid of every arm side by side, titled with the arm; each grid cut to a square
    (as many samples per row as there are rows) so that the digits stay legible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = [plt.imread(samples_dir / f"{prefix}_seed{seed}_{arm}.png") for arm in arms]
    images = [img[:, : img.shape[0]] for img in images]
    fig, axes = plt.subplots(1, len(arms), figsize=(2.2 * len(arms), 2.6), dpi=120, squeeze=False)
    for ax, arm, img in zip(axes[0], arms, images):
        ax.imshow(img)
        ax.set_title(arm, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path)
    p.add_argument("--metrics", nargs="+", default=None, help="columns (default: every metric but wall times)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--samples", type=Path, default=None, help="the run's --samples-dir")
    p.add_argument("--prefix", default="samples", help="sample grid file prefix (finetune_quality.py: finetune)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--montage", type=Path, default=None, help="write every arm's grid of --seed side by side here")
    args = p.parse_args(argv)
    result = json.loads(args.json.read_text())
    table = summary_table(result, args.metrics)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else " ".join(map(str, argv))
    text = f"`{command}`\n\nfrom `{result['command']}`\n\n{table}\n"
    out = args.out or args.json.with_name(args.json.stem + "_summary.md")
    out.write_text(text)
    print(text)
    if args.montage is not None:
        if args.samples is None:
            p.error("--montage needs --samples (the run's --samples-dir)")
        arms = list(result["variants"])
        montage(args.samples, arms, args.seed, args.montage, args.prefix)
        print(f"wrote {args.montage}")
    return table


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
