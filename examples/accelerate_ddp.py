"""SRA with several processes: wrap both, ``DDP(model)`` and ``DDP(sra)``, then train as usual.

Plain torch.distributed (gloo, runs on CPU)::

    torchrun --nproc_per_node 2 examples/accelerate_ddp.py --steps 200
    python examples/accelerate_ddp.py --steps 200        # one process, same code

With Hugging Face accelerate (``pip install accelerate``), the same loop is::

    accelerator = Accelerator()
    model, sra, opt = accelerator.prepare(model, sra, opt)   # wraps model and sra in DDP
    ...
    pred = model(x_t, t, y)
    loss = F.mse_loss(pred, v) + sra(model, x_t, x_s, t, s, y)
    accelerator.backward(loss)
    opt.step(); opt.zero_grad()
    accelerator.unwrap_model(sra).update_teacher()

(``accelerate launch --num_processes 2 examples/accelerate_ddp.py --accelerate``). Each rank trains on
its own shard of sklearn's 8x8 digits. Both modes log the same figures: the diffusion loss and
"alignment", the raw SRA loss before its weight (``sra.metrics["align_loss"]``; the term added to the
loss is ``weight`` times it), both of rank 0; and at the end both check that student, head and teacher
are identical on every rank.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from examples.models import SiT
from examples._logging import quiet_deepspeed_cpu_notice
from sra_plugin import LinearPath, NoiseGap, SelfRepresentationAlignment


def load_shard(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8 - 1
    y = torch.tensor(digits.target)
    return x[rank::world], y[rank::world]


def build(seed: int) -> tuple[nn.Module, SelfRepresentationAlignment]:
    torch.manual_seed(seed)
    model = SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=6, num_heads=4, num_classes=10)
    # Build sra on the bare model, before any wrapper: DDP(sra) then broadcasts rank 0's head and teacher.
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, ema_decay=0.995)
    return model, sra


def train_step(model: nn.Module, sra_call: nn.Module, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    path, gap = LinearPath(), NoiseGap(max_gap=0.2)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    t = torch.rand(len(x0), generator=gen)
    s = gap.sample(t, generator=gen).to(x0.device)
    t = t.to(x0.device)
    x_t, x_s = path.pair(x0, noise, t, s)
    diff = F.mse_loss(model(x_t, t, y), path.velocity(x0, noise))
    return diff, sra_call(model, x_t, x_s, t, s, y)


def fingerprint(*modules: nn.Module) -> torch.Tensor:
    """One float64 per module: the sum of all its parameters, to compare ranks."""
    return torch.stack([sum(p.detach().double().sum() for p in m.parameters()) for m in modules])


def log_step(step: int, steps: int, diff: torch.Tensor, sra: SelfRepresentationAlignment) -> None:
    if step % 50 == 0 or step == steps - 1:
        print(f"step {step}: diffusion {diff.item():.4f}, alignment (raw, before weight {sra.metrics['weight']:g}) "
              f"{sra.metrics['align_loss']:.4f}", flush=True)


def check_ranks_agree(model: nn.Module, sra: SelfRepresentationAlignment, steps: int) -> None:
    """Compare every rank's student, head and teacher with rank 0's; print the verdict on rank 0, exit 1 if any differs."""
    mine = fingerprint(model, sra.head, sra.teacher)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        ref = mine.clone()
        dist.broadcast(ref, 0)
        flags = torch.tensor([float(torch.allclose(mine, ref, rtol=0, atol=1e-9))])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        agree, rank = flags.item() == 1.0, dist.get_rank()
    else:
        agree, rank = True, 0
    if rank == 0:
        print(f"{world} rank(s), {steps} steps: student, head and teacher {'agree' if agree else 'DIFFER'} across ranks")
    if not agree:
        raise SystemExit(1)


def run_torch(args: argparse.Namespace) -> None:
    if "RANK" not in os.environ:  # started with plain `python`: a one-process group
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        x_all, y_all = load_shard(rank, world)
        # Different seeds per rank on purpose: DDP makes rank 0's weights everyone's.
        model, sra = build(args.seed + rank)
        ddp_model, ddp_sra = DDP(model), DDP(sra)
        opt = torch.optim.AdamW([*ddp_model.parameters(), *sra.head.parameters()], lr=1e-3)
        gen = torch.Generator().manual_seed(1000 + rank)
        for step in range(args.steps):
            idx = torch.randint(0, len(y_all), (args.batch_size,), generator=gen)
            diff, align = train_step(ddp_model, ddp_sra, x_all[idx], y_all[idx], gen)
            (diff + align).backward()
            opt.step()
            opt.zero_grad()
            sra.update_teacher()  # on the bare object: DDP(sra) does not expose its methods
            if rank == 0:
                log_step(step, args.steps, diff, sra)
        check_ranks_agree(model, sra, args.steps)
        dist.barrier()  # leave together (see run_accelerate)
    finally:
        dist.destroy_process_group()


def run_accelerate(args: argparse.Namespace) -> None:
    quiet_deepspeed_cpu_notice()
    try:
        from accelerate import Accelerator
    except ImportError:
        raise SystemExit("--accelerate needs Hugging Face accelerate: pip install accelerate") from None
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    x_all, y_all = load_shard(rank, world)
    model, sra = build(args.seed + rank)  # as above: prepare's DDP makes rank 0's weights everyone's
    opt = torch.optim.AdamW([*model.parameters(), *sra.head.parameters()], lr=1e-3)
    model, sra_call, opt = accelerator.prepare(model, sra, opt)
    gen = torch.Generator().manual_seed(1000 + rank)
    for step in range(args.steps):
        idx = torch.randint(0, len(y_all), (args.batch_size,), generator=gen)
        x0, y = x_all[idx].to(accelerator.device), y_all[idx].to(accelerator.device)
        diff, align = train_step(model, sra_call, x0, y, gen)
        accelerator.backward(diff + align)
        opt.step()
        opt.zero_grad()
        accelerator.unwrap_model(sra_call).update_teacher()
        if accelerator.is_main_process:
            log_step(step, args.steps, diff, sra)
    check_ranks_agree(accelerator.unwrap_model(model), sra, args.steps)
    # Every rank leaves the group together: a rank that exits while its peer still talks to it
    # makes gloo abort the peer (SIGABRT) at interpreter shutdown.
    accelerator.wait_for_everyone()
    accelerator.end_training()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="SRA with DDP (torch.distributed, gloo) or accelerate")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size per process (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model: rank r builds it from seed + r, and DDP keeps rank 0's weights "
                   "(rank r's data always come from seed 1000 + r) (default: %(default)s)")
    p.add_argument("--accelerate", action="store_true", help="use Hugging Face accelerate instead of plain DDP (default: off, plain DDP)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error(f"--steps {args.steps} and --batch-size {args.batch_size} must be >= 1")
    (run_accelerate if args.accelerate else run_torch)(args)


if __name__ == "__main__":
    main()
