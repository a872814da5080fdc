"""Shared test helpers: tiny reference backbones (the examples' DiT and SiT at test size, with adaLN
gates randomised so that every block does something from the first step), the one batch recipe
(``flow_batch``), ``no_warning`` and ``has_grad``, ``free_port`` and ``torchrun`` for the multi-process
tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from typing import Callable

import torch
from torch import nn

from examples.models import DiT, SiT

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=2, num_classes=10)


def randomise_gates(model: nn.Module, std: float = 0.05) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "adaLN_modulation"):
                nn.init.normal_(module.adaLN_modulation[-1].weight, std=std)
                nn.init.normal_(module.adaLN_modulation[-1].bias, std=std)
    return model


def tiny_sit(seed: int = 0, init: Callable[[nn.Module], nn.Module] = randomise_gates, **overrides) -> SiT:
    """A ``TINY`` SiT (``overrides`` change its arguments) built after ``torch.manual_seed(seed)``, then
    ``init(model)``: by default its adaLN gates randomised."""
    torch.manual_seed(seed)
    return init(SiT(**{**TINY, **overrides}))


def tiny_dit(seed: int = 0, **overrides) -> DiT:
    torch.manual_seed(seed)
    return randomise_gates(DiT(**{**TINY, **overrides}))


def batch(model: nn.Module, n: int = 4, seed: int = 1, discrete: bool = False):
    """x0, noise, t, y for ``model``: continuous t in (0, 1) or DDPM steps."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, model.in_channels, 8, 8, generator=g)
    noise = torch.randn(n, model.in_channels, 8, 8, generator=g)
    t = torch.randint(200, 1000, (n,), generator=g) if discrete else torch.rand(n, generator=g) * 0.8 + 0.2
    y = torch.randint(0, 10, (n,), generator=g)
    return x0, noise, t, y


def flow_batch(n: int = 4, seed: int = 0):
    """One flow-matching batch for a tiny SiT: ``(x_t, x_s, t, s, y, velocity target)``, from one
    generator so that a seed fixes every draw; t in [0.2, 1), s from the default NoiseGap."""
    from sra_plugin import LinearPath, NoiseGap

    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 4, 8, 8, generator=g)
    noise = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.rand(n, generator=g) * 0.8 + 0.2
    y = torch.randint(0, 10, (n,), generator=g)
    s = NoiseGap().sample(t, generator=g)
    x_t, x_s = LinearPath().pair(x0, noise, t, s)
    return x_t, x_s, t, s, y, noise - x0


def no_warning(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with every warning raised as an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def has_grad(module: nn.Module) -> bool:
    """Whether a backward gave any parameter of ``module`` a non-zero gradient."""
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters())


def optimizer_step(*modules: nn.Module) -> None:
    """A torch optimizer step that changes nothing (SGD at lr 0): what ``update_teacher()`` needs to see
    before it moves the EMA and the step (``sra_plugin.steps``), in tests that set weights by hand."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    torch.optim.SGD(params or [nn.Parameter(torch.zeros(1))], lr=0.0).step()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# torch's gloo backend can abort a process during interpreter shutdown, after everything it ran has
# finished and printed ("terminate called without an active exception"; the run's own output is complete).
# Seen about once in 20 runs on a loaded 2-core machine, with the process group destroyed and every rank
# past a barrier; pytorch/pytorch#190489 reports the same message from gloo at exit.
GLOO_EXIT_ABORT = "terminate called without an active exception"


def torchrun(script_and_args: list[str], *, done: str, **run_kwargs) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2 SCRIPT ARGS`` on a free port.

    Run once more only when the run printed ``done`` (its result line, after every check) and a rank then
    died of gloo's exit abort (SIGABRT); the second run must pass on its own."""
    env = dict(run_kwargs.pop("env", None) or os.environ)
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(key, None)  # torchrun sets its ranks' own

    def once() -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", str(free_port()), *script_and_args]
        return subprocess.run(command, capture_output=True, text=True, env=env, **run_kwargs)

    proc = once()
    aborted_at_exit = GLOO_EXIT_ABORT in proc.stderr and "(SIGABRT)" in proc.stderr
    if proc.returncode != 0 and done in proc.stdout and aborted_at_exit:
        proc = once()
    return proc


def _gloo_worker(rank: int, port: int, out_dir: str, world: int, train, runs: dict) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {name: train(rank, **kwargs) for name, kwargs in runs.items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: a rank whose peer already left can be aborted by gloo
    finally:
        dist.destroy_process_group()


def spawn_ranks(train, runs: dict, world: int) -> list[dict]:
    """On ``world`` spawned gloo processes, ``train(rank, **kwargs)`` for every entry of ``runs``; returns what
    each rank's runs returned (one spawn serves every configuration: process start-up dominates)."""
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_gloo_worker, args=(free_port(), out_dir, world, train, runs), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world)]


def identical(a: dict, b: dict) -> bool:
    """Two dicts of tensors with the same keys and bitwise equal values."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
