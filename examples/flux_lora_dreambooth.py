"""SRA added to diffusers' Flux DreamBooth-LoRA script (``examples/dreambooth/train_dreambooth_lora_flux.py``)
in four lines, on a tiny random ``FluxTransformer2DModel`` and tiny CLIP/T5 text encoders: nothing is
downloaded, a few seconds on a CPU, one process or several (``torchrun --nproc_per_node 2``, gloo).

    python examples/flux_lora_dreambooth.py                      # 8 optimizer steps, then the resume check
    python examples/flux_lora_dreambooth.py --train-text-encoder --gradient-accumulation-steps 2
    torchrun --nproc_per_node 2 examples/flux_lora_dreambooth.py --no-resume-check

``train()`` follows the script's structure: the frozen base in ``weight_dtype``, LoRA added with
``add_adapter`` (the CLIP text encoder's too under ``--train-text-encoder``; otherwise the prompt's
embeddings are computed once and the text encoders deleted), float32 LoRA only under fp16
(``cast_training_params``), save/load hooks that iterate accelerate's models, write the LoRA weights
alone and raise on an unexpected model, ``accelerator.prepare``, ``with accelerator.accumulate(...)``,
``accelerator.backward``, clipping when ``accelerator.sync_gradients``, ``optimizer.step()``,
``lr_scheduler.step()``, ``optimizer.zero_grad()``, ``accelerator.save_state`` every
``--checkpointing-steps`` optimizer steps (main process) and ``accelerator.load_state`` to resume.
The instance images are cached latents (``--cache_latents``); one stand-in: each micro-batch draws
its samples, noise, timesteps and teacher gap from its own generator (the script: the global RNG), so
that N processes and a one-process run over the same micro-batches draw the same numbers.

The four lines SRA adds, each marked ``# SRA`` (the save/load hooks are not touched; ``sra`` is not
passed to ``accelerator.prepare``):

1. ``sra = SelfRepresentationAlignment(transformer, ...).checkpoint_with(accelerator)`` after
   ``add_adapter``: ``accelerator.register_for_checkpointing(sra)``, so ``save_state``/``load_state``
   save and restore its head, EMA teacher and step;
2. ``params_to_optimize.append({"params": list(sra.head.parameters()), ...})``: the optimizer trains the head;
3. ``loss = loss + sra(transformer, packed_noisy_model_input, t=timesteps / 1000, **flow_teacher_input(...), ...)``:
   the teacher's input from the same latents and noise at a less noisy sigma, packed like the student's;
4. ``sra.update_teacher()`` where ``accelerator.sync_gradients`` marks an optimizer step.

On several processes the head's gradients are averaged across them by ``sra`` itself (and rank 0's head
copied at the first step), as DDP does for the transformer; the EMA follows weights equal on every rank.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a clone: make `sra_plugin` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import (cast_training_params, compute_density_for_timestep_sampling,
                                      compute_loss_weighting_for_sd3)
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from examples._logging import quiet_deepspeed_cpu_notice
from sra_plugin import SelfRepresentationAlignment, flow_teacher_input

LATENT_CHANNELS, LATENT_SIDE, TEXT_TOKENS, TEXT_DIM, POOLED_DIM, VOCAB = 16, 8, 6, 32, 16, 64
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the diffusers script's default --lora_layers
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # the script's text encoder LoRA targets


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


def latent_image_ids_of(height: int, width: int) -> Tensor:
    """Flux's position ids of the packed tokens: (0, row, column) per 2x2 patch."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def get_sigmas(scheduler: FlowMatchEulerDiscreteScheduler, timesteps: Tensor, n_dim: int, dtype: torch.dtype) -> Tensor:
    """The script's ``get_sigmas``: the scheduler's sigma of each sampled timestep, shaped (B, 1, 1, 1)."""
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigma = scheduler.sigmas.to(dtype=dtype)[step_indices].flatten()
    return sigma.reshape(-1, *([1] * (n_dim - 1)))


def tiny_text_encoders(seed: int) -> tuple[CLIPTextModel, T5EncoderModel]:
    """Stand in for ``CLIPTextModel``/``T5EncoderModel.from_pretrained``: one layer each, random weights."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=VOCAB, hidden_size=POOLED_DIM, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=TEXT_TOKENS, projection_dim=POOLED_DIM, bos_token_id=1, eos_token_id=2, pad_token_id=0))
        t5 = T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    return clip.eval(), t5.eval()  # from_pretrained returns them in eval mode (T5's dropout off)


def tokenize_prompt(seed: int) -> Tensor:
    """Stands in for the tokenizers: the instance prompt's token ids, ending with CLIP's end token."""
    ids = torch.randint(3, VOCAB, (1, TEXT_TOKENS), generator=torch.Generator().manual_seed(seed))
    ids[0, -1] = 2
    return ids


def encode_prompt(text_encoders: list, text_input_ids: Tensor, device: torch.device, dtype: torch.dtype):
    """The script's ``encode_prompt``: CLIP's pooled output, T5's hidden states, zero text ids."""
    pooled_prompt_embeds = text_encoders[0](text_input_ids.to(device), output_hidden_states=False).pooler_output
    prompt_embeds = text_encoders[1](text_input_ids.to(device))[0]
    text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=device, dtype=dtype)
    return prompt_embeds.to(dtype), pooled_prompt_embeds.to(dtype), text_ids


class CachedLatentsLoader:
    """Stands in for the prepared ``train_dataloader`` with ``--cache_latents``: fixed "instance image" latents
    (already VAE-encoded, shifted and scaled). It yields the micro-batches of optimizer steps
    ``first_step, first_step + 1, ...``, each with its own generator (seeded by step, micro-batch and
    shard), for the shards ``shards`` (one process: its own index). A one-process run with ``shards=[0, 1]``
    and twice the accumulation trains on exactly the micro-batches two processes do."""

    def __init__(self, seed: int, batch_size: int, accumulation: int, shards: list[int], first_step: int,
                 max_steps: int, count: int = 8) -> None:
        g = torch.Generator().manual_seed(seed)
        pattern = torch.randn(1, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE, generator=g)
        self.latents = pattern + 0.3 * torch.randn(count, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE, generator=g)
        self.seed, self.batch_size, self.accumulation, self.shards = seed, batch_size, accumulation, shards
        self.first_step, self.max_steps = first_step, max_steps

    def __iter__(self):
        for step in range(self.first_step, self.max_steps):
            for micro in range(self.accumulation):
                for shard in self.shards:
                    generator = torch.Generator().manual_seed(self.seed * 1_000_003 + (step * 1000 + micro) * 100 + shard)
                    index = torch.randint(0, len(self.latents), (self.batch_size,), generator=generator)
                    yield {"latents": self.latents[index], "generator": generator}


def unwrap_model(accelerator: Accelerator, model):
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


def train(args: argparse.Namespace) -> dict:
    """One run of the script: ``--max-train-steps`` optimizer steps, from ``--resume-from-checkpoint`` if
    given; ``accelerator.save_state`` into ``--output-dir/checkpoint-<step>`` every ``--checkpointing-steps``.
    Returns this process's losses (one per micro-batch) and final state."""
    processes = args.simulate_processes  # 1, or N: this one process trains on N processes' micro-batches
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps * processes,
                              mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    if args.seed is not None:
        set_seed(args.seed)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[args.mixed_precision]

    text_encoder_one, text_encoder_two = tiny_text_encoders(seed=4321)  # the "pretrained" weights
    transformer = tiny_flux(seed=1234)
    transformer.requires_grad_(False)
    text_encoder_one.requires_grad_(False)
    text_encoder_two.requires_grad_(False)
    transformer.to(accelerator.device, dtype=weight_dtype)
    text_encoder_one.to(accelerator.device, dtype=weight_dtype)
    text_encoder_two.to(accelerator.device, dtype=weight_dtype)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder_one.gradient_checkpointing_enable()

    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS))
    if args.train_text_encoder:
        text_encoder_one.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                                target_modules=TEXT_LORA_TARGETS))
    sra = SelfRepresentationAlignment(transformer, student_layer=args.student_layer, teacher_layer=args.teacher_layer, ema_decay=args.ema_decay, weight=args.sra_weight).checkpoint_with(accelerator)  # SRA

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            transformer_lora_layers_to_save = None
            text_encoder_one_lora_layers_to_save = None
            for model in models:
                if isinstance(unwrap_model(accelerator, model), type(unwrap_model(accelerator, transformer))):
                    transformer_lora_layers_to_save = get_peft_model_state_dict(unwrap_model(accelerator, model))
                elif isinstance(unwrap_model(accelerator, model), type(unwrap_model(accelerator, text_encoder_one))):
                    text_encoder_one_lora_layers_to_save = get_peft_model_state_dict(unwrap_model(accelerator, model))
                else:
                    raise ValueError(f"unexpected save model: {model.__class__}")
                weights.pop()  # make sure to pop weight so that corresponding model is not saved again
            # FluxPipeline.save_lora_weights(output_dir, transformer_lora_layers=..., text_encoder_lora_layers=...)
            save_file(transformer_lora_layers_to_save, os.path.join(output_dir, "transformer_lora.safetensors"))
            if text_encoder_one_lora_layers_to_save is not None:
                save_file(text_encoder_one_lora_layers_to_save, os.path.join(output_dir, "text_encoder_lora.safetensors"))

    def load_model_hook(models, input_dir):
        transformer_ = None
        text_encoder_one_ = None
        while len(models) > 0:
            model = unwrap_model(accelerator, models.pop())
            if isinstance(model, type(unwrap_model(accelerator, transformer))):
                transformer_ = model
            elif isinstance(model, type(unwrap_model(accelerator, text_encoder_one))):
                text_encoder_one_ = model
            else:
                raise ValueError(f"unexpected save model: {model.__class__}")
        incompatible_keys = set_peft_model_state_dict(transformer_, load_file(os.path.join(input_dir, "transformer_lora.safetensors")))
        if incompatible_keys is not None and getattr(incompatible_keys, "unexpected_keys", None):
            raise ValueError(f"unexpected keys when loading the LoRA weights: {incompatible_keys.unexpected_keys[:3]}")
        if args.train_text_encoder:
            set_peft_model_state_dict(text_encoder_one_, load_file(os.path.join(input_dir, "text_encoder_lora.safetensors")))
        if args.mixed_precision == "fp16":
            models = [transformer_]
            if args.train_text_encoder:
                models.extend([text_encoder_one_])
            cast_training_params(models)  # only upcast trainable parameters (LoRA) into fp32

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if args.mixed_precision == "fp16":
        models = [transformer]
        if args.train_text_encoder:
            models.extend([text_encoder_one])
        cast_training_params(models, dtype=torch.float32)

    transformer_lora_parameters = list(filter(lambda p: p.requires_grad, transformer.parameters()))
    transformer_parameters_with_lr = {"params": transformer_lora_parameters, "lr": args.learning_rate}
    if args.train_text_encoder:
        text_lora_parameters_one = list(filter(lambda p: p.requires_grad, text_encoder_one.parameters()))
        text_parameters_one_with_lr = {"params": text_lora_parameters_one, "lr": args.learning_rate}
        params_to_optimize = [transformer_parameters_with_lr, text_parameters_one_with_lr]
    else:
        params_to_optimize = [transformer_parameters_with_lr]
    params_to_optimize.append({"params": list(sra.head.parameters()), "lr": args.learning_rate})  # SRA
    optimizer = torch.optim.AdamW(params_to_optimize, lr=args.learning_rate)

    noise_scheduler_copy = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    instance_prompt_ids = tokenize_prompt(seed=7)
    if not args.train_text_encoder:
        with torch.no_grad():
            instance_prompt_hidden_states, instance_pooled_prompt_embeds, instance_text_ids = encode_prompt(
                [text_encoder_one, text_encoder_two], instance_prompt_ids, accelerator.device, weight_dtype)
        del text_encoder_one, text_encoder_two  # the script frees them: the hooks must never need them

    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    if args.train_text_encoder:
        transformer, text_encoder_one, optimizer, lr_scheduler = accelerator.prepare(
            transformer, text_encoder_one, optimizer, lr_scheduler)
    else:
        transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)

    global_step = 0
    if args.resume_from_checkpoint:
        path = os.path.basename(args.resume_from_checkpoint)
        accelerator.load_state(os.path.join(args.output_dir, path))
        global_step = int(path.split("-")[1])

    shards = list(range(processes)) if processes > 1 else [accelerator.process_index]
    train_dataloader = CachedLatentsLoader(args.data_seed, args.train_batch_size, args.gradient_accumulation_steps,
                                           shards, global_step, args.max_train_steps)
    losses: list[float] = []
    transformer.train()
    if args.train_text_encoder:
        text_encoder_one.train()
    for step, batch in enumerate(train_dataloader):
        models_to_accumulate = [transformer]
        if args.train_text_encoder:
            models_to_accumulate.extend([text_encoder_one])
        with accelerator.accumulate(models_to_accumulate):
            generator = batch["generator"]
            if args.train_text_encoder:
                prompt_embeds, pooled_prompt_embeds, text_ids = encode_prompt(
                    [text_encoder_one, text_encoder_two], instance_prompt_ids, accelerator.device, weight_dtype)
            else:
                prompt_embeds, pooled_prompt_embeds, text_ids = (
                    instance_prompt_hidden_states, instance_pooled_prompt_embeds, instance_text_ids)
            model_input = batch["latents"].to(accelerator.device, dtype=weight_dtype)
            prompt_embeds = prompt_embeds.expand(model_input.shape[0], -1, -1)
            pooled_prompt_embeds = pooled_prompt_embeds.expand(model_input.shape[0], -1)
            latent_image_ids = latent_image_ids_of(model_input.shape[2], model_input.shape[3]).to(accelerator.device, weight_dtype)

            noise = torch.randn(model_input.shape, generator=generator).to(model_input.device, model_input.dtype)
            bsz = model_input.shape[0]
            u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=bsz, generator=generator)
            indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
            timesteps = noise_scheduler_copy.timesteps[indices].to(device=model_input.device)
            sigmas = get_sigmas(noise_scheduler_copy, timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
            noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
            packed_noisy_model_input = pack_latents(noisy_model_input)
            guidance = torch.tensor([args.guidance_scale], device=accelerator.device).expand(model_input.shape[0])

            model_pred = transformer(
                hidden_states=packed_noisy_model_input,
                timestep=timesteps / 1000,
                guidance=guidance,
                pooled_projections=pooled_prompt_embeds,
                encoder_hidden_states=prompt_embeds,
                txt_ids=text_ids,
                img_ids=latent_image_ids,
                return_dict=False,
            )[0]
            model_pred = unpack_latents(model_pred, model_input.shape[2], model_input.shape[3])
            weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
            target = noise - model_input
            loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
            loss = loss.mean()
            loss = loss + sra(transformer, packed_noisy_model_input, t=timesteps / 1000, **flow_teacher_input(model_input, noise, sigmas, pack=pack_latents, generator=generator), guidance=guidance, pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=latent_image_ids)  # SRA

            accelerator.backward(loss)
            if accelerator.sync_gradients:
                params_to_clip = (
                    [*transformer.parameters(), *text_encoder_one.parameters()]
                    if args.train_text_encoder else transformer.parameters()
                )
                accelerator.clip_grad_norm_(params_to_clip, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()

        if accelerator.sync_gradients:
            global_step += 1
            sra.update_teacher()  # SRA
            if accelerator.is_main_process and global_step % args.checkpointing_steps == 0:
                save_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
                accelerator.save_state(save_path)
        losses.append(loss.detach().item())
        if not args.quiet and accelerator.is_main_process:
            print(f"micro-batch {step}: loss {loss.item():.6f} (SRA {sra.metrics['align_loss']:.4f}), "
                  f"optimizer step {global_step}", flush=True)
        if global_step >= args.max_train_steps:
            break

    accelerator.wait_for_everyone()
    transformer_ = unwrap_model(accelerator, transformer)
    result = {
        "loss": losses, "step": sra.step, "global_step": global_step, "student_reruns": sra.student_reruns,
        "lora": {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer_).items()},
        "sra": {k: v.detach().clone() for k, v in sra.state_dict().items()},
        "sra_repr": sra.extra_repr(), "head_dtype": next(sra.head.parameters()).dtype,
        "lora_dtypes": {p.dtype for p in transformer_lora_parameters},
        "base_dtypes": {p.dtype for p in transformer_.parameters() if not p.requires_grad},
    }
    if args.train_text_encoder:
        result["text_lora"] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(unwrap_model(accelerator, text_encoder_one)).items()}
    if args.report:
        torch.save(result, f"{args.report}.rank{accelerator.process_index}.pt")
    sra.remove()
    accelerator.end_training()
    return result


def check_resume(args: argparse.Namespace, workdir: Path) -> tuple[dict, dict]:
    """The results of an uninterrupted run that saves a checkpoint after optimizer step ``args.max_train_steps // 2``,
    and of a run resumed from it whose LoRA and head start elsewhere (another ``--seed``: only ``load_state`` can
    make them agree). Their losses are compared from that step on (``resumed_losses``)."""
    half = args.max_train_steps // 2
    full_args = copy.copy(args)
    full_args.quiet, full_args.output_dir, full_args.checkpointing_steps = True, str(workdir), half
    full_args.resume_from_checkpoint, full_args.report = None, None
    AcceleratorState._reset_state(reset_partial_state=True)
    full = train(full_args)
    resumed_args = copy.copy(full_args)
    resumed_args.seed, resumed_args.resume_from_checkpoint = (args.seed or 0) + 99, f"checkpoint-{half}"
    resumed_args.checkpointing_steps = args.max_train_steps + 1
    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per run, as in a script
    resumed = train(resumed_args)
    return full, resumed


def resumed_losses(args: argparse.Namespace, full: dict, resumed: dict) -> tuple[list[float], list[float]]:
    """The losses of the micro-batches after the checkpoint: uninterrupted, and resumed."""
    micro = args.gradient_accumulation_steps * args.simulate_processes
    return full["loss"][(args.max_train_steps // 2) * micro:], resumed["loss"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="SRA in diffusers' Flux DreamBooth-LoRA script, on a tiny random Flux (CPU, no downloads)",
    )
    p.add_argument("--max-train-steps", type=int, default=8, help="optimizer steps (default: %(default)s)")
    p.add_argument("--train-batch-size", type=int, default=2, help="batch size per process (default: %(default)s)")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step (default: %(default)s)")
    p.add_argument("--train-text-encoder", action="store_true", help="LoRA on the CLIP text encoder too (default: off)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", help="run without the script's --gradient_checkpointing (default: on)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank; lora_alpha = rank, as in the script (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--student-layer", type=int, default=2, help="SRA student block, 1-based, double- then single-stream blocks (default: %(default)s)")
    p.add_argument("--teacher-layer", type=int, default=5, help="SRA teacher block (default: %(default)s)")
    p.add_argument("--sra-weight", type=float, default=0.2, help="SRA loss weight (default: %(default)s)")
    p.add_argument("--ema-decay", type=float, default=0.99, help="EMA decay of the LoRA weights, the SRA teacher (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="the guidance embed's value, as the script's --guidance_scale (default: %(default)s)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default: %(default)s)")
    p.add_argument("--mixed-precision", choices=("bf16", "no"), default="bf16", help="base dtype and autocast (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="set_seed: LoRA and head initialisation (default: %(default)s)")
    p.add_argument("--data-seed", type=int, default=7, help="the cached latents and each micro-batch's draws (default: %(default)s)")
    p.add_argument("--output-dir", default=None, help="where checkpoint-<step> folders go (default: a temporary folder)")
    p.add_argument("--checkpointing-steps", type=int, default=500, help="save_state every this many optimizer steps (default: %(default)s)")
    p.add_argument("--resume-from-checkpoint", default=None, help="checkpoint-<step> in --output-dir to resume from (default: none)")
    p.add_argument("--simulate-processes", type=int, default=1, help="one process trains on the micro-batches of this many, the reference of the multi-process test (default: %(default)s)")
    p.add_argument("--report", default=None, help="torch.save this process's result to REPORT.rank<i>.pt (default: none)")
    p.add_argument("--device", choices=("cpu", "auto"), default="cpu", help="cpu, or auto: accelerate's choice (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads; 1 is fastest for a model this small (default: %(default)s)")
    p.add_argument("--no-resume-check", action="store_true", help="skip the save_state/load_state check (default: off)")
    p.add_argument("--quiet", action="store_true", help="no per-step lines (default: off)")
    args = p.parse_args(argv)
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "rank", "threads",
                 "checkpointing_steps", "simulate_processes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} is not accepted: use an integer >= 1")
    if not args.no_resume_check and args.max_train_steps < 2:
        p.error(f"--max-train-steps {args.max_train_steps} is too few for the resume check: use >= 2, or --no-resume-check")
    if not args.no_resume_check and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error("the resume check runs in one process: add --no-resume-check under torchrun (and resume with "
                "--output-dir DIR --resume-from-checkpoint checkpoint-<step>)")
    if args.resume_from_checkpoint and not args.output_dir:
        p.error(f"--resume-from-checkpoint {args.resume_from_checkpoint} needs --output-dir (the folder that holds it)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_deepspeed_cpu_notice()
    diffusers_logging.set_verbosity_error()  # a random model cast with .to(dtype) makes diffusers chatty
    with tempfile.TemporaryDirectory() as tmp:
        if args.output_dir is None:
            args.output_dir = tmp
        result = train(args)
        main_process = int(os.environ.get("RANK", "0")) == 0
        if main_process:
            print(f"SelfRepresentationAlignment({result['sra_repr']}); head {result['head_dtype']}, "
                  f"LoRA {sorted(map(str, result['lora_dtypes']))}, base {sorted(map(str, result['base_dtypes']))}")
        if not args.no_resume_check:
            with tempfile.TemporaryDirectory() as work:
                runs = check_resume(args, Path(work))
            uninterrupted, resumed = resumed_losses(args, *runs)
            result["resume_runs"] = runs
            same = uninterrupted == resumed
            print(f"resume check: after step {args.max_train_steps // 2}, uninterrupted {uninterrupted}, "
                  f"resumed from accelerator.save_state {resumed}: {'bitwise equal' if same else 'DIFFERENT'}")
            if not same:
                raise SystemExit(1)
            result["resume"] = (uninterrupted, resumed)
    return result


if __name__ == "__main__":
    main()
