"""SRA 2's term against the diffusion loss when the latent is larger: the mnist16 digits scaled by 1 and
10 (video VAEs give latents of std well above 1), LatentAlignment with its loss and weight, the target
raw or z-scored per sample (``target_norm="sample"``), smooth-L1 (the default) and MSE.

    python benchmarks/latent_scale.py --json benchmarks/results/latent_scale.json

For each (loss, scale, target_norm): the same SiT, batches, times and noise; the diffusion loss (velocity
MSE) and the weighted SRA 2 term at the first step and averaged over the last ``--window`` steps,
their ratio, and the gradient norm each puts on the shared weights at the first step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.digits import MODEL_SIZES, build_sit, load_images
from sra_plugin import LatentAlignment, LinearPath


def grad_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def run(scale: float, target_norm: str | None, loss: str, args: argparse.Namespace) -> dict:
    data = load_images(args.dataset)
    torch.manual_seed(args.seed)
    model = build_sit(args.model_size, image_size=data.image_size)
    align = LatentAlignment(model, layer=MODEL_SIZES[args.model_size][4], loss=loss, target_norm=target_norm)
    shared = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([*shared, *align.head.parameters()], lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 2)
    path = LinearPath()
    diffs, terms, first = [], [], {}
    for step in range(args.steps):
        idx = torch.randint(0, len(data.y_train), (args.batch_size,), generator=gen)
        x0, y = data.x_train[idx] * scale, data.y_train[idx]
        t = torch.rand(args.batch_size, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = path(x0, noise, t)
        diff = F.mse_loss(model(x_t, t, y), path.velocity(x0, noise))
        term = align(model, x_t, x0, t, y)
        if step == 0:
            first = {"diffusion_loss": diff.item(), "sra2_term": term.item(),
                     "grad_norm_diffusion": grad_norm(diff, shared), "grad_norm_sra2": grad_norm(term, shared)}
        opt.zero_grad(set_to_none=True)
        (diff + term).backward()
        torch.nn.utils.clip_grad_norm_([*shared, *align.head.parameters()], 1.0)
        opt.step()
        diffs.append(diff.item())
        terms.append(term.item())
    last_d, last_t = float(np.mean(diffs[-args.window:])), float(np.mean(terms[-args.window:]))
    return {"scale": scale, "target_norm": target_norm, "loss": loss, "weight": align.weight, "first_step": {**first, "ratio": first["sra2_term"] / first["diffusion_loss"]},
            "last_steps": {"diffusion_loss": last_d, "sra2_term": last_t, "ratio": last_t / last_d},
            "latent_std": float((data.x_train * scale).std())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist16")
    p.add_argument("--model-size", default="small", choices=sorted(MODEL_SIZES))
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0])
    p.add_argument("--losses", nargs="+", default=["smooth_l1", "mse"], help="LatentAlignment losses (weight: its default)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [run(scale, norm, loss, args) for loss in args.losses for scale in args.scales for norm in (None, "sample")]
    print(f"{'loss':>9} {'scale':>6} {'target_norm':>11} | first step: diffusion   SRA 2 term  ratio  |grad| diff  |grad| SRA2"
          f" | last {args.window}: diffusion  SRA 2 term  ratio")
    for r in rows:
        f, last = r["first_step"], r["last_steps"]
        print(f"{r['loss']:>9} {r['scale']:>6g} {str(r['target_norm']):>11} | {f['diffusion_loss']:>10.4f} {f['sra2_term']:>12.4f} {f['ratio']:>6.3f}"
              f" {f['grad_norm_diffusion']:>11.4f} {f['grad_norm_sra2']:>11.4f} | {last['diffusion_loss']:>10.4f}"
              f" {last['sra2_term']:>11.4f} {last['ratio']:>6.3f}")
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) if argv is None else " ".join(argv)
    result = {"command": command, "config": {k: v for k, v in vars(args).items() if k != "json"}, "runs": rows}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
