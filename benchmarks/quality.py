"""Does SRA help at digit scale? Several seeds, with and without SRA, equal steps, same everything else.

    python benchmarks/quality.py                      # 3 seeds x 2 variants, results in benchmarks/results/

For each seed both variants start from the same weights and see the same batches, times, noise and
label drops (see ``examples.digits.train``); both sample from an EMA with the same decay. Measured on
the EMA model after training:

(a) linear-probe accuracy: logistic regression on mean-pooled block L_s (and L_t) tokens, inputs
    noised to a fixed t with fixed noise and the null label, fit on the training digits and scored on
    the held-out digits;
(b) sample quality: Frechet distance between class-conditional samples (Euler, classifier-free
    guidance, the same starting noise for both variants) and the training digits, in the 128-d
    feature space of a small CNN trained here on the training split (saved to ``--classifier`` and
    reused, never downloaded), and that CNN's accuracy on the samples against their labels;
plus the velocity MSE on the held-out digits. Mean +- std (sample std, ddof=1) over seeds, and the
mean +- std of the per-seed difference (with SRA minus without).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from examples.digits import (
    LOSSES,
    MODEL_SIZES,
    Digits,
    TrainConfig,
    class_grid_labels,
    classifier_features,
    config_dict,
    euler_sample,
    frechet_distance,
    heldout_diffusion_loss,
    linear_probe,
    load_digits_16,
    load_or_train_classifier,
    sample_quality,
    tile_grid,
    train,
)

VARIANTS = ("without SRA", "with SRA")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds; each runs both variants")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps of every run")
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="small")
    p.add_argument("--student-layer", type=int, default=None, help="L_s (default: the preset's)")
    p.add_argument("--teacher-layer", type=int, default=None, help="L_t (default: the preset's)")
    p.add_argument("--loss", choices=LOSSES, default="smooth_l1")
    p.add_argument("--weight", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay of both variants (see train_digits.py --help)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--probe-t", type=float, default=0.5, help="noise level of the linear probe (0 data, 1 noise)")
    p.add_argument("--per-class", type=int, default=50, help="samples per digit for the Frechet distance")
    p.add_argument("--sample-steps", type=int, default=25, help="Euler steps")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--classifier", type=Path, default=Path("benchmarks/results/digit_classifier.pt"),
                   help="where the feature CNN is saved and reused")
    p.add_argument("--classifier-epochs", type=int, default=15, help="training epochs of the feature CNN")
    p.add_argument("--samples-dir", type=Path, default=None, help="also save each run's sample grid (PNG) here")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/quality.json"))
    args = p.parse_args(argv)
    if not args.seeds:
        p.error("--seeds needs at least one seed")
    for name in ("steps", "batch_size", "per_class", "sample_steps", "workers", "classifier_epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} is not accepted: use an int >= 1")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads} is not accepted: use an int >= 1")
    if not 0.0 <= args.probe_t <= 1.0:
        p.error(f"--probe-t {args.probe_t} is not accepted: use a number in [0, 1]")
    return args


def _config(args: argparse.Namespace, seed: int) -> TrainConfig:
    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, model_size=args.model_size,
        student_layer=args.student_layer, teacher_layer=args.teacher_layer, loss=args.loss,
        weight=args.weight, ema_decay=args.ema_decay, seed=seed, device=args.device,
    )


def run_one(job: tuple[argparse.Namespace, int, str, int]) -> dict:
    """Train one (seed, variant) and measure its EMA model."""
    args, seed, variant, threads = job
    torch.set_num_threads(threads)
    data = load_digits_16()
    cfg = _config(args, seed)
    s_layer, t_layer = cfg.layers()
    run = train(cfg, data, use_sra=variant == "with SRA", progress=False)
    t0 = time.perf_counter()
    clf, _ = load_or_train_classifier(args.classifier, data, epochs=args.classifier_epochs)
    labels = class_grid_labels(args.per_class)
    gen = torch.Generator().manual_seed(seed + 100)
    samples = euler_sample(run.ema, labels, num_steps=args.sample_steps, cfg_scale=args.cfg_scale, generator=gen)
    quality = sample_quality(clf, samples, labels, data.x_train)
    if args.samples_dir is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        args.samples_dir.mkdir(parents=True, exist_ok=True)
        name = f"samples_seed{seed}_{'sra' if variant == 'with SRA' else 'baseline'}.png"
        plt.imsave(args.samples_dir / name, tile_grid(samples, args.per_class), cmap="gray_r", vmin=0, vmax=1)
    out = {
        "seed": seed,
        "variant": variant,
        f"probe_block{s_layer}": linear_probe(run.ema, data, s_layer, args.probe_t),
        f"probe_block{t_layer}": linear_probe(run.ema, data, t_layer, args.probe_t),
        "frechet": quality["frechet"],
        "class_accuracy": quality["class_accuracy"],
        "heldout_diffusion_loss": heldout_diffusion_loss(run.ema, data),
        "train_seconds": run.seconds,
        "train_cpu_seconds": run.cpu_seconds,
        "eval_seconds": time.perf_counter() - t0,
    }
    print(f"  seed {seed} {variant:<12} " + ", ".join(f"{k} {v:.4f}" for k, v in out.items() if isinstance(v, float)), flush=True)
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarize(runs: list[dict], seeds: list[int]) -> dict:
    metrics = [k for k in runs[0] if k not in ("seed", "variant") and isinstance(runs[0][k], float)]
    by = {(r["seed"], r["variant"]): r for r in runs}
    summary: dict[str, dict] = {}
    for m in metrics:
        entry = {}
        for v in VARIANTS:
            mean, std = _mean_std([by[(s, v)][m] for s in seeds])
            entry[v] = {"mean": mean, "std": std}
        mean, std = _mean_std([by[(s, "with SRA")][m] - by[(s, "without SRA")][m] for s in seeds])
        entry["difference"] = {"mean": mean, "std": std}
        summary[m] = entry
    return summary


def format_table(summary: dict, n_seeds: int) -> str:
    lines = [f"{'metric (' + str(n_seeds) + ' seeds, mean +- std)':<34}{'without SRA':>20}{'with SRA':>20}{'SRA - without':>20}"]
    for m, e in summary.items():
        digits = 1 if m.endswith("seconds") else 4
        cell = lambda d: f"{d['mean']:.{digits}f} +- {d['std']:.{digits}f}"  # noqa: E731
        lines.append(f"{m:<34}{cell(e['without SRA']):>20}{cell(e['with SRA']):>20}{cell(e['difference']):>20}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    wall = time.perf_counter()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    torch.set_num_threads(threads)
    data: Digits = load_digits_16()
    cfg = _config(args, args.seeds[0])  # validates the configuration before anything runs
    clf, clf_acc = load_or_train_classifier(args.classifier, data, epochs=args.classifier_epochs)
    floor = frechet_distance(classifier_features(clf, data.x_test), classifier_features(clf, data.x_train))
    print(
        f"quality: SiT {args.model_size}, {args.steps} steps, seeds {args.seeds}, SRA blocks {'->'.join(map(str, cfg.layers()))} "
        f"{args.loss} x {args.weight}, EMA {args.ema_decay}; {args.workers} worker(s) x {threads} thread(s)\n"
        f"feature CNN: {clf_acc:.4f} accuracy on held-out digits; Frechet(held-out real, train) = {floor:.4f}",
        flush=True,
    )
    jobs = [(args, seed, variant, threads) for seed in args.seeds for variant in VARIANTS]
    if args.workers == 1:
        runs = [run_one(job) for job in jobs]
    else:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            runs = pool.map(run_one, jobs, chunksize=1)
    summary = summarize(runs, args.seeds)
    total = time.perf_counter() - wall
    table = format_table(summary, len(args.seeds))
    print("\n" + table)
    print(f"total {total:.0f} s ({total / 60:.1f} min)")
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else argv,
        "config": {**config_dict(cfg), "seed": args.seeds},
        "eval": {"probe_t": args.probe_t, "per_class": args.per_class, "sample_steps": args.sample_steps,
                 "cfg_scale": args.cfg_scale, "frechet_reference": "training digits",
                 "std": "sample std over seeds (ddof=1)"},
        "classifier_heldout_accuracy": clf_acc,
        "frechet_heldout_real_vs_train": floor,
        "runs": runs,
        "summary": summary,
        "table": table,
        "total_seconds": total,
        "environment": {
            "torch": torch.__version__, "python": platform.python_version(), "device": args.device,
            "workers": args.workers, "threads_per_worker": threads, "cpu_count": os.cpu_count(),
            "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
