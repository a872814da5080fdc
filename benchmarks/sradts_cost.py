"""Cost of one SRADTS step against a plain training step, on a small SiT on the CPU.

Three timings per repeat, in one process, the median over repeats reported:
- ``plain``: ``model(x_t, t, y)`` on all tokens, MSE against ``noise - x0``, backward;
- ``student``: the SRADTS student passes (one per token group) and their backward, at weight 0 (no teacher pass);
- ``sradts``: a full SRADTS step: student passes, the EMA teacher's passes up to its block (no grad),
  the head and the alignment loss, backward;
- ``pt-student`` and ``pertoken``: the same two with ``separate=False`` (one pass over all tokens with
  per-token time, the per-token forwards swapped onto the model for the pass).

    python benchmarks/sradts_cost.py                       # SiT depth 12, width 192, 16x16 latents (64 tokens), batch 8
    python benchmarks/sradts_cost.py --repeats 30 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.models import SiT  # noqa: E402
from sra_plugin import SRADTS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--size", type=int, default=16, help="latent side (tokens = (size / 2) ** 2)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = SiT(input_size=args.size, patch_size=2, in_channels=4, hidden_size=args.width, depth=args.depth,
                num_heads=args.heads, num_classes=10).train()
    dts = SRADTS(model)  # blocks 3 -> 8 of 12 (fractions 0.25, 2/3), groups 0.25 / 0.75, max gap 0.2
    student_only = SRADTS(model, weight=0.0)
    per_token = SRADTS(model, separate=False)
    per_token_student = SRADTS(model, separate=False, weight=0.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, 4, args.size, args.size, generator=g)
    noise = torch.randn_like(x0)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    t = torch.rand(args.batch, generator=g)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise

    def plain() -> None:
        F.mse_loss(model(x_t, t, y), noise - x0).backward()

    def step(objective: SRADTS):
        def run() -> None:
            pred, align = objective(model, x0, noise, y, generator=torch.Generator().manual_seed(1))
            (F.mse_loss(pred, noise - x0) + align).backward()
        return run

    runs = {"plain": plain, "student": step(student_only), "sradts": step(dts),
            "pt-student": step(per_token_student), "pertoken": step(per_token)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.warmup + args.repeats):
        for name, run in runs.items():  # interleaved, so that drifts in machine load hit all three alike
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                times[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in times.items()}
    tokens = (args.size // 2) ** 2
    print(f"SiT depth {args.depth}, width {args.width}, {tokens} tokens, batch {args.batch}, CPU threads {args.threads}, "
          f"median of {args.repeats} (torch {torch.__version__})")
    for name in runs:
        print(f"  {name:8s} {median[name] * 1e3:8.1f} ms   x{median[name] / median['plain']:.2f} of plain")
    print(f"  teacher pass and head: x{(median['sradts'] - median['student']) / median['plain']:.2f} of plain "
          f"(separate), x{(median['pertoken'] - median['pt-student']) / median['plain']:.2f} (per-token)")


if __name__ == "__main__":
    main()
