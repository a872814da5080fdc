"""Cost of SRA per training step, against a plain step and the reference loop, in one interleaved run.

Four kinds of step, each on its own copy of the same model, with its own AdamW, timed in turn
(the order rotates every round) and summarised by medians over the rounds:

- ``plain``: forward, diffusion loss, backward, optimizer step, EMA update (every DiT/SiT run has one).
- ``sra``: the same plus ``sra(model, x_t, x_s, t, s, ...)`` (teacher pass stopped after block L_t,
  student tokens from the user's own forward) and ``sra.update_teacher()`` in place of the EMA update
  (the owned teacher is the EMA).
- ``latent``: the plain step plus ``LatentAlignment`` (SRA 2: the same block's tokens through a head
  against the patchified clean latent; no teacher pass), with the plain step's EMA update.
- ``layersync``, ``dispersive``: the plain step plus ``LayerSync`` (blocks L_s -> L_t of the same
  forward, identity head) or ``Dispersive`` (its default, the last block), with the plain step's EMA update.
- ``sra_layersync``: the SRA step plus ``LayerSync`` on the same model: one forward feeds both.
- ``reference``: the loop of the SRA reference code: the EMA teacher runs its full forward (every
  block and the final layer) under ``no_grad``; student and teacher features are read by forward
  hooks; the same head and smooth-L1 loss.

The floor is ``1 + L_t / (3 * depth)``: the teacher pass costs ``L_t / depth`` of a forward, and a
forward is about a third of forward + backward. SRA and the reference also pay for the projection
head (about a third of one block: +0.01 to +0.03 here). The optimizer step and the EMA update cost
the same in all three kinds, so the whole-step ratio sits a little under the forward+backward ratio.

On CPU the default is one torch thread and process CPU time as the clock: on a shared machine the
load of other processes then hardly enters the figures (``--threads N --timer wall`` for elapsed
time). Ratios are medians over the rounds of a step's time over the plain step's time in the same
round. AdamW is fused where torch has it (CPU and CUDA), in all kinds alike.

Peak memory is the most a step adds over what was resident before it: on CPU the kernel's peak RSS
(``VmHWM``, reset before the step through ``/proc/self/clear_refs``; ``ru_maxrss`` elsewhere), on GPU
``torch.cuda.max_memory_allocated``. Growth is the resident memory after the last of a few further
steps minus that after the first.

LoRA (needs peft): the same models with peft LoRA of rank 16 on every block's attention linears, base
frozen. The table gives the bytes SRA holds (its teacher, its head) in full training and with LoRA,
and the LoRA step's cost: SRA step / plain LoRA step, medians of per-round ratios, order alternating.

    python benchmarks/overhead.py                      # CPU sizes, a few minutes on 2 cores (LoRA table first)
    python benchmarks/overhead.py --lora-only          # only the LoRA table, ~2 minutes on 2 cores
    python benchmarks/overhead.py --device cuda        # SiT-XL/2, 32x32 latents, bf16, batch 32, blocks 8->20
    python benchmarks/overhead.py --compile --configs SiT-S/2   # every model compiled (inductor), teacher blocks too
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a fresh clone: `examples` lives at the root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import sra_plugin  # noqa: E402
from sra_plugin import Dispersive, LatentAlignment, LayerSync, SelfRepresentationAlignment, resolve_adapter  # noqa: E402
from sra_plugin.heads import MLPHead  # noqa: E402
from sra_plugin.losses import alignment_loss, smooth_l1  # noqa: E402
from sra_plugin.teacher import ema_copy, update_ema_  # noqa: E402

from benchmarks._bench import MiB, Memory, adamw, choose_clock, machine, markdown_table, round_ratios, sync, write_json  # noqa: E402
from benchmarks._lora import lora_note, lora_table, run_lora  # noqa: E402
from benchmarks._workloads import DEFAULTS, Batch, Config, Workload, WORKLOADS, configs  # noqa: E402

KINDS = ("plain", "sra", "reference", "latent", "layersync", "dispersive", "sra_layersync")
RATIO_KINDS = KINDS[1:]
LATENT_TARGET = 1.05  # LatentAlignment (SRA 2) step / plain step
FAMILY_TARGET = 1.03  # LayerSync or Dispersive step / plain step (issue 21)
COMPOSED_MARGIN = 0.03  # SRA + LayerSync may cost this much over SRA's ratio (issue 21)


# ---------------------------------------------------------------------------------------- the three steps
class Bench:
    def __init__(self, cfg: Config, device: torch.device, seed: int = 0, compile: bool = False) -> None:
        self.cfg, self.device = cfg, device
        torch.manual_seed(seed)
        base = cfg.build().to(device).train()
        self.work: Workload = WORKLOADS[cfg.family](base, cfg.batch, cfg.latent, cfg.channels)
        self.adapter_note = f"sra_plugin.adapters ({resolve_adapter(base).name})"
        self.ema_decay = 0.9999
        self.clock: Callable[[], float] = time.perf_counter
        self.forward_done = 0.0
        self.models = {"plain": base, **{kind: copy.deepcopy(base) for kind in KINDS[1:]}}
        # The EMA the user keeps anyway: updated by the plain and reference steps, teacher of the reference.
        self.ema = ema_copy(base)
        self.sra = SelfRepresentationAlignment(
            self.models["sra"], student_layer=cfg.student_layer, teacher_layer=cfg.teacher_layer,
            ema_decay=self.ema_decay,
        ).to(device)
        self.latent = LatentAlignment(self.models["latent"], layer=cfg.student_layer).to(device)
        self.layersync = LayerSync(self.models["layersync"], cfg.student_layer, cfg.teacher_layer)
        self.dispersive = Dispersive(self.models["dispersive"])
        self.composed_sra = SelfRepresentationAlignment(
            self.models["sra_layersync"], student_layer=cfg.student_layer, teacher_layer=cfg.teacher_layer,
            ema_decay=self.ema_decay,
        ).to(device)
        self.composed_sra.head.load_state_dict(self.sra.head.state_dict())
        self.composed_ls = LayerSync(self.models["sra_layersync"], cfg.student_layer, cfg.teacher_layer)
        self.adapter = self.sra.adapter
        self.depth = self.sra.depth
        dim = self.adapter.dim(base, self.adapter.blocks(base)[cfg.student_layer - 1])
        self.ref_head = MLPHead(dim, dim).to(device)
        self.ref_head.load_state_dict(self.sra.head.state_dict())
        self.features: dict[str, Tensor] = {}
        self._hooks = [
            self.adapter.blocks(self.models["reference"])[cfg.student_layer - 1].register_forward_hook(self._grab("student")),
            self.adapter.blocks(self.ema)[cfg.teacher_layer - 1].register_forward_hook(self._grab("teacher")),
        ]
        params = {
            "plain": list(base.parameters()),
            "sra": [*self.models["sra"].parameters(), *self.sra.head.parameters()],
            "reference": [*self.models["reference"].parameters(), *self.ref_head.parameters()],
            "latent": [*self.models["latent"].parameters(), *self.latent.head.parameters()],
            "layersync": list(self.models["layersync"].parameters()),
            "dispersive": list(self.models["dispersive"].parameters()),
            "sra_layersync": [*self.models["sra_layersync"].parameters(), *self.composed_sra.head.parameters()],
        }
        self.opt = {k: adamw(p, device) for k, p in params.items()}
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.params = sum(p.numel() for p in base.parameters())
        self.watch: weakref.ref | None = None
        self.student_calls = 0
        # The watch hook counts in Python: a compiled model would retrace on its counter, so compiled runs
        # check the capture by sra.student_reruns instead.
        self._watch_hook = None if compile else \
            self.adapter.blocks(self.models["sra"])[cfg.student_layer - 1].register_forward_hook(self._watch)
        if compile:
            # The models are instances of one class: without hook guards the hooked models would reuse the
            # graph traced on the plain one, which has no hooks (SRA would then re-run its student each step).
            torch._dynamo.config.skip_nnmodule_hook_guards = False
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
            # After sra and its hooks exist, as docs/training-stacks.md says; sra then compiles its teacher's blocks too.
            # The reference loop stays eager: it reads its features by hooks from Python.
            for kind in ("plain", "sra", "latent", "layersync", "dispersive", "sra_layersync"):
                self.models[kind].compile()

    def _grab(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.features[name] = self.adapter.tokens(output, module)
        return hook

    def _watch(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.student_calls += 1
        self.watch = weakref.ref(self.adapter.tokens(output, module))

    def hot_path_check(self) -> dict[str, Any]:
        """One SRA step, counted: student block calls, teacher blocks run, teacher tokens without grad."""
        ran: list[bool] = []
        hooks = [blk.register_forward_hook(lambda m, a, o: ran.append(self.adapter.tokens(o, m).requires_grad))
                 for blk in self.adapter.blocks(self.sra.teacher)]
        self.student_calls = 0
        try:
            self.step("sra", self.batch())
        finally:
            for h in hooks:
                h.remove()
        return {
            "student_block_calls": self.student_calls if self._watch_hook is not None else None,
            "student_reruns": self.sra.student_reruns,
            "teacher_blocks_run": len(ran),
            "teacher_grad": any(ran),
            "ok": (self.student_calls == 1 or self._watch_hook is None) and self.sra.student_reruns == 0
                  and len(ran) == self.cfg.teacher_layer and not any(ran),
        }

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.cfg.amp)

    def batch(self) -> Batch:
        return self.work.make_batch(self.gen, self.device)

    def sync(self) -> None:
        sync(self.device)

    # Each step returns the time its optimizer + EMA part started (the rest is forward + backward).
    def step(self, kind: str, b: Batch) -> float:
        return getattr(self, f"_{kind}")(b)

    def _finish(self, kind: str, loss: Tensor) -> float:
        loss.backward()
        self.sync()
        mid = self.clock()
        self.opt[kind].step()
        self.opt[kind].zero_grad(set_to_none=True)
        if kind in ("sra", "sra_layersync"):
            (self.sra if kind == "sra" else self.composed_sra).update_teacher()
        else:
            update_ema_(self.ema, self.models[kind], self.ema_decay)
        return mid

    def _plain(self, b: Batch) -> float:
        model = self.models["plain"]
        with self.autocast():
            loss = self.work.diffusion_loss(self.work.predict(model, b.x_t, b.t, b), b)
        self.sync()
        self.forward_done = self.clock()
        return self._finish("plain", loss)

    def _sra(self, b: Batch) -> float:
        model = self.models["sra"]
        with self.autocast():
            loss = self.work.diffusion_loss(self.work.predict(model, b.x_t, b.t, b), b)
            x_s, s = self.work.teacher_pair(b)
            loss = loss + self.sra(model, b.x_t, x_s, b.t, s, *b.args, **b.kwargs)
        return self._finish("sra", loss)

    def _latent(self, b: Batch) -> float:
        model = self.models["latent"]
        with self.autocast():
            loss = self.work.diffusion_loss(self.work.predict(model, b.x_t, b.t, b), b)
            loss = loss + self.latent(model, b.x_t, b.x0, b.t, *b.args, **b.kwargs)
        return self._finish("latent", loss)

    def _layersync(self, b: Batch) -> float:
        model = self.models["layersync"]
        with self.autocast():
            loss = self.work.diffusion_loss(self.work.predict(model, b.x_t, b.t, b), b)
            loss = loss + self.layersync(model, b.x_t, b.t, *b.args, **b.kwargs)
        return self._finish("layersync", loss)

    def _dispersive(self, b: Batch) -> float:
        model = self.models["dispersive"]
        with self.autocast():
            loss = self.work.diffusion_loss(self.work.predict(model, b.x_t, b.t, b), b)
            loss = loss + self.dispersive(model, b.x_t, b.t, *b.args, **b.kwargs)
        return self._finish("dispersive", loss)

    def _sra_layersync(self, b: Batch) -> float:
        model = self.models["sra_layersync"]
        with self.autocast():
            loss = self.work.diffusion_loss(self.work.predict(model, b.x_t, b.t, b), b)
            x_s, s = self.work.teacher_pair(b)
            loss = loss + self.composed_sra(model, b.x_t, x_s, b.t, s, *b.args, **b.kwargs) \
                + self.composed_ls(model, b.x_t, b.t, *b.args, **b.kwargs)
        return self._finish("sra_layersync", loss)

    def _reference(self, b: Batch) -> float:
        model = self.models["reference"]
        with self.autocast():
            loss = self.work.diffusion_loss(self.work.predict(model, b.x_t, b.t, b), b)
            x_s, s = self.work.teacher_pair(b)
            with torch.no_grad():
                self.work.predict(self.ema, x_s, s, b)  # every block and the final layer
            student, teacher = self.features.pop("student"), self.features.pop("teacher")
            loss = loss + 0.2 * alignment_loss(smooth_l1, self.ref_head(student), teacher)
        return self._finish("reference", loss)

    def timed(self, kind: str, b: Batch) -> tuple[float, float, float, float]:
        """(whole step, forward + backward, forward of a plain step) in seconds of ``self.clock``, and
        the whole step in wall seconds."""
        self.sync()
        wall, start = time.perf_counter(), self.clock()
        mid = self.step(kind, b)
        self.sync()
        end = self.clock()
        return end - start, mid - start, self.forward_done - start, time.perf_counter() - wall

    def user_ema_check(self, memory: Memory) -> dict[str, Any]:
        """With the user's EMA as teacher, SRA adds only its head: no copy of the weights."""
        model = self.models["plain"]
        before = memory.resident()
        probe = SelfRepresentationAlignment(model, student_layer=self.cfg.student_layer,
                                            teacher_layer=self.cfg.teacher_layer, teacher=self.ema,
                                            adapter=self.adapter)
        added = memory.resident() - before
        # Floating tensors only: ``_extra_state`` holds the objective's identity and step (a few hundred bytes).
        state_bytes = sum(v.numel() * v.element_size() for v in probe.state_dict().values()
                          if isinstance(v, Tensor) and v.is_floating_point())
        head_bytes = sum(p.numel() * p.element_size() for p in probe.head.parameters())
        shares = probe.teacher is self.ema and probe.ema is None
        probe.remove()
        del probe
        return {
            "teacher_is_user_ema": shares,
            "state_bytes": state_bytes,
            "head_bytes": head_bytes,
            "resident_added_MiB": round(added / MiB, 1),
            "weights_MiB": round(self.params * 4 / MiB, 1),
            "no_weight_copy": shares and state_bytes == head_bytes,
        }


# ---------------------------------------------------------------------------------------- running
def run_config(cfg: Config, device: torch.device, repeats: int, warmup: int, growth_steps: int,
               clock: Callable[[], float] = time.perf_counter, compile: bool = False) -> dict[str, Any]:
    memory = Memory(device)
    t0 = time.perf_counter()
    bench = Bench(cfg, device, compile=compile)
    bench.clock = clock
    for _ in range(warmup):
        b = bench.batch()
        for kind in KINDS:
            bench.step(kind, b)
    step: dict[str, list[float]] = {k: [] for k in KINDS}
    fwbw: dict[str, list[float]] = {k: [] for k in KINDS}
    wall: dict[str, list[float]] = {k: [] for k in KINDS}
    forward_share: list[float] = []
    for r in range(repeats):
        b = bench.batch()
        order = KINDS[r % len(KINDS):] + KINDS[: r % len(KINDS)]
        gc.collect()
        for kind in order:
            whole, part, forward, seconds = bench.timed(kind, b)
            step[kind].append(whole)
            fwbw[kind].append(part)
            wall[kind].append(seconds)
            if kind == "plain":
                forward_share.append(forward / whole)

    # Memory, after the timing so that nothing runs beside the timed steps.
    # The first step of each kind gives its peak; the resident memory after each of them its growth.
    peak, growth = {}, {}
    for kind in KINDS:
        before = memory.start()
        bench.step(kind, bench.batch())
        top = memory.peak()
        peak[kind] = {"added_MiB": (top - before) / MiB, "peak_MiB": top / MiB}
        resident = [memory.resident()]
        for _ in range(growth_steps - 1):
            bench.step(kind, bench.batch())
            resident.append(memory.resident())
        growth[kind] = (resident[-1] - resident[0]) / MiB
    # The student block's tokens are gone once the step is over: nothing of SRA keeps them alive.
    released = None if bench._watch_hook is None else bench.watch is not None and bench.watch() is None
    hot_path = bench.hot_path_check()
    ema_check = bench.user_ema_check(memory)

    def ratios(times: dict[str, list[float]]) -> dict[str, float]:
        # Median over rounds of the ratio within a round: slow drifts of the machine's load cancel.
        med = {k: statistics.median(v) for k, v in times.items()}
        out = {}
        for k in RATIO_KINDS:
            out[k], out[f"{k}_q1"], out[f"{k}_q3"] = round_ratios(times[k], times["plain"])
            out[f"{k}_of_medians"] = med[k] / med["plain"]
        return out

    floor = 1 + cfg.teacher_layer / (3 * bench.depth)
    share = statistics.median(forward_share)  # forward / whole plain step, measured (the floor assumes ~1/3)
    target = cfg.target if cfg.target is not None else floor + 0.03
    r_step, r_fwbw = ratios(step), ratios(fwbw)
    result = {
        "config": cfg.name,
        "params_M": round(bench.params / 1e6, 1),
        "depth": bench.depth,
        "student_layer": cfg.student_layer,
        "teacher_layer": cfg.teacher_layer,
        "batch": cfg.batch,
        "latent": cfg.latent,
        "tokens": (cfg.latent // 2) ** 2,
        "dtype": str(cfg.amp).replace("torch.", "") if cfg.amp else "float32",
        "compiled": compile,
        "teacher_compiled": bench.sra._compiled_blocks is not None,
        "adapter": bench.adapter_note,
        "floor": floor,
        "plain_forward_share": share,
        "floor_measured_share": 1 + cfg.teacher_layer / bench.depth * share,
        "target": target,
        "median_s": {k: statistics.median(v) for k, v in step.items()},
        "median_fwbw_s": {k: statistics.median(v) for k, v in fwbw.items()},
        "ratio": r_step,
        "ratio_fwbw": r_fwbw,
        "target_met": r_step["sra"] <= target and r_step["sra"] < r_step["reference"],
        "latent_target": LATENT_TARGET,
        "latent_target_met": r_step["latent"] <= LATENT_TARGET,
        "latent_reruns": bench.latent.student_reruns,
        "family_target": FAMILY_TARGET,
        "family_targets_met": {
            "layersync": r_step["layersync"] <= FAMILY_TARGET,
            "dispersive": r_step["dispersive"] <= FAMILY_TARGET,
            "sra_layersync": r_step["sra_layersync"] <= r_step["sra"] + COMPOSED_MARGIN,
        },
        "family_reruns": {name: o.student_reruns for name, o in (
            ("layersync", bench.layersync), ("dispersive", bench.dispersive), ("sra_layersync_sra", bench.composed_sra),
            ("sra_layersync_ls", bench.composed_ls))},
        "sra_reruns": bench.sra.student_reruns,
        "memory_method": memory.method,
        "peak": peak,
        "growth_MiB": growth,
        "growth_steps": growth_steps,
        "student_tokens_released": released,
        "hot_path": hot_path,
        "user_ema_teacher": ema_check,
        "times_s": step,
        "fwbw_times_s": fwbw,
        "wall_times_s": wall,
        "wall_s": time.perf_counter() - t0,
    }
    for h in [*bench._hooks, *([bench._watch_hook] if bench._watch_hook is not None else [])]:
        h.remove()
    for objective in (bench.sra, bench.latent, bench.layersync, bench.dispersive, bench.composed_sra, bench.composed_ls):
        objective.remove()
    return result


def table(results: list[dict[str, Any]]) -> str:
    head = ("config", "blocks", "batch", "plain ms", "SRA ms", "ref ms", "SRA/plain", "ref/plain",
            "floor (measured)", "fw+bw SRA/ref", "peak MiB plain/SRA/ref/SRA 2/LS/Disp/SRA+LS", "target", "SRA 2/plain",
            "LayerSync/plain", "Dispersive/plain", "SRA+LayerSync/plain")
    rows = []
    for r in results:
        m, ratio, fb, p = r["median_s"], r["ratio"], r["ratio_fwbw"], r["peak"]
        rows.append((
            r["config"], f"{r['student_layer']}->{r['teacher_layer']}/{r['depth']}", str(r["batch"]),
            f"{m['plain'] * 1e3:.0f}", f"{m['sra'] * 1e3:.0f}", f"{m['reference'] * 1e3:.0f}",
            f"{ratio['sra']:.3f} ({ratio['sra_q1']:.2f}-{ratio['sra_q3']:.2f})",
            f"{ratio['reference']:.3f} ({ratio['reference_q1']:.2f}-{ratio['reference_q3']:.2f})",
            f"{r['floor']:.3f} ({r['floor_measured_share']:.3f})",
            f"{fb['sra']:.3f}/{fb['reference']:.3f}",
            "/".join(f"{p[k]['added_MiB']:.0f}" for k in KINDS),
            f"{'met' if r['target_met'] else 'MISSED'} (<= {r['target']:.3f})",
            f"{ratio['latent']:.3f} ({ratio['latent_q1']:.2f}-{ratio['latent_q3']:.2f}) "
            f"{'met' if r['latent_target_met'] else 'MISSED'} (<= {r['latent_target']:.2f})",
            *(f"{ratio[k]:.3f} ({ratio[f'{k}_q1']:.2f}-{ratio[f'{k}_q3']:.2f}) "
              f"{'met' if r['family_targets_met'][k] else 'MISSED'} "
              f"(<= {(ratio['sra'] + COMPOSED_MARGIN) if k == 'sra_layersync' else r['family_target']:.3f})"
              for k in ("layersync", "dispersive", "sra_layersync")),
        ))
    return markdown_table(head, rows)


def main(argv: list[str] | None = None) -> int:
    all_configs = configs()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds of every kind of step (default 9)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1 on CPU, 3 on CUDA)")
    parser.add_argument("--growth-steps", type=int, default=3, help="steps of each kind for the memory-growth check (default 3)")
    parser.add_argument("--configs", nargs="+", metavar="NAME", help=f"any of {', '.join(all_configs)} (default: by device)")
    parser.add_argument("--json", default=None, metavar="PATH", help="where to write the results (default benchmarks/results/overhead-<device>.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU, see --timer)")
    parser.add_argument("--timer", choices=("auto", "cpu", "wall"), default="auto",
                        help="cpu: process CPU time, which other processes' load on a shared machine hardly moves "
                             "(needs --threads 1); wall: elapsed time. auto (default): cpu on CPU with one thread, else wall")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--no-lora", action="store_true", help="skip the LoRA memory table (needs peft)")
    lora.add_argument("--lora-only", action="store_true", help="only the LoRA memory table and step ratio")
    parser.add_argument("--compile", action="store_true",
                        help="compile the plain, SRA and SRA 2 models (model.compile(), inductor) after building SRA; the owned "
                             "teacher's blocks are then compiled too (compile_teacher=None); the reference loop stays eager. "
                             "Implies --no-lora")
    args = parser.parse_args(argv)

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device={args.device!r} is not accepted ({exc}): use cpu, cuda or cuda:N")
    if device.type not in DEFAULTS:
        parser.error(f"--device={args.device!r} is not accepted: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device={args.device!r}: CUDA is not available here")
    if args.warmup is None:
        args.warmup = 1 if device.type == "cpu" else 3
    for name, value, least in (("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0), ("--growth-steps", args.growth_steps, 2)):
        if value < least:
            parser.error(f"{name}={value} is not accepted: use an integer >= {least}")
    names = args.configs or DEFAULTS[device.type]
    unknown = [n for n in names if n not in all_configs]
    if unknown:
        parser.error(f"--configs {' '.join(unknown)} not known: use any of {', '.join(all_configs)}")
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    if threads is not None:
        if threads < 1:
            parser.error(f"--threads={threads} is not accepted: use an integer >= 1")
        torch.set_num_threads(threads)
    clock, timer_text = choose_clock(args.timer, device, parser, args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    command = "python " + " ".join([os.path.relpath(__file__, Path.cwd()) if Path(__file__).is_relative_to(Path.cwd()) else __file__, *(argv if argv is not None else sys.argv[1:])])
    where = machine(device)
    print(f"# {command}\n# {where}; sra-plugin {sra_plugin.__version__}; repeats {args.repeats}, warmup {args.warmup}; "
          f"timer: {timer_text}", flush=True)
    if args.compile:
        if args.lora_only:
            parser.error("--compile measures the full-training steps: it cannot go with --lora-only")
        args.no_lora = True
    if not args.no_lora:
        try:
            import peft  # noqa: F401
        except ImportError:
            parser.error("the LoRA table needs peft: pip install 'sra-plugin[peft]', or pass --no-lora")
    start = time.perf_counter()
    lora_results = []
    if not args.no_lora:
        for name in names:
            lora_results.append(run_lora(all_configs[name], device, args.repeats, args.warmup, clock))
            print(f"#   {name} (LoRA): {lora_results[-1]['wall_s']:.0f} s", flush=True)
        print()
        print(lora_table(lora_results))
        print()
        print(lora_note(lora_results, args.repeats, timer_text), flush=True)
    lora_ok = all(r["shared_teacher"] and r["student_reruns"] == 0 and r["lora_teacher_bytes"] <= 2 * r["lora_float32_bytes"] + 4096
                  for r in lora_results)
    if args.lora_only:
        total = time.perf_counter() - start
        out = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / f"overhead-{device.type}-lora.json"
        write_json(out, {"command": command, "machine": where, "timer": timer_text, "repeats": args.repeats,
                         "warmup": args.warmup, "total_s": total, "lora": lora_results})
        print(f"total {total:.0f} s\nwrote {out}")
        return 0 if lora_ok else 1
    results = []
    for name in names:
        result = run_config(all_configs[name], device, args.repeats, args.warmup, args.growth_steps, clock, compile=args.compile)
        results.append(result)
        print(f"#   {name}: {result['wall_s']:.0f} s, adapter {result['adapter']}", flush=True)
    total = time.perf_counter() - start
    print()
    print(table(results))
    print()
    print(f"ms: median {timer_text} of a step over {args.repeats} interleaved rounds. Ratios: median over the rounds of "
          "the step's time over the plain step's time in the same round (quartiles in brackets). Floor: 1 + L_t/(3 depth); "
          "in brackets 1 + (L_t/depth) x (the plain step's measured forward share of its time). fw+bw: forward + backward only (no optimizer "
          "step or EMA update). Peak: the most a step adds to the memory resident before it "
          f"({results[0]['memory_method']}).")
    for r in results:
        growth = ", ".join(f"{k} {v:+.1f}" for k, v in r["growth_MiB"].items())
        ema = r["user_ema_teacher"]
        hp = r["hot_path"]
        print(f"{r['config']}: memory growth over {r['growth_steps']} steps (MiB) {growth}; student tokens freed after "
              f"the step: {r['student_tokens_released']}; per SRA step: student block ran {hp['student_block_calls'] if hp['student_block_calls'] is not None else 'n/a (compiled)'}x (student re-runs {hp['student_reruns']}), "
              f"teacher ran {hp['teacher_blocks_run']} of {r['depth']} blocks, teacher grad {hp['teacher_grad']}; "
              f"user EMA as teacher adds {ema['state_bytes'] / MiB:.2f} MiB of state (the head) for "
              f"{ema['weights_MiB']:.0f} MiB of weights, no weight copy: {ema['no_weight_copy']}")
    print(f"total {total:.0f} s")

    suffix = "-compiled" if args.compile else ""
    out = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / f"overhead-{device.type}{suffix}.json"
    write_json(out, {"command": command, "machine": where, "timer": timer_text, "repeats": args.repeats, "warmup": args.warmup,
                     "total_s": total, "results": results, "lora": lora_results})
    print(f"wrote {out}")
    return 0 if lora_ok and all(r["target_met"] and r["latent_target_met"] and all(r["family_targets_met"].values())
                                and r["hot_path"]["ok"] and r["student_tokens_released"] is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
