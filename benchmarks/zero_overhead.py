"""What SRA costs under DeepSpeed ZeRO-2 and ZeRO-3, on CPU with two gloo processes.

- memory: the bytes each rank's owned EMA teacher holds under ZeRO-3 (its float32 slice of every
  trained weight) next to what the owned full copy holds without ZeRO-3 (every weight, float32), and the head;
- time: the training step with SRA (student forward, teacher pass up to block L_t, head, backward,
  engine step, EMA update) over the plain step (forward, backward, engine step), for ZeRO-2 and ZeRO-3.
  Both engines live in the same processes and are timed in interleaved repeats; the ratio is the
  median over repeats of (SRA time / plain time).

    python benchmarks/zero_overhead.py --out benchmarks/results/zero-overhead-cpu

CPU timings say how the parts compare, not what a GPU cluster does: no overlap of communication and
compute, gloo on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from benchmarks._bench import nbytes

WORLD = 2


def config(stage: int, batch: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": batch * WORLD,
        # threshold 0: every weight is partitioned, as most of a large model's are at the default threshold.
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def build(args: argparse.Namespace, stage: int, with_sra: bool):
    import deepspeed

    from examples.models import SiT
    from sra_plugin import ModelWithHeads, SelfRepresentationAlignment

    torch.manual_seed(0)
    model = SiT(input_size=args.size, patch_size=2, in_channels=4, hidden_size=args.hidden, depth=args.depth,
                num_heads=args.hidden // 64, num_classes=10, class_dropout_prob=0.0)
    sra = None
    module = model
    if with_sra:
        sra = SelfRepresentationAlignment(model, student_layer=args.depth // 4 or 1, teacher_layer=args.depth * 2 // 3)
        module = ModelWithHeads(model, sra)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config(stage, args.batch))
    return engine, sra


def batch(args: argparse.Namespace, gen: torch.Generator):
    from sra_plugin import LinearPath, NoiseGap

    x0 = torch.randn(args.batch, 4, args.size, args.size, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.rand(args.batch, generator=gen)
    s = NoiseGap().sample(t, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    x_t, x_s = LinearPath().pair(x0, noise, t, s)
    return x_t, x_s, t, s, y, noise - x0


def step(engine, sra, data) -> None:
    x_t, x_s, t, s, y, target = data
    loss = F.mse_loss(engine(x_t, t, y), target)
    if sra is not None:
        loss = loss + sra(engine, x_t, x_s, t, s, y)
    engine.backward(loss)
    engine.step()
    if sra is not None:
        sra.update_teacher()


def timed(engine, sra, args, gen) -> float:
    data = [batch(args, gen) for _ in range(args.steps)]
    dist.barrier()
    start = time.perf_counter()
    for d in data:
        step(engine, sra, d)
    dist.barrier()
    return (time.perf_counter() - start) / args.steps


def worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.utils.logger.setLevel("ERROR")
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    result: dict = {}
    gen = torch.Generator().manual_seed(rank)
    for stage in (2, 3):
        plain, _ = build(args, stage, with_sra=False)
        engine, sra = build(args, stage, with_sra=True)
        for _ in range(args.warmup):  # the first steps build ZeRO-3's trace and the EMA
            step(plain, None, batch(args, gen))
            step(engine, sra, batch(args, gen))
        ratios, plain_s, sra_s = [], [], []
        for repeat in range(args.repeats):
            order = [(plain, None), (engine, sra)] if repeat % 2 == 0 else [(engine, sra), (plain, None)]
            times = {id(e): timed(e, a, args, gen) for e, a in order}
            plain_s.append(times[id(plain)])
            sra_s.append(times[id(engine)])
            ratios.append(sra_s[-1] / plain_s[-1])
        ema_state = [v for v in sra.ema.state_dict().values() if v.dim() > 0]
        trained = [p for p in sra._student.parameters() if p.requires_grad]
        full_numel = sum(int(torch.Size(getattr(p, "ds_shape", p.shape)).numel()) for p in trained)
        result[f"zero{stage}"] = {
            "plain_step_s": statistics.median(plain_s),
            "sra_step_s": statistics.median(sra_s),
            "ratio_median": statistics.median(ratios),
            "ratios": ratios,
            "ema_bytes_this_rank": nbytes(ema_state),
            "owned_copy_bytes": full_numel * 4,
            "ema_sharded": bool(sra.ema.sharded),
            "head_params": sum(int(torch.Size(getattr(p, "ds_shape", p.shape)).numel()) for p in sra.head.parameters()),
            "model_params": full_numel,
        }
        del plain, engine, sra
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--size", type=int, default=16, help="latent side; tokens = (size / 2) ** 2")
    parser.add_argument("--batch", type=int, default=8, help="per rank")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.txt")
    args = parser.parse_args(argv)
    from tests._models import free_port

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(free_port(), args, tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]
    lines = [
        f"SiT hidden {args.hidden}, depth {args.depth}, {(args.size // 2) ** 2} tokens, batch {args.batch} per rank, "
        f"{WORLD} CPU processes (gloo), {args.repeats} interleaved repeats of {args.steps} steps, torch {torch.__version__}",
        f"{'':8}{'plain s/step':>14}{'SRA s/step':>12}{'SRA/plain':>11}{'EMA bytes/rank':>16}{'owned copy':>12}{'EMA/copy':>10}",
    ]
    for stage in ("zero2", "zero3"):
        r0 = ranks[0][stage]
        held = [r[stage]["ema_bytes_this_rank"] for r in ranks]
        lines.append(f"{stage:8}{r0['plain_step_s']:14.3f}{r0['sra_step_s']:12.3f}{r0['ratio_median']:11.2f}"
                     f"{max(held):16,}{r0['owned_copy_bytes']:12,}{max(held) / r0['owned_copy_bytes']:10.2f}")
    lines.append(f"model {ranks[0]['zero3']['model_params']:,} parameters, head {ranks[0]['zero3']['head_params']:,}; "
                 "EMA bytes: the owned teacher's float32 state on the rank holding most; ratio: median of per-repeat ratios")
    text = "\n".join(lines)
    print(text)
    summary = {"args": vars(args), "ranks": ranks, "world": WORLD, "torch": torch.__version__}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(summary, indent=1, default=str))
        Path(args.out + ".txt").write_text(text + "\n")
    return summary


if __name__ == "__main__":
    main()
