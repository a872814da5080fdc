"""SRA added to the training step of diffusers' Flux DreamBooth-LoRA script
(``examples/dreambooth/train_dreambooth_lora_flux.py``), on a tiny random ``FluxTransformer2DModel``:
nothing is downloaded, a few seconds on a CPU.

    python examples/flux_lora_dreambooth.py                 # 8 steps, then the resume check
    python examples/flux_lora_dreambooth.py --steps 40 --no-resume-check

What is mirrored from the diffusers script, step by step: the frozen base in bf16 with gradient
checkpointing, peft LoRA added with ``transformer.add_adapter(LoraConfig(...))`` and cast to float32
(``cast_training_params``), ``accelerator.prepare``, flow-matching sigmas of shape (B, 1, 1, 1) from a
``FlowMatchEulerDiscreteScheduler``, 2x2-packed latents with their image ids, guidance embeds,
``timestep=timesteps / 1000``, the velocity target ``noise - latents`` on unpacked predictions,
gradient clipping, and ``accelerator.save_state``/``load_state`` with save/load hooks that write the
LoRA weights alone. The "instance images" are fixed random latents (as with ``--cache_latents``) and
the prompt embeddings are computed once (the script's default when text encoders are frozen).

What SRA adds (each marked ``# SRA`` below):

1. ``sra = SelfRepresentationAlignment(transformer, ...)`` after ``add_adapter`` and the float32 cast,
   so the EMA teacher averages only the LoRA weights and the head is float32 like them;
2. the head's parameters in the optimizer, and ``sra`` in ``accelerator.prepare`` (DDP on many GPUs);
3. ``x_s`` from the same unpacked latents and noise at a less noisy ``sigma_s``, packed like ``x_t``,
   and ``loss = loss + sra(transformer, x_t, x_s, t, sigma_s, **same conditioning)``;
4. ``update_teacher()`` after each optimizer step;
5. a branch for ``sra`` in the save/load hooks (``accelerator.prepare`` put it in ``accelerator``'s
   models), so ``save_state``/``load_state`` restore head, teacher and step: the resume check below
   shows that a run resumed from a checkpoint computes bit for bit the loss the uninterrupted run does.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a clone: make `sra_plugin` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate import Accelerator
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.training_utils import cast_training_params, compute_density_for_timestep_sampling
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor

from sra_plugin import NoiseGap, SelfRepresentationAlignment

LATENT_CHANNELS, LATENT_SIDE, TEXT_TOKENS, TEXT_DIM, POOLED_DIM = 16, 8, 6, 32, 16
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the diffusers script's default --lora_layers


class _NoDeepSpeedCpuNotice(logging.Filter):
    """Drops one message: accelerate imports DeepSpeed whenever it is installed (``unwrap_model`` looks for
    its engine), and on a machine without a GPU DeepSpeed then warns "Setting accelerator to CPU" on its
    ``DeepSpeed`` logger. This example does not use DeepSpeed; every other message of that logger stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


def quiet_deepspeed_cpu_notice() -> None:
    """Install ``_NoDeepSpeedCpuNotice`` on the ``DeepSpeed`` logger, once (before DeepSpeed is imported or after)."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _NoDeepSpeedCpuNotice) for f in logger.filters):
        logger.addFilter(_NoDeepSpeedCpuNotice())


def tiny_flux(seed: int) -> FluxTransformer2DModel:
    """Stands in for ``FluxTransformer2DModel.from_pretrained(..., subfolder="transformer")``: 2 double- and
    4 single-stream blocks (numbered 1-6 by SRA), width 32, guidance embeds as in Flux.1-dev. Zero-initialised
    layers get random values, as a pretrained model's would be."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=4,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
            pooled_projection_dim=POOLED_DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
        )
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch of the latent becomes one token, channels first."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of ``pack_latents``."""
    b, _, packed = tokens.shape
    c = packed // 4
    patches = tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, height, width)


def latent_image_ids(height: int, width: int) -> Tensor:
    """Flux's position ids of the packed tokens: (0, row, column) per 2x2 patch."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


class InstanceData:
    """Fixed "instance image" latents (already VAE-encoded, shifted and scaled) and one prompt's embeddings."""

    def __init__(self, seed: int, count: int = 8) -> None:
        g = torch.Generator().manual_seed(seed)
        pattern = torch.randn(1, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE, generator=g)
        self.latents = pattern + 0.3 * torch.randn(count, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE, generator=g)
        self.prompt_embeds = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g)
        self.pooled_prompt_embeds = torch.randn(1, POOLED_DIM, generator=g)
        self.text_ids = torch.zeros(TEXT_TOKENS, 3)

    def batch(self, size: int) -> Tensor:
        return self.latents[torch.randint(0, len(self.latents), (size,))]  # global RNG: save_state restores it


def get_sigmas(scheduler: FlowMatchEulerDiscreteScheduler, timesteps: Tensor, n_dim: int, dtype: torch.dtype) -> Tensor:
    """The script's ``get_sigmas``: the scheduler's sigma of each sampled timestep, shaped (B, 1, 1, 1)."""
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigma = scheduler.sigmas.to(dtype=dtype)[step_indices].flatten()
    return sigma.reshape(-1, *([1] * (n_dim - 1)))


def train(args: argparse.Namespace, steps: int, save_dir: Path | None = None, resume_dir: Path | None = None,
          lora_seed: int = 0, restore_sra: bool = True) -> dict:
    """Run ``steps`` optimizer steps (after resuming from ``resume_dir`` if given); ``save_state`` into
    ``save_dir`` at the end. Returns the per-step losses and SRA metrics."""
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[args.mixed_precision]

    transformer = tiny_flux(seed=1234)  # the "pretrained" weights: identical in every run
    transformer.requires_grad_(False)
    transformer.to(accelerator.device, dtype=weight_dtype)
    transformer.enable_gradient_checkpointing()
    torch.manual_seed(lora_seed)  # LoRA and head initialisation: a resumed run must get them from the checkpoint
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS))
    cast_training_params(transformer, dtype=torch.float32)  # trainable LoRA weights in float32 on the bf16 base
    # SRA: after add_adapter and the cast, so the teacher is an EMA of the LoRA weights and the head is float32.
    sra = SelfRepresentationAlignment(transformer, student_layer=args.student_layer, teacher_layer=args.teacher_layer,
                                      ema_decay=args.ema_decay, weight=args.sra_weight)

    def save_model_hook(models, weights, output_dir):
        for model in models:
            model = accelerator.unwrap_model(model)
            if isinstance(model, FluxTransformer2DModel):
                save_file(get_peft_model_state_dict(model), str(Path(output_dir) / "transformer_lora.safetensors"))
            elif isinstance(model, SelfRepresentationAlignment):  # SRA: head, EMA teacher, step
                torch.save(model.state_dict(), Path(output_dir) / "sra.pt")
            else:
                raise ValueError(f"unexpected save model: {model.__class__}")
            weights.pop()  # keep accelerate from saving the whole model as well

    def load_model_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            if isinstance(model, FluxTransformer2DModel):
                result = set_peft_model_state_dict(model, load_file(str(Path(input_dir) / "transformer_lora.safetensors")))
                if result.unexpected_keys:
                    raise ValueError(f"unexpected LoRA keys in the checkpoint: {result.unexpected_keys[:3]}")
            elif isinstance(model, SelfRepresentationAlignment):
                if restore_sra:
                    model.load_state_dict(torch.load(Path(input_dir) / "sra.pt", weights_only=True))
            else:
                raise ValueError(f"unexpected load model: {model.__class__}")
        cast_training_params(transformer, dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    lora_params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": lora_params}, {"params": sra.head.parameters()}], lr=args.lr)  # SRA: + head
    transformer, sra_call, optimizer = accelerator.prepare(transformer, sra, optimizer)  # SRA: + sra

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    gap = NoiseGap(max_gap=args.max_gap)  # SRA: sigma_s = clamp(sigma - 0.2 U(0,1), 0, 1)
    data = InstanceData(seed=7)
    guidance = torch.full((args.batch_size,), args.guidance_scale, device=accelerator.device)
    height = width = LATENT_SIDE
    img_ids = latent_image_ids(height, width).to(accelerator.device, weight_dtype)
    cond = dict(  # the same objects go to the transformer and to sra, so the training forward's tokens are reused
        encoder_hidden_states=data.prompt_embeds.expand(args.batch_size, -1, -1).to(accelerator.device, weight_dtype),
        pooled_projections=data.pooled_prompt_embeds.expand(args.batch_size, -1).to(accelerator.device, weight_dtype),
        txt_ids=data.text_ids.to(accelerator.device, weight_dtype), img_ids=img_ids, guidance=guidance,
    )

    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
    unwrapped_sra = accelerator.unwrap_model(sra_call)
    history: dict[str, list[float]] = {"loss": [], "diffusion": [], "align_loss": [], "student_reruns": []}
    transformer.train()
    for _ in range(steps):
        model_input = data.batch(args.batch_size).to(accelerator.device, weight_dtype)
        noise = torch.randn_like(model_input)
        bsz = model_input.shape[0]
        u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=bsz)
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices].to(accelerator.device)
        sigmas = get_sigmas(scheduler, timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
        packed_noisy_model_input = pack_latents(noisy_model_input)
        t = timesteps / 1000  # Flux takes sigma in [0, 1]; keep this tensor: sra must see the same t

        model_pred = transformer(hidden_states=packed_noisy_model_input, timestep=t, return_dict=False, **cond)[0]
        model_pred = unpack_latents(model_pred, height, width)
        target = noise - model_input
        loss = torch.mean(((model_pred.float() - target.float()) ** 2).reshape(bsz, -1), 1).mean()
        diffusion = loss.detach()

        # SRA: the teacher's input from the same unpacked latents and noise, less noisy, packed like x_t.
        sigma_s = gap.sample(sigmas.flatten().float()).to(model_input.dtype)
        noisy_teacher_input = (1.0 - sigma_s.view(-1, 1, 1, 1)) * model_input + sigma_s.view(-1, 1, 1, 1) * noise
        loss = loss + sra_call(transformer, packed_noisy_model_input, pack_latents(noisy_teacher_input), t, sigma_s, **cond)

        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_([*lora_params, *unwrapped_sra.head.parameters()], args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        unwrapped_sra.update_teacher()  # SRA: EMA of the LoRA weights, after the optimizer step

        history["loss"].append(loss.item())
        history["diffusion"].append(diffusion.item())
        history["align_loss"].append(unwrapped_sra.metrics["align_loss"])
        history["student_reruns"].append(unwrapped_sra.metrics["student_reruns"])
        if not args.quiet:
            print(f"step {unwrapped_sra.step}: loss {loss.item():.6f} (diffusion {diffusion.item():.4f}, "
                  f"alignment {unwrapped_sra.metrics['align_loss']:.4f})", flush=True)

    if save_dir is not None:
        accelerator.save_state(str(save_dir))
    head_dtype = next(unwrapped_sra.head.parameters()).dtype
    return {**history, "head_dtype": head_dtype, "lora_dtypes": {p.dtype for p in lora_params},
            "base_dtypes": {p.dtype for p in transformer.parameters() if not p.requires_grad},
            "sra_repr": unwrapped_sra.extra_repr(), "step": unwrapped_sra.step}


def check_resume(args: argparse.Namespace, workdir: Path, restore_sra: bool = True) -> tuple[list[float], list[float]]:
    """Losses of the steps after ``args.steps // 2``: uninterrupted, and resumed from a checkpoint saved there
    by a run whose LoRA and head started elsewhere (so only ``load_state`` can make them agree)."""
    quiet = copy.copy(args)
    quiet.quiet = True
    first = args.steps // 2
    full = train(quiet, args.steps, lora_seed=0)
    train(quiet, first, save_dir=workdir / "checkpoint", lora_seed=0)
    resumed = train(quiet, args.steps - first, resume_dir=workdir / "checkpoint", lora_seed=99, restore_sra=restore_sra)
    return full["loss"][first:], resumed["loss"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="SRA in diffusers' Flux DreamBooth-LoRA training step, on a tiny random Flux (CPU, no downloads)",
    )
    p.add_argument("--steps", type=int, default=8, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=2, help="batch size (default: %(default)s)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank; lora_alpha = rank, as in the script (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--student-layer", type=int, default=2, help="SRA student block, 1-based, double- then single-stream blocks (default: %(default)s)")
    p.add_argument("--teacher-layer", type=int, default=5, help="SRA teacher block (default: %(default)s)")
    p.add_argument("--sra-weight", type=float, default=0.2, help="SRA loss weight (default: %(default)s)")
    p.add_argument("--ema-decay", type=float, default=0.99, help="EMA decay of the LoRA weights, the SRA teacher (default: %(default)s)")
    p.add_argument("--max-gap", type=float, default=0.2, help="largest sigma - sigma_s of the teacher (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="the guidance embed's value, as the script's --guidance_scale (default: %(default)s)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default: %(default)s)")
    p.add_argument("--mixed-precision", choices=("bf16", "no"), default="bf16", help="base dtype and autocast (default: %(default)s)")
    p.add_argument("--device", choices=("cpu", "auto"), default="cpu", help="cpu, or auto: accelerate's choice (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads; 1 is fastest for a model this small (default: %(default)s)")
    p.add_argument("--no-resume-check", action="store_true", help="skip the save_state/load_state check (default: off)")
    p.add_argument("--quiet", action="store_true", help="no per-step lines (default: off)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "rank", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} is not accepted: use an integer >= 1")
    if not args.no_resume_check and args.steps < 2:
        p.error(f"--steps {args.steps} is too few for the resume check: use >= 2, or --no-resume-check")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_deepspeed_cpu_notice()
    diffusers_logging.set_verbosity_error()  # a random model cast with .to(dtype) makes diffusers chatty
    result = train(args, args.steps)
    print(f"SelfRepresentationAlignment({result['sra_repr']}); head {result['head_dtype']}, "
          f"LoRA {sorted(map(str, result['lora_dtypes']))}, base {sorted(map(str, result['base_dtypes']))}")
    if not args.no_resume_check:
        with tempfile.TemporaryDirectory() as tmp:
            uninterrupted, resumed = check_resume(args, Path(tmp))
        same = uninterrupted == resumed
        print(f"resume check: steps {args.steps // 2 + 1}-{args.steps} uninterrupted {uninterrupted}, "
              f"resumed from accelerator.save_state {resumed}: {'bitwise equal' if same else 'DIFFERENT'}")
        if not same:
            raise SystemExit(1)
        result["resume"] = (uninterrupted, resumed)
    return result


if __name__ == "__main__":
    main()
