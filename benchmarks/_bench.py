"""What the benchmark scripts share: clocks and per-round ratios, memory readings, the machine's description,
the command that produced a result, tables, and running jobs in worker processes.

A helper module, not a benchmark: ``from benchmarks._bench import ...`` (the scripts put the repository root
on ``sys.path`` when run as files).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

MiB = 2**20


# ---------------------------------------------------------------------------------------- time
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_clock(timer: str, device: torch.device, parser: argparse.ArgumentParser,
                 device_flag: str) -> tuple[Callable[[], float], str]:
    """The clock for ``--timer`` (``auto``, ``cpu``, ``wall``) and its name: process CPU time on CPU with one
    torch thread (other processes' load on a shared machine hardly moves it), else wall-clock time."""
    if timer == "auto":
        timer = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    if timer == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        parser.error(f"--timer=cpu is not accepted with --device={device_flag} and {torch.get_num_threads()} threads: "
                     "use it on CPU with --threads 1, or --timer wall")
    if timer == "cpu":
        return time.process_time, "process CPU time"
    return time.perf_counter, "wall-clock time"


def round_ratios(times: Sequence[float], baseline: Sequence[float]) -> tuple[float, float, float]:
    """Median and quartiles over rounds of ``times[r] / baseline[r]``: a ratio within each round, so that slow
    drifts of the machine's load cancel."""
    per_round = [a / p for a, p in zip(times, baseline)]
    median = statistics.median(per_round)
    q1, _, q3 = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else [median] * 3
    return median, q1, q3


# ---------------------------------------------------------------------------------------- memory
class Memory:
    """Peak and resident memory: CUDA allocator statistics, or the process RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._libc = None
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else "ru_maxrss"
        if not self.cuda and sys.platform.startswith("linux"):
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.method = "RSS high-water mark (VmHWM)"
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                pass

    def _status(self, key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(key)

    def settle(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        elif self._libc is not None:
            self._libc.malloc_trim(0)  # hand freed heap back, so the next step's peak is its own

    def resident(self) -> int:
        self.settle()
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        if self.method.startswith("RSS"):
            return self._status("VmRSS:")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def start(self) -> int:
        before = self.resident()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method.startswith("RSS"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return before

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.method.startswith("RSS"):
            return self._status("VmHWM:")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------- training
def adamw(params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """AdamW as DiT/SiT train (lr 1e-4, no weight decay), fused where torch has it: the same in every kind."""
    try:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


def threads_per_worker(threads: int | None, workers: int) -> int:
    """``--threads``, or the machine's cores shared out between ``workers`` processes."""
    return threads or max(1, (os.cpu_count() or 1) // workers)


def run_jobs(fn: Callable[[Any], Any], jobs: list, workers: int) -> list:
    """``[fn(job) for job in jobs]``, in this process (``workers == 1``) or in a pool of spawned ones."""
    if workers == 1:
        return [fn(job) for job in jobs]
    with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        return pool.map(fn, jobs, chunksize=1)


# ---------------------------------------------------------------------------------------- where and how
def machine(device: torch.device) -> str:
    """The GPU's name, or the CPU model with its cores and torch threads; and the torch version."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def device_label(device: str) -> str:
    """The GPU's name for a ``cuda`` device, else the processor as ``platform`` names it."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def command_line(argv: list[str] | None) -> str:
    """The command line of this run: ``python SCRIPT ARGS`` from ``sys.argv``, or ``argv`` when called from Python."""
    if argv is None:
        return "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    return " ".join(map(str, argv))


def write_json(path: Path, data: Any) -> Path:
    """``data`` as JSON (indent 1, a final newline), its folder made if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------- output
def markdown_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with its columns padded to one width."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def save_gray_png(path: Path, image: Any) -> Path:
    """A grid of digits (values in [0, 1], dark on light) as a PNG; needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, image, cmap="gray_r", vmin=0, vmax=1)
    return path
