"""LoRA: the bytes SRA holds (its teacher, its head) in full training and with peft LoRA of rank 16 on every
block's attention linears (base frozen), and the LoRA step's cost, SRA step / plain LoRA step. Run by
``benchmarks/overhead.py`` (first, or alone with ``--lora-only``)."""

from __future__ import annotations

import contextlib
import copy
import gc
import statistics
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from sra_plugin import SelfRepresentationAlignment

from benchmarks._bench import MiB, adamw, markdown_table, nbytes, round_ratios, sync
from benchmarks._workloads import WORKLOADS, Batch, Config


LORA_RANK = 16
LORA_TARGETS: dict[str, Any] = {  # peft target_modules: the attention's linears in every block
    "sit": r".*\.attn\.(qkv|proj)",
    "dit": r".*\.attn\.(qkv|proj)",
    "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
}


def sra_held_bytes(sra: SelfRepresentationAlignment, model: nn.Module) -> dict[str, int]:
    """Bytes of the tensors in ``sra``'s state (its teacher, the head) that are not the model's own."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    head = {t.untyped_storage().data_ptr() for t in [*sra.head.parameters(), *sra.head.buffers()]}
    teacher, head_bytes, seen = 0, 0, set()
    for value in sra.state_dict(keep_vars=True).values():
        if not isinstance(value, Tensor):
            continue
        ptr = value.untyped_storage().data_ptr()
        if ptr in own or ptr in seen:
            continue
        seen.add(ptr)
        if ptr in head:
            head_bytes += value.untyped_storage().nbytes()
        else:
            teacher += value.untyped_storage().nbytes()
    return {"teacher": teacher, "head": head_bytes}


def with_lora(model: nn.Module, family: str, rank: int = LORA_RANK) -> nn.Module:
    """``model`` with peft LoRA of rank ``rank`` on the attention, the base frozen (a ``PeftModel``)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS[family]))


def run_lora(cfg: Config, device: torch.device, repeats: int, warmup: int,
             clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Memory SRA holds in full training vs a LoRA fine-tune of the same model, and the LoRA step's cost:
    ``plain`` (forward, diffusion loss, backward, AdamW on the LoRA parameters) against ``sra`` (the
    same plus ``sra(...)`` and ``sra.update_teacher()``), interleaved, order alternating each round."""
    t0 = time.perf_counter()
    layers = dict(student_layer=cfg.student_layer, teacher_layer=cfg.teacher_layer)
    torch.manual_seed(0)
    base = cfg.build().to(device).train()
    model_bytes = nbytes([*base.parameters(), *base.buffers()])
    full_sra = SelfRepresentationAlignment(base, **layers)
    full = sra_held_bytes(full_sra, base)
    full_sra.remove()
    del full_sra

    models = {"plain": with_lora(copy.deepcopy(base), cfg.family), "sra": with_lora(copy.deepcopy(base), cfg.family)}
    del base
    sra = SelfRepresentationAlignment(models["sra"], **layers)
    lora = sra_held_bytes(sra, models["sra"])
    trainable = {k: [p for p in m.parameters() if p.requires_grad] for k, m in models.items()}
    opt = {"plain": adamw(trainable["plain"], device), "sra": adamw([*trainable["sra"], *sra.head.parameters()], device)}
    work = WORKLOADS[cfg.family](models["plain"].get_base_model(), cfg.batch, cfg.latent, cfg.channels)
    gen = torch.Generator().manual_seed(1)
    autocast = (lambda: torch.autocast(device.type, dtype=cfg.amp)) if cfg.amp else contextlib.nullcontext

    def step(kind: str, b: Batch) -> float:
        model = models[kind]
        sync(device)
        start = clock()
        with autocast():
            loss = work.diffusion_loss(work.predict(model, b.x_t, b.t, b), b)
            if kind == "sra":
                x_s, s = work.teacher_pair(b)
                loss = loss + sra(model, b.x_t, x_s, b.t, s, *b.args, **b.kwargs)
        loss.backward()
        opt[kind].step()
        opt[kind].zero_grad(set_to_none=True)
        if kind == "sra":
            sra.update_teacher()
        sync(device)
        return clock() - start

    for _ in range(warmup):
        b = work.make_batch(gen, device)
        for kind in ("plain", "sra"):
            step(kind, b)
    times: dict[str, list[float]] = {"plain": [], "sra": []}
    for r in range(repeats):
        b = work.make_batch(gen, device)
        gc.collect()
        for kind in (("plain", "sra") if r % 2 == 0 else ("sra", "plain")):
            times[kind].append(step(kind, b))
    ratio, q1, q3 = round_ratios(times["sra"], times["plain"])
    lora_params = sum(p.numel() for p in trainable["sra"])
    result = {
        "config": cfg.name,
        "params_M": round(sum(p.numel() for p in models["sra"].parameters() if not p.requires_grad) / 1e6, 2),
        "model_bytes": model_bytes,
        "full_teacher_bytes": full["teacher"],
        "full_head_bytes": full["head"],
        "lora_rank": LORA_RANK,
        "lora_params": lora_params,
        "lora_float32_bytes": lora_params * 4,
        "lora_teacher_bytes": lora["teacher"],
        "lora_head_bytes": lora["head"],
        "shared_teacher": bool(sra.ema.shared),
        "student_reruns": sra.metrics.get("student_reruns", float("nan")),
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "ratio": ratio,
        # A LoRA step's backward computes no weight gradients of the base: about one forward, so the
        # teacher pass (L_t/depth of a forward) weighs against two forwards.
        "floor": 1 + cfg.teacher_layer / (2 * sra.depth),
        "ratio_q1": q1,
        "ratio_q3": q3,
        "times_s": times,
        "wall_s": time.perf_counter() - t0,
    }
    sra.remove()
    return result


def lora_table(results: list[dict[str, Any]]) -> str:
    head = ("config", "model MiB", "full training: SRA holds MiB (teacher + head)", f"LoRA r={LORA_RANK} params",
            "LoRA: SRA holds MiB (teacher + head)", "LoRA teacher / model", "LoRA step SRA/plain", "floor")
    rows = []
    for r in results:
        rows.append((
            r["config"], f"{r['model_bytes'] / MiB:.1f}",
            f"{(r['full_teacher_bytes'] + r['full_head_bytes']) / MiB:.1f} ({r['full_teacher_bytes'] / MiB:.1f} + {r['full_head_bytes'] / MiB:.1f})",
            f"{r['lora_params'] / 1e6:.2f}M",
            f"{(r['lora_teacher_bytes'] + r['lora_head_bytes']) / MiB:.2f} ({r['lora_teacher_bytes'] / MiB:.2f} + {r['lora_head_bytes'] / MiB:.2f})",
            f"{r['lora_teacher_bytes'] / r['model_bytes']:.1%}",
            f"{r['ratio']:.3f} ({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f})",
            f"{r['floor']:.3f}",
        ))
    return markdown_table(head, rows)


def lora_note(results: list[dict[str, Any]], repeats: int, timer_text: str) -> str:
    checks = "; ".join(
        f"{r['config']}: teacher {r['lora_teacher_bytes']} B for {r['lora_float32_bytes']} B of LoRA in float32, "
        f"student re-runs {r['student_reruns']:.0f}" for r in results)
    return (f"Bytes of the tensors in sra.state_dict() that are not the model's (the owned EMA teacher; the head "
            f"apart). LoRA: peft rank {LORA_RANK} on every block's attention linears, base frozen; the teacher holds "
            f"the EMA of the LoRA parameters in float32 and shares the frozen weights. Step ratio: median over "
            f"{repeats} rounds of the SRA step's {timer_text} over the plain LoRA step's in the same round (order "
            f"alternating; quartiles in brackets); the plain step has no EMA. Floor: 1 + L_t/(2 depth) (the backward of "
            f"a LoRA step computes no weight gradients of the base, about one forward). {checks}")
