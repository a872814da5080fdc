"""CKA of two independent random feature sets by sample count: the plain (biased) linear CKA against
the debiased one (unbiased HSIC) that ``sra_plugin.report`` uses. Unrelated features should read 0.

    python benchmarks/cka_small_n.py --features 64 --draws 200 --json benchmarks/results/cka_small_n.json

For each n: the mean and standard deviation over the draws, and the share of draws whose debiased
CKA is above 0.2 in magnitude. The report's ``FEW_IMAGES`` (32) and ``noise_level`` (1.4 / n) come from
these figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sra_plugin.report import debiased_cka, linear_cka


def measure(n: int, features: int, draws: int) -> dict[str, float]:
    biased, debiased = [], []
    for seed in range(draws):
        gen = torch.Generator().manual_seed(seed)
        x, y = torch.randn(n, features, generator=gen), torch.randn(n, features, generator=gen)
        biased.append(linear_cka(x, y))
        debiased.append(debiased_cka(x, y))
    b, d = torch.tensor(biased), torch.tensor(debiased)
    return {"n": n, "biased_mean": float(b.mean()), "biased_sd": float(b.std()), "debiased_mean": float(d.mean()),
            "debiased_sd": float(d.std()), "debiased_above_0.2": float((d.abs() > 0.2).float().mean())}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--features", type=int, nargs="+", default=[64], help="feature counts of both sides")
    p.add_argument("--samples", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128], help="sample counts n")
    p.add_argument("--draws", type=int, default=200, help="independent pairs per n")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for features in args.features:
        for n in args.samples:
            row = {"features": features, **measure(n, features, args.draws)}
            rows.append(row)
            print(f"features {features:4d}  n {n:4d}  biased {row['biased_mean']:.3f} (sd {row['biased_sd']:.3f})  "
                  f"debiased {row['debiased_mean']:+.3f} (sd {row['debiased_sd']:.3f})  |debiased| > 0.2: {row['debiased_above_0.2']:.2f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
