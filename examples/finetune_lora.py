"""SRA in a LoRA fine-tune: a tiny random diffusers ``FluxTransformer2DModel`` stands in for a
pretrained Flux, its base frozen (bf16 where the CPU computes it natively), peft LoRA on the
attention, trained with flow matching on generated latents. Nothing is downloaded.

    python examples/finetune_lora.py                  # 40 steps, a few seconds on a CPU
    python examples/finetune_lora.py --dtype float32  # bf16 is the default only where the CPU has it

What it shows:

- ``SelfRepresentationAlignment(model)`` after the adapters are added: its EMA teacher holds only the
  LoRA parameters (float32), not the base model; the teacher pass runs the model's own frozen
  weights with the EMA's LoRA values in place. The memory it adds is printed next to the model's.
- ``with sra.teacher_weights():`` evaluates with the EMA of the LoRA weights; the training weights
  come back exactly.
- The LoRA weights are saved alone with peft's ``get_peft_model_state_dict``: nothing of SRA (no
  teacher, head or step key, no hook) is in the export, and the export loaded into a fresh base model
  reproduces the fine-tuned model.

diffusers' way of adding LoRA (``model.add_adapter(LoraConfig(...))``, as its training scripts do)
is used; ``peft.get_peft_model(model, config)`` works the same (pass the ``PeftModel``, its
``base_model`` or the model to SRA, whichever the loop calls).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sra_plugin import LinearPath, NoiseGap, SelfRepresentationAlignment

SIDE, CHANNELS, TEXT, CLASSES = 8, 16, 6, 4  # 8x8 latent tokens of 16 channels, 6 text tokens, 4 "prompts"
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX); elsewhere torch emulates it, slowly."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def pretrained_flux(seed: int) -> FluxTransformer2DModel:
    """A small random Flux (2 double-stream + 4 single-stream blocks, width 64) with no zero-initialised
    layer, standing in for pretrained weights."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=CHANNELS, num_layers=2, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    return model


def add_lora(model: nn.Module, rank: int, dtype: torch.dtype) -> nn.Module:
    """Base frozen in ``dtype``, LoRA on every attention projection in float32 (as diffusers' scripts
    keep trainable parameters)."""
    model.requires_grad_(False).to(dtype)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=ATTENTION))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


class Latents:
    """Generated "latents": per prompt a smooth pattern (sinusoids of a prompt-specific frequency and
    phase) with random amplitude; text tokens and a pooled vector per prompt; Flux's position ids."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.g = g
        self.freq = torch.rand(CLASSES, CHANNELS, 2, generator=g) * 2 + 0.5
        self.phase = torch.rand(CLASSES, CHANNELS, generator=g) * 6.28
        self.captions = torch.randn(CLASSES, TEXT, 32, generator=g)
        self.pooled = torch.randn(CLASSES, 16, generator=g)
        grid = torch.stack(torch.meshgrid(torch.arange(SIDE.__float__()), torch.arange(SIDE.__float__()), indexing="ij"), -1)
        self.xy = grid.reshape(-1, 2) / SIDE * 6.28  # (N, 2)
        self.img_ids = torch.cat([torch.zeros(SIDE * SIDE, 1), grid.reshape(-1, 2)], 1)
        self.txt_ids = torch.zeros(TEXT, 3)

    def batch(self, n: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, dict]:
        """``(x0, conditioning)``: x0 float32 (the loss is computed in float32), conditioning in ``dtype``."""
        y = torch.randint(0, CLASSES, (n,), generator=self.g)
        amp = 0.5 + torch.rand(n, 1, CHANNELS, generator=self.g)
        x0 = amp * torch.sin(self.xy @ self.freq[y].transpose(1, 2) + self.phase[y][:, None])  # (n, N, C), packed tokens
        cond = dict(encoder_hidden_states=self.captions[y], pooled_projections=self.pooled[y],
                    img_ids=self.img_ids, txt_ids=self.txt_ids)
        cond = {k: v.to(dtype) for k, v in cond.items()}
        return x0, cond


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="SRA in a LoRA fine-tune of a tiny random diffusers Flux (CPU)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default: %(default)s)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (default: %(default)s)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="the frozen base's dtype; auto: bfloat16 where the CPU has native bf16, else float32 (default: %(default)s)")
    p.add_argument("--out", default=None, help="where to write lora.safetensors (default: a temporary folder, removed at the end)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the LoRA weights and the data (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads; 1 is fastest for a model this small (default: %(default)s)")
    args = p.parse_args(argv)
    for name, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--rank", args.rank), ("--threads", args.threads)):
        if value < 1:
            p.error(f"{name}={value} is not accepted: use an integer >= 1")
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()  # a random model cast with .to(dtype) makes diffusers chatty
    if args.dtype == "auto":
        dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
        why = "this CPU has native bf16" if dtype == torch.bfloat16 else "this CPU has no native bf16 (AVX512-BF16/AMX), so float32"
    else:
        dtype, why = getattr(torch, args.dtype), "as asked"
    print(f"base model in {str(dtype).replace('torch.', '')} ({why}); LoRA parameters and the EMA in float32")

    model = add_lora(pretrained_flux(args.seed), args.rank, dtype)
    base_bytes = nbytes(p for p in model.parameters() if not p.requires_grad)
    lora_bytes = nbytes(p for p in model.parameters() if p.requires_grad)

    # After the adapters: SRA's EMA then averages the LoRA parameters only.
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, ema_decay=0.99)
    print(f"SelfRepresentationAlignment({sra.extra_repr()})")
    lora_params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([*lora_params, *sra.head.parameters()], lr=1e-3)

    data, path, gap = Latents(args.seed + 1), LinearPath(), NoiseGap(max_gap=0.2)
    model.train()
    for step in range(args.steps):
        x0, cond = data.batch(args.batch_size, dtype)
        noise = torch.randn_like(x0)
        sigma = torch.rand(args.batch_size)
        sigma_s = gap.sample(sigma)
        x_t, x_s = path.pair(x0, noise, sigma, sigma_s)
        x_t, x_s = x_t.to(dtype), x_s.to(dtype)
        # Flux takes sigma in [0, 1] as its timestep (it scales by 1000 inside): so does the teacher's s.
        pred = model(hidden_states=x_t, timestep=sigma.to(dtype), return_dict=False, **cond)[0]
        diff = F.mse_loss(pred.float(), path.velocity(x0, noise))
        loss = diff + sra(model, x_t, x_s, sigma.to(dtype), sigma_s.to(dtype), **cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sra.update_teacher()
        if step % 10 == 0 or step == args.steps - 1:
            m = sra.metrics
            print(f"step {step}: diffusion {diff.item():.4f}, alignment {m['align_loss']:.4f}, cos {m['cos_sim']:.3f}")
    assert sra.metrics["student_reruns"] == 0  # every step reused the tokens of the training forward

    # Memory: what SRA keeps besides the model (its EMA of the LoRA parameters, the head).
    ema_bytes = nbytes(sra.ema.buffers())
    head_bytes = nbytes(sra.head.parameters())
    full_copy = nbytes(p.float() for p in model.parameters())
    print(f"model: {mib(base_bytes)} frozen base + {mib(lora_bytes)} LoRA (rank {args.rank})")
    print(f"SRA adds: {mib(ema_bytes)} teacher (EMA of the LoRA parameters, float32) + {mib(head_bytes)} head "
          f"= {(ema_bytes + head_bytes) / (base_bytes + lora_bytes):.1%} of the model "
          f"(a float32 copy of the whole model would be {mib(full_copy)})")

    # Evaluation with the teacher's weights (the EMA of the LoRA parameters); training weights come back exactly.
    x0, cond = data.batch(args.batch_size, dtype)
    noise, sigma = torch.randn_like(x0), torch.full((args.batch_size,), 0.5)
    x_t = path(x0, noise, sigma).to(dtype)
    before = [p.detach().clone() for p in lora_params]
    model.eval()
    with torch.no_grad():
        trained = F.mse_loss(model(hidden_states=x_t, timestep=sigma.to(dtype), return_dict=False, **cond)[0].float(), path.velocity(x0, noise))
        with sra.teacher_weights():
            ema = F.mse_loss(model(hidden_states=x_t, timestep=sigma.to(dtype), return_dict=False, **cond)[0].float(), path.velocity(x0, noise))
    assert all(torch.equal(a, b) for a, b in zip(before, lora_params)), "teacher_weights() did not restore the weights"
    print(f"validation loss: trained LoRA {trained.item():.4f}, EMA LoRA (sra.teacher_weights()) {ema.item():.4f}")

    # Export: the LoRA weights alone.
    sra.remove()
    lora_state = get_peft_model_state_dict(model)
    leaked = [k for k in lora_state if "lora_" not in k or any(w in k.lower() for w in ("sra", "ema", "head", "initted", "_extra_state"))]
    assert not leaked, f"not a LoRA weight: {leaked[:3]}"
    assert len(lora_state) == len(lora_params), (len(lora_state), len(lora_params))
    assert all(type(v) is torch.Tensor for v in lora_state.values())  # plain tensors, nothing attached
    hooks = [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooks, f"hooks left on {hooks[:3]}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        file = out / "lora.safetensors"
        save_file({k: v.contiguous() for k, v in lora_state.items()}, str(file))
        size = file.stat().st_size
        loaded = load_file(str(file))
    # The export is complete: a fresh base model with it computes what the fine-tuned one does.
    fresh = add_lora(pretrained_flux(args.seed), args.rank, dtype)
    result = set_peft_model_state_dict(fresh, loaded)
    assert not result.unexpected_keys, result.unexpected_keys
    fresh.eval()
    with torch.no_grad():
        again = F.mse_loss(fresh(hidden_states=x_t, timestep=sigma.to(dtype), return_dict=False, **cond)[0].float(), path.velocity(x0, noise))
    assert torch.equal(again, trained), (again, trained)
    print(f"saved {len(loaded)} LoRA tensors ({size / 1024:.1f} KiB): no SRA key, no hook; "
          "reloaded into a fresh base model it gives the same output")
    return {"diffusion": diff.item(), **sra.metrics, "base_bytes": base_bytes, "lora_bytes": lora_bytes,
            "sra_teacher_bytes": ema_bytes, "sra_head_bytes": head_bytes, "export_keys": sorted(loaded),
            "dtype": str(dtype)}


if __name__ == "__main__":
    main()
