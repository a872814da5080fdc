"""SRA on a diffusers MMDiT: a tiny, randomly initialised ``SD3Transformer2DModel`` trained with flow
matching on sklearn's 8x8 digits, the class given through the text path (a fixed random "caption"
per digit). Nothing is downloaded.

    python examples/diffusers_sd3.py --steps 300

SD3's conventions, which the ``diffusers-sd3`` adapter expects: ``x_t = (1 - sigma) x0 + sigma noise``,
target ``noise - x0``, ``timestep = sigma * 1000``, conditioning by keyword. The teacher's ``s`` is
drawn in sigma and scaled the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from sklearn.datasets import load_digits

from sra_plugin import LinearPath, NoiseGap, SelfRepresentationAlignment


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="SRA on a tiny diffusers SD3Transformer2DModel (flow matching, CPU)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the data (default: %(default)s)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error(f"--steps {args.steps} and --batch-size {args.batch_size} must be >= 1")

    torch.manual_seed(args.seed)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8 - 1  # (N, 1, 8, 8) in [-1, 1]
    labels = torch.tensor(digits.target)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=6,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
        caption_projection_dim=64, pooled_projection_dim=16, pos_embed_max_size=8,
    )
    captions = torch.randn(10, 4, 32)  # per digit: 4 "text" tokens for encoder_hidden_states
    pooled = torch.randn(10, 16)       # and a pooled text embedding

    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, ema_decay=0.995)
    print(f"SelfRepresentationAlignment({sra.extra_repr()})")
    opt = torch.optim.AdamW([*model.parameters(), *sra.head.parameters()], lr=5e-4)
    path, gap = LinearPath(), NoiseGap(max_gap=0.2)
    model.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(labels), (args.batch_size,))
        x0, y = images[idx], labels[idx]
        noise = torch.randn_like(x0)
        sigma = torch.rand(args.batch_size)
        sigma_s = gap.sample(sigma)
        x_t, x_s = path.pair(x0, noise, sigma, sigma_s)
        cond = dict(encoder_hidden_states=captions[y], pooled_projections=pooled[y])
        pred = model(hidden_states=x_t, timestep=sigma * 1000, **cond).sample
        diff = F.mse_loss(pred, path.velocity(x0, noise))
        loss = diff + sra(model, x_t, x_s, sigma * 1000, sigma_s * 1000, **cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sra.update_teacher()
        if step % 50 == 0 or step == args.steps - 1:
            m = sra.metrics
            print(f"step {step}: diffusion {diff.item():.4f}, alignment {m['align_loss']:.4f}, cos {m['cos_sim']:.3f}")
    return {"diffusion": diff.item(), **sra.metrics}


if __name__ == "__main__":
    main()
