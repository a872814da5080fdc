"""Alignment in LoRA fine-tuning: a base SiT pretrained once on some digits, then LoRA fine-tuned on
the other digits with every variant, several seeds; quality on the new digits and forgetting of the old.

    python benchmarks/finetune_quality.py                      # mnist16, base on 0-4, LoRA on 5-9, 3 seeds

The base (``variant="none"``, seed 0, ``--base-steps`` steps on ``--base-classes``) is trained once and
cached in ``--run-dir`` (its EMA weights; never committed). Every fine-tune starts from those weights,
adds peft LoRA of ``--lora-rank`` on the blocks' and final layer's linears (the label table trains too:
the new digits' embeddings were never trained; ``benchmarks.digits.add_lora``), and trains
``--steps`` steps on ``--new-classes`` only. As in ``benchmarks/quality.py``, for each seed every variant
sees the same batches, times and noise, and is measured on its EMA. Metrics, per split of classes
(``new``: the fine-tuned digits, ``old``: the base's digits, for forgetting): the Frechet distance of
class-conditional samples to that split's training digits, the feature CNN's accuracy on them, the
held-out velocity MSE on that split; and linear probes on blocks L_s and L_t over all ten digits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks._bench import command_line, device_label, run_jobs, save_gray_png, threads_per_worker
from benchmarks.quality import _variant_recipe, format_table, markdown_table, plot_curves, summarize
from benchmarks.digits import (
    DATASETS,
    MODEL_SIZES,
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
    subset,
    tile_grid,
    train,
    variant_unavailable,
)


def _classes(text: str) -> tuple[int, ...]:
    """'0-4' or '5,7,9' -> a tuple of digits."""
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-"))
            return tuple(range(lo, hi + 1))
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted: use a range like 0-4 or a list like 5,7,9") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASETS), default="mnist16")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="small")
    p.add_argument("--base-classes", type=_classes, default=(0, 1, 2, 3, 4))
    p.add_argument("--new-classes", type=_classes, default=(5, 6, 7, 8, 9))
    p.add_argument("--base-steps", type=int, default=1500, help="steps of the base model (all weights, no alignment)")
    p.add_argument("--base-lr", type=float, default=1e-3)
    p.add_argument("--base-ema-decay", type=float, default=0.995)
    p.add_argument("--steps", type=int, default=300, help="LoRA fine-tuning steps of every run")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.98, help="EMA decay of the fine-tunes (short runs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--probe-t", type=float, default=0.5)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--classifier", type=Path, default=None)
    p.add_argument("--classifier-epochs", type=int, default=15)
    p.add_argument("--run-dir", type=Path, default=Path("outputs/finetune"), help="where the base model is cached")
    p.add_argument("--samples-dir", type=Path, default=None)
    p.add_argument("--data-limit", type=int, default=None,
                   help="use only the first N training and N/4 held-out digits (smoke runs; default: all)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/finetune.json"))
    p.add_argument("--table", type=Path, default=None)
    p.add_argument("--plots", type=Path, default=None)
    args = p.parse_args(argv)
    for name in ("steps", "base_steps", "batch_size", "per_class", "sample_steps", "workers", "lora_rank", "classifier_epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} is not accepted: use an int >= 1")
    if set(args.base_classes) & set(args.new_classes):
        p.error(f"--base-classes {args.base_classes} and --new-classes {args.new_classes} overlap: use disjoint digits")
    if args.data_limit is not None and args.data_limit < 8:
        p.error(f"--data-limit {args.data_limit} is not accepted: use an int >= 8")
    if len(set(args.variants)) != len(args.variants):
        p.error(f"--variants {args.variants} names a variant twice")
    for v in args.variants:
        reason = variant_unavailable(v)
        if reason is not None:
            p.error(reason)
    if args.classifier is None:
        args.classifier = Path("benchmarks/results") / f"{args.dataset}_classifier.pt"
    return args


def _base_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(steps=args.base_steps, batch_size=args.batch_size, lr=args.base_lr, model_size=args.model_size,
                       ema_decay=args.base_ema_decay, seed=0, device=args.device)


def _tune_config(args: argparse.Namespace, seed: int) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, model_size=args.model_size,
                       ema_decay=args.ema_decay, seed=seed, device=args.device, lora_rank=args.lora_rank)


def base_model(args: argparse.Namespace, data: Digits) -> tuple[dict, Path, float]:
    """The base's EMA weights, trained once per configuration and cached in ``--run-dir``."""
    cfg = _base_config(args)
    key = json.dumps({**config_dict(cfg), "dataset": args.dataset, "classes": list(args.base_classes)}, sort_keys=True)
    path = args.run_dir / f"base_{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["state_dict"], path, saved["cpu_seconds"]
    run = train(cfg, subset(data, args.base_classes), variant="none", progress=False)
    state = {k: v.cpu() for k, v in run.ema.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": key, "state_dict": state, "cpu_seconds": run.cpu_seconds}, path)
    return state, path, run.cpu_seconds


def evaluate(model: torch.nn.Module, data: Digits, clf, args: argparse.Namespace, seed: int, layers: tuple[int, int]):
    """Per split (new, old): Frechet, class accuracy, held-out loss; probes over all digits."""
    out: dict[str, float] = {}
    grids = {}
    for split, classes in (("new", args.new_classes), ("old", args.base_classes)):
        part = subset(data, classes)
        labels = class_grid_labels(args.per_class, classes)
        gen = torch.Generator().manual_seed(seed + 100)  # the same starting noise for every variant of a seed
        samples = euler_sample(model, labels, num_steps=args.sample_steps, cfg_scale=args.cfg_scale, generator=gen)
        quality = sample_quality(clf, samples, labels, part.x_train)
        out[f"{split}_frechet"] = quality["frechet"]
        out[f"{split}_class_accuracy"] = quality["class_accuracy"]
        out[f"{split}_heldout_diffusion_loss"] = heldout_diffusion_loss(model, part)
        grids[split] = samples
    for layer in layers:
        out[f"probe_block{layer}"] = linear_probe(model, data, layer, args.probe_t)
    return out, grids


def run_one(job: tuple) -> dict:
    """LoRA-fine-tune the base with one (seed, variant) and measure its EMA (also every --eval-every steps)."""
    args, seed, variant, threads, base_state = job
    torch.set_num_threads(threads)
    data = first_digits(load_images(args.dataset), args.data_limit)
    clf, _ = load_or_train_classifier(args.classifier, data, epochs=args.classifier_epochs)
    cfg = _tune_config(args, seed)
    layers = cfg.layers()
    curve: list[dict] = []

    def checkpoint(step: int, result) -> None:
        if step < args.steps:
            curve.append({"step": step, **evaluate(result.ema, data, clf, args, seed, layers)[0]})

    run = train(cfg, subset(data, args.new_classes), variant=variant, progress=False, init_state=base_state,
                callback=checkpoint if args.eval_every else None, callback_every=args.eval_every)
    t0 = time.perf_counter()
    final, grids = evaluate(run.ema, data, clf, args, seed, layers)
    curve.append({"step": args.steps, **final})
    if args.samples_dir is not None:
        both = torch.cat([grids["old"], grids["new"]])  # rows: old digits, then the new ones
        save_gray_png(args.samples_dir / f"finetune_seed{seed}_{variant}.png", tile_grid(both, args.per_class))
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    out = {"seed": seed, "variant": variant, **final, "seconds_per_step": run.seconds / args.steps,
           "train_cpu_seconds": run.cpu_seconds, "eval_seconds": time.perf_counter() - t0,
           "trainable_parameters": trainable, "curve": curve}
    print(f"  seed {seed} {variant:<15} " + ", ".join(f"{k} {v:.4f}" for k, v in out.items() if isinstance(v, float)), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    wall = time.perf_counter()
    threads = threads_per_worker(args.threads, args.workers)
    torch.set_num_threads(threads)
    data = first_digits(load_images(args.dataset), args.data_limit)
    clf, clf_acc = load_or_train_classifier(args.classifier, data, epochs=args.classifier_epochs)
    base_state, base_path, base_cpu = base_model(args, data)
    layers = _tune_config(args, args.seeds[0]).layers()
    from benchmarks.digits import build_sit

    base = build_sit(args.model_size, image_size=data.image_size)
    base.load_state_dict(base_state)
    base_metrics, base_grids = evaluate(base, data, clf, args, args.seeds[0], layers)
    recipes = {v: _variant_recipe(args, v) for v in args.variants}
    print(f"finetune: {args.dataset}, SiT {args.model_size}; base on {args.base_classes} ({args.base_steps} steps, "
          f"cached at {base_path}); LoRA r={args.lora_rank} on {args.new_classes}, {args.steps} steps, seeds {args.seeds}\n"
          + "".join(f"  {v}: {r}\n" for v, r in recipes.items())
          + "base: " + ", ".join(f"{k} {v:.4f}" for k, v in base_metrics.items()), flush=True)
    jobs = [(args, seed, variant, threads, base_state) for seed in args.seeds for variant in args.variants]
    runs = run_jobs(run_one, jobs, args.workers)
    for r in runs:  # every curve starts at the base
        r["curve"].insert(0, {"step": 0, **base_metrics})
    summary = summarize(runs, args.seeds, args.variants)
    total = time.perf_counter() - wall
    print("\n" + format_table(summary, len(args.seeds), args.variants))
    print(f"total {total:.0f} s ({total / 60:.1f} min)")
    command = command_line(argv)
    device_name = device_label(args.device)
    floor = {split: frechet_distance(classifier_features(clf, subset(data, c).x_test), classifier_features(clf, subset(data, c).x_train))
             for split, c in (("new", args.new_classes), ("old", args.base_classes))}
    result = {
        "command": command, "dataset": args.dataset, "variants": recipes,
        "base": {"classes": list(args.base_classes), "config": config_dict(_base_config(args)), "cpu_seconds": base_cpu,
                 "metrics": base_metrics},
        "config": {**config_dict(_tune_config(args, args.seeds[0])), "seed": args.seeds,
                   "new_classes": list(args.new_classes)},
        "eval": {"probe_t": args.probe_t, "per_class": args.per_class, "sample_steps": args.sample_steps,
                 "cfg_scale": args.cfg_scale, "eval_every": args.eval_every,
                 "frechet_reference": "training digits of the split", "std": "sample std over seeds (ddof=1)"},
        "classifier_heldout_accuracy": clf_acc, "frechet_heldout_real_vs_train": floor,
        "runs": runs, "summary": summary, "total_seconds": total,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
                        "device_name": device_name, "workers": args.workers, "threads_per_worker": threads,
                        "cpu_count": os.cpu_count()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    if args.samples_dir is not None:
        save_gray_png(args.samples_dir / "finetune_base.png", tile_grid(torch.cat([base_grids["old"], base_grids["new"]]), args.per_class))
    if args.table is not None:
        md = markdown_table(summary, len(args.seeds), args.variants)
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(
            f"`{command}`\n\n{args.dataset}, SiT {args.model_size}: base on digits {list(args.base_classes)} "
            f"({args.base_steps} steps), LoRA r={args.lora_rank} on {list(args.new_classes)}, {args.steps} steps, "
            f"{total / 60:.1f} min on {device_name} ({args.device}); {len(args.seeds)} seeds. Base before fine-tuning: "
            + ", ".join(f"{k} {v:.4f}" for k, v in base_metrics.items()) + ".\n\n" + md + "\n")
        print(f"wrote {args.table}")
    if args.plots is not None:
        plot_curves(args.plots, runs, args.variants,
                    f"{args.dataset} LoRA fine-tune {args.base_classes} -> {args.new_classes}: EMA, mean over seeds (min-max shaded)")
        print(f"wrote {args.plots}")
    return result


if __name__ == "__main__":
    main()
