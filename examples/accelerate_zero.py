"""SRA under accelerate with DeepSpeed ZeRO-2/3 or FSDP (versions 1 and 2), on two CPU processes::

    torchrun --nproc_per_node 2 examples/accelerate_zero.py --mode zero3 --steps 20
    torchrun --nproc_per_node 2 examples/accelerate_zero.py --mode fsdp2 --steps 20

(``--mode zero2 | zero3 | fsdp1 | fsdp2``; tried with torchrun, not with ``accelerate launch``.) On a
machine without GPUs the script sets ``DS_ACCELERATOR=cpu``; on GPUs the same code runs unchanged.

DeepSpeed trains exactly one module, so the aligner's head goes into it with the model::

    sra = SelfRepresentationAlignment(model, ...)                     # before prepare
    engine, opt = accelerator.prepare(ModelWithHeads(model, sra), opt)  # the engine's optimizer trains the head
    pred = engine(x_t, t, y)
    loss = F.mse_loss(pred, v) + sra(engine, x_t, x_s, t, s, y)
    accelerator.backward(loss); opt.step(); opt.zero_grad()
    sra.update_teacher()                       # under ZeRO-3: each rank's float32 EMA of its own slice
    with sra.teacher_weights(): samples = sample(engine)               # the engine gathers EMA weights

FSDP2 (``--mode fsdp2``): the same bundle, with the owned teacher copy sharded block by block like the
model (``fully_shard``), so that its EMA step pairs shard with shard. FSDP1 (``--mode fsdp1``) renames and
flattens the parameters the owned EMA follows, so there the script trains SRA 2 (``LatentAlignment``,
no teacher) and hands the aligner the head FSDP1 wrapped. At the end every rank checks that it holds the
same student, head and teacher (read in full through the engine's gathering), and prints the losses.

On a machine without GPUs, accelerate finds no device backend: the script names gloo
(``InitProcessGroupKwargs``) and, for FSDP, switches accelerate's FSDP mode on by hand (accelerate
enables it for device backends only).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

MODES = ("zero2", "zero3", "fsdp1", "fsdp2")


def cpu_only_setup() -> None:
    """DeepSpeed on CPU: its CPU accelerator, and no shared-memory comm op (it would compile C++ at run time)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed.ops
    except ImportError:
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def cpu_group() -> list:
    """accelerate finds no device backend on a CPU-only machine (and then runs one process): name gloo."""
    from accelerate.utils import InitProcessGroupKwargs

    return [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]


def make_accelerator(mode: str, batch: int):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    if mode.startswith("zero"):
        config = {
            "train_micro_batch_size_per_gpu": batch,
            "gradient_accumulation_steps": 1,
            # threshold 0: even this tiny model's small weights are partitioned, as a large model's are.
            "zero_optimization": {"stage": int(mode[-1]), "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what `accelerate launch --use_deepspeed` sets; torchrun does not
        return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config), kwargs_handlers=cpu_group())
    from examples.models.dit import DiTBlock
    from sra_plugin.heads import MLPHead

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=int(mode[-1]), auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[DiTBlock.__name__, MLPHead.__name__], use_orig_params=True, reshard_after_forward=True if mode == "fsdp2" else "FULL_SHARD",
    )
    accelerator = Accelerator(fsdp_plugin=plugin, kwargs_handlers=cpu_group())
    if accelerator.distributed_type != DistributedType.FSDP and not torch.cuda.is_available() and dist.is_initialized():
        # accelerate enables its FSDP plugin for device backends only; on CPU (gloo) turn it on by hand.
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    return accelerator


def build(seed: int, mode: str):
    """The model and its aligner: SRA with its owned EMA teacher; under FSDP1, SRA 2 (no teacher: the owned
    EMA pairs weights by name, and FSDP1 renames and flattens them; use FSDP2 or DeepSpeed for SRA)."""
    from examples.models import SiT
    from sra_plugin import LatentAlignment, SelfRepresentationAlignment

    torch.manual_seed(seed)
    model = SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=6, num_heads=4, num_classes=10,
                class_dropout_prob=0.0)
    if mode == "fsdp1":
        return model, LatentAlignment(model, layer=2)
    return model, SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, ema_decay=0.99)


def batches(rank: int, steps: int, batch: int):
    from sra_plugin import LinearPath, NoiseGap

    gen = torch.Generator().manual_seed(1000 + rank)
    path, gap = LinearPath(), NoiseGap(max_gap=0.2)
    for _ in range(steps):
        x0 = torch.randn(batch, 1, 8, 8, generator=gen)
        noise = torch.randn(batch, 1, 8, 8, generator=gen)
        t = torch.rand(batch, generator=gen)
        s = gap.sample(t, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        x_t, x_s = path.pair(x0, noise, t, s)
        yield x0, x_t, x_s, t, s, y, path.velocity(x0, noise)


def shard_teacher_like_the_model(mode: str, sra: nn.Module) -> None:
    """The owned teacher copy sharded block by block as accelerate shards the model, so that its EMA step
    pairs shard with shard."""
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in sra.teacher.blocks:
            fully_shard(block)
        fully_shard(sra.teacher)


@torch.no_grad()
def fingerprint(mode: str, module: nn.Module) -> torch.Tensor:
    """The float64 sum of all of ``module``'s weights, read in full (gathered) on every rank."""
    params = list(module.parameters())
    if mode == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return torch.stack([p.double().sum() for p in params]).sum()
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(module):
            return torch.stack([p.double().sum() for p in module.parameters()]).sum()
    return torch.stack([(p.full_tensor() if hasattr(p, "full_tensor") else p).double().sum() for p in params]).sum()


def summary(mode: str, processes: int, steps: int, aligner: str, losses: list[float], same: bool, teacher_pass: bool,
            moved: bool) -> str:
    """The closing line. A mode without a teacher (fsdp1 trains SRA 2) says so instead of comparing a teacher."""
    head = f"{mode}: {processes} processes x {steps} steps; {aligner} loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
    if teacher_pass:
        return head + f"student, head and teacher identical on every rank: {same}; teacher != student: {moved}"
    return head + f"student and head identical on every rank: {same}; no teacher in this mode ({aligner} aligns with the clean latent)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="zero3",
                        help="zero2 / zero3: DeepSpeed ZeRO stage 2 / 3 with SRA; fsdp1: FSDP1 with SRA 2 (no teacher); "
                        "fsdp2: FSDP2 with SRA (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size per process (default: %(default)s)")
    args = parser.parse_args(argv)
    cpu_only_setup()
    warnings.filterwarnings("ignore", category=FutureWarning)
    from sra_plugin import ModelWithHeads, SelfRepresentationAlignment

    accelerator = make_accelerator(args.mode, args.batch_size)
    model, sra = build(0, args.mode)
    teacher_pass = isinstance(sra, SelfRepresentationAlignment)
    bundle = ModelWithHeads(model, sra)  # one module: DeepSpeed trains one; FSDP shards the head with it
    if args.mode == "fsdp2":
        shard_teacher_like_the_model(args.mode, sra)
    optimizer = torch.optim.AdamW([p for p in bundle.parameters() if p.requires_grad], lr=1e-3)
    trained, optimizer = accelerator.prepare(bundle, optimizer)
    if args.mode == "fsdp1":  # FSDP1 wraps the head in a new module (FSDP2 and DeepSpeed keep it): use that one
        sra.head = trained.module.heads[0]
    rank = accelerator.process_index
    losses = []
    for x0, x_t, x_s, t, s, y, v in batches(rank, args.steps, args.batch_size):
        pred = trained(x_t, t, y)
        align = sra(trained, x_t, x_s, t, s, y) if teacher_pass else sra(trained, x_t, x0, t, y)
        accelerator.backward(F.mse_loss(pred, v) + align)
        optimizer.step()
        optimizer.zero_grad()
        if teacher_pass:
            sra.update_teacher()
        losses.append(float(align.detach()))
    if teacher_pass:
        with sra.teacher_weights():
            teacher = fingerprint(args.mode, trained)
    else:
        teacher = torch.zeros((), dtype=torch.float64)
    prints = torch.stack([fingerprint(args.mode, trained), fingerprint(args.mode, sra.head), teacher])
    gathered = [torch.zeros_like(prints) for _ in range(accelerator.num_processes)]
    dist.all_gather(gathered, prints) if accelerator.num_processes > 1 else gathered.__setitem__(0, prints)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    moved = teacher_pass and not torch.equal(prints[0], prints[2])
    if accelerator.is_main_process:
        print(summary(args.mode, accelerator.num_processes, args.steps, type(sra).__name__, losses, same, teacher_pass, moved))
    if not same:
        raise SystemExit(f"{args.mode}: the ranks disagree: {[g.tolist() for g in gathered]}")
    accelerator.wait_for_everyone()  # leave together: a peer that exits mid-talk makes gloo abort this rank
    accelerator.end_training()
    return {"losses": losses, "same": same, "moved": moved}


if __name__ == "__main__":
    main()
