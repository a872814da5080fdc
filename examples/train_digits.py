"""Train a small SiT on scikit-learn's bundled digits with and without SRA, from the same seed.

    python examples/train_digits.py                       # about 5 minutes on 2 free CPU cores
    python examples/train_digits.py --device cuda --steps 20000 --model-size base

Nothing is downloaded: the 1,797 8x8 digits ship with scikit-learn and are upscaled to 16x16.
Writes to ``--out``: ``samples.png`` (class-conditional samples of both runs side by side, Euler
sampler with classifier-free guidance, same noise for both), ``loss_curves.png``, ``metrics.json``,
and prints a summary table that says for each row which direction is better and where SRA did worse.
The small digit classifier that scores the samples is trained once and cached outside ``--out``
(``--classifier-cache``). For the multi-seed comparison see ``benchmarks/quality.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples` and `sra_plugin` importable from a clone
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.digits import (
    LOSSES,
    MODEL_SIZES,
    TrainConfig,
    class_grid_labels,
    classifier_accuracy,
    config_dict,
    euler_sample,
    heldout_diffusion_loss,
    linear_probe,
    load_digits_16,
    load_or_train_classifier,
    smooth,
    tile_grid,
    train,
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not accepted: use an int >= 1")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{value} is not accepted: use a finite number >= 0")
    return value


def default_classifier_cache() -> Path:
    """``$XDG_CACHE_HOME/sra-plugin`` (else ``~/.cache/sra-plugin``): the classifier is a tool, not a result."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sra-plugin"


class _DefaultOnceFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help once; flags without a default value (None, a switch) say theirs in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS or "default" in help_text:
            return help_text
        return f"{help_text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    sizes = ", ".join(f"{k} (hidden {v[0]}, {v[1]} blocks, patch {v[3]}, SRA {v[4]}->{v[5]})" for k, v in MODEL_SIZES.items())
    p = argparse.ArgumentParser(
        description="Train the reference SiT on sklearn's digits with and without SRA (same seed) and compare.",
        formatter_class=_DefaultOnceFormatter,
    )
    p.add_argument("--steps", type=_positive_int, default=1200, help="optimizer steps per run (each of the two runs)")
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="small", help=f"model preset: {sizes}")
    p.add_argument("--student-layer", type=_positive_int, default=None, help="SRA student block L_s, 1-based (default: the preset's)")
    p.add_argument("--teacher-layer", type=_positive_int, default=None, help="SRA teacher block L_t > L_s, 1-based (default: the preset's)")
    p.add_argument("--loss", choices=LOSSES, default="smooth_l1", help="SRA alignment loss (smooth_l1 is the paper's, beta 0.05)")
    p.add_argument("--weight", type=_nonneg_float, default=0.2, help="SRA loss weight (0.2 is the paper's SiT weight)")
    p.add_argument("--seed", type=int, default=0, help="seed of both runs: same init, batches, times, noise")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--out", type=Path, default=Path("outputs/digits"), help="output folder")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument(
        "--ema-decay", type=float, default=0.995,
        help="EMA decay of both runs (the SRA teacher and the sampling EMA); it averages over the last ~200 "
        "steps. Not the paper's 0.9999: that averages over ~10,000 steps, so in a run of a few thousand "
        "steps the EMA would still be mostly the random initialization",
    )
    p.add_argument("--cfg-scale", type=_nonneg_float, default=2.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--sample-steps", type=_positive_int, default=50, help="Euler steps of the sampler")
    p.add_argument("--per-class", type=_positive_int, default=10, help="samples per digit in the grids")
    p.add_argument("--probe-t", type=float, default=0.5, help="noise level t of the linear probe (0 data, 1 noise)")
    p.add_argument(
        "--threads", type=_positive_int, default=1,
        help="torch CPU threads. The model is small: with two threads on two cores that other processes "
        "also use, a step took over 20x longer here than with one (3.7 s against 0.15-0.6 s)",
    )
    p.add_argument("--no-classifier", action="store_true", help="skip the digit classifier's accuracy on the samples (default: off)")
    p.add_argument(
        "--classifier-cache", type=Path, default=default_classifier_cache(),
        help="folder for digit_classifier.pt, a small CNN (about 0.98 accuracy on held-out digits) trained once on "
        "the training digits to score the samples: the fraction it reads as the digit asked for",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars (default: off)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if not 0.0 <= args.ema_decay < 1.0:
        p.error(f"--ema-decay {args.ema_decay} is not accepted: use a number in [0, 1)")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr {args.lr} is not accepted: use a number > 0")
    if not 0.0 <= args.probe_t <= 1.0:
        p.error(f"--probe-t {args.probe_t} is not accepted: use a number in [0, 1]")
    return args


def save_samples(path: Path, grids: dict[str, torch.Tensor], real: torch.Tensor, per_class: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("training digits", real), *grids.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 4.0), dpi=150)
    fig.suptitle(title, fontsize=9)
    for ax, (title, images) in zip(axes, panels):
        ax.imshow(tile_grid(images, per_class), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks(np.arange(10) * 18 + 8.5, [str(d) for d in range(10)], fontsize=7)
    axes[0].set_ylabel("digit asked for", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_curves(path: Path, runs: dict, window: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    fig.suptitle(title, fontsize=10)
    ax1.set_title("diffusion loss of both runs (lower is better)", fontsize=9)
    for name, run in runs.items():
        ax1.plot(smooth(run.diff_loss, window), label=name, lw=1.2)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"diffusion loss (velocity MSE, {window}-step mean)")
    ax1.legend()
    sra_run = runs["with SRA"]
    ax2.plot(smooth(sra_run.align_loss, window), color="tab:orange", lw=1.2, label="alignment loss (raw)")
    ax2.set_title("with SRA: alignment of head(student) to the teacher", fontsize=9)
    ax2.set_xlabel("step")
    ax2.set_ylabel("SRA alignment loss (lower is closer)")
    ax3 = ax2.twinx()
    ax3.plot(smooth(sra_run.cos_sim, window), color="tab:green", lw=1.0, label="cosine(head(student), teacher)")
    ax3.set_ylabel("cosine similarity")
    lines = ax2.get_lines() + ax3.get_lines()
    ax2.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def better_direction(metric: str) -> str | None:
    """"higher" or "lower" is better for a summary row; None for figures of the SRA run alone."""
    if metric.startswith(("probe_accuracy", "classifier_accuracy")):
        return "higher"
    if metric.startswith(("align_loss", "cos_sim")):
        return None
    return "lower"  # losses and seconds


def summary_table(results: dict[str, dict[str, float]]) -> str:
    """Both runs side by side, which direction is better, and whether SRA did better or worse."""
    plain, sra = results["without SRA"], results["with SRA"]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"{'metric':<38}{'without SRA':>13}{'with SRA':>13}  {'better':<8}SRA was"]
    for key in sra:
        a, b, direction = plain.get(key), sra[key], better_direction(key)
        if direction is None or a is None:
            verdict, direction = "(SRA run only)", "-"
        elif a == b:
            verdict = "the same"
        elif (b < a) == (direction == "lower"):
            verdict = "better"
        else:
            verdict = "WORSE" + (" (slower)" if "second" in key or key.startswith("ms_") else "")
        lines.append(f"{key:<38}{fmt(a):>13}{fmt(b):>13}  {direction:<8}{verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu" or args.device.startswith("cpu"):
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, model_size=args.model_size,
        student_layer=args.student_layer, teacher_layer=args.teacher_layer, loss=args.loss,
        weight=args.weight, ema_decay=args.ema_decay, seed=args.seed, device=args.device,
    )
    s_layer, t_layer = cfg.layers()
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_digits_16()
    print(
        f"digits: {len(data.y_train)} train / {len(data.y_test)} held out, 16x16 | SiT {args.model_size}, "
        f"{args.steps} steps x 2 runs on {args.device} ({torch.get_num_threads()} threads) | SRA blocks "
        f"{s_layer}->{t_layer}, {args.loss} x {args.weight}, EMA {args.ema_decay}"
    )
    runs = {
        "without SRA": train(cfg, data, use_sra=False, progress=not args.quiet, desc="without SRA"),
        "with SRA": train(cfg, data, use_sra=True, progress=not args.quiet, desc="with SRA   "),
    }

    labels = class_grid_labels(args.per_class)
    clf = clf_acc = None
    if not args.no_classifier:
        clf_path = args.classifier_cache / "digit_classifier.pt"
        print(f"digit classifier (scores the samples): {'cached' if clf_path.exists() else 'training once, then cached'} at {clf_path}")
        clf, clf_acc = load_or_train_classifier(clf_path, data)
    results: dict[str, dict] = {}
    grids: dict[str, torch.Tensor] = {}
    for name, run in runs.items():
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(args.seed + 100)  # same starting noise for both runs
        grids[name] = euler_sample(run.ema, labels, num_steps=args.sample_steps, cfg_scale=args.cfg_scale, generator=gen)
        sample_s = time.perf_counter() - t0
        tail = max(1, len(run.diff_loss) // 10)
        r = {
            "train_diffusion_loss_last10pct": float(np.mean(run.diff_loss[-tail:])),
            "heldout_diffusion_loss_ema": heldout_diffusion_loss(run.ema, data),
            f"probe_accuracy_block{s_layer}_t{args.probe_t:g}": linear_probe(run.ema, data, s_layer, args.probe_t),
            "train_seconds": run.seconds,
            "train_cpu_seconds": run.cpu_seconds,
            "ms_per_step": 1000 * run.seconds / args.steps,
            "sample_seconds": sample_s,
        }
        if clf is not None:
            r["classifier_accuracy_on_samples"] = classifier_accuracy(clf, grids[name], labels)
        if run.sra is not None:
            r["align_loss_last10pct"] = float(np.mean(run.align_loss[-tail:]))
            r["cos_sim_last10pct"] = float(np.mean(run.cos_sim[-tail:]))
        results[name] = r

    # For the layer report (docs/layers.md): the SRA run's model and EMA, and the held-out digits.
    trained = runs["with SRA"]
    torch.save({"model": trained.model.state_dict(), "ema": trained.ema.state_dict()}, args.out / "run.pt")
    torch.save({"x0": data.x_test, "y": data.y_test}, args.out / "images.pt")

    real = torch.cat([data.x_train[data.y_train == d][: args.per_class] for d in range(10)])
    save_samples(args.out / "samples.png", {f"{k} (EMA)": v for k, v in grids.items()}, real, args.per_class,
                 title=f"Class-conditional samples of the EMA models after {args.steps} training steps (same starting noise)\n"
                 f"sampler: Euler, {args.sample_steps} steps, classifier-free guidance scale {args.cfg_scale:g}")
    save_curves(args.out / "loss_curves.png", runs, window=max(1, min(50, args.steps // 20)),
                title=f"SiT {args.model_size} on digits, seed {args.seed}: without vs with SRA "
                f"(blocks {s_layer}->{t_layer}, {args.loss} x {args.weight:g})")
    total = time.perf_counter() - wall
    metrics = {
        "config": config_dict(cfg),
        "sampler": {"method": "euler", "steps": args.sample_steps, "cfg_scale": args.cfg_scale, "per_class": args.per_class},
        "probe_t": args.probe_t,
        "classifier_heldout_accuracy": clf_acc,
        "runs": results,
        "better": {k: better_direction(k) for k in results["with SRA"]},
        "total_seconds": total,
        "environment": {
            "torch": torch.__version__, "python": platform.python_version(), "device": args.device,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    print("\n" + summary_table(results))
    print(f"(one seed: differences this small can be seed-to-seed noise; benchmarks/quality.py compares several seeds)")
    if clf_acc is not None:
        print(f"(digit classifier: {clf_acc:.3f} accuracy on the held-out real digits)")
    print(f"total {total:.0f} s; wrote {args.out}/samples.png, loss_curves.png, metrics.json, run.pt, images.pt")
    return metrics


if __name__ == "__main__":
    main()
