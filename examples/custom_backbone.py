"""SRA on an architecture no adapter knows: declare it in a few lines, then train as usual.

``RegisterNet`` is made up: its blocks live in ``model.layers``, each returns a tuple
``(tokens, attention_entropy)``, and the first ``num_registers`` tokens are learned registers, not
image tokens. Without a declaration ``SelfRepresentationAlignment(model)`` raises a ``ValueError``
that lists the block containers it found and prints a ``register_adapter(...)`` call to edit;
``register()`` below is that call, edited. Then a short rectified-flow run on scikit-learn's 8x8
digits (t = 1 is noise, as in the REPA/SRA code), with SRA in one line.

    python examples/custom_backbone.py --steps 300

It runs on one torch thread by default (``--threads``), as examples/train_digits.py does: for a
model this small, more threads mostly wait on each other, and on a CPU that other processes
share they can make a run several times slower.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a clone: make `sra_plugin` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sra_plugin import Adapter, LinearPath, NoiseGap, SelfRepresentationAlignment, register_adapter


class MixerLayer(nn.Module):
    """Attention + MLP with additive conditioning; returns the tokens and the attention entropy."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.cond = nn.Linear(dim, dim)

    def forward(self, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        h = h + self.cond(c)[:, None]
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)).softmax(-1)
        h = h + self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        h = h + self.mlp(self.norm2(h))
        entropy = -(attn * attn.clamp_min(1e-9).log()).sum(-1).mean()
        return h, entropy


class RegisterNet(nn.Module):
    """A made-up denoiser: ``forward(x, t, y)``, t in [0, 1], ``num_registers`` register tokens first."""

    def __init__(self, image_size: int = 8, patch: int = 2, channels: int = 1, dim: int = 64, depth: int = 6,
                 heads: int = 4, num_classes: int = 10, num_registers: int = 4) -> None:
        super().__init__()
        self.patch, self.channels, self.num_registers = patch, channels, num_registers
        self.stem = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2, dim) * 0.02)
        self.registers = nn.Parameter(torch.randn(1, num_registers, dim) * 0.02)
        self.time = nn.Sequential(nn.Linear(32, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label = nn.Embedding(num_classes + 1, dim)  # the last id is the null label for CFG
        self.layers = nn.ModuleList([MixerLayer(dim, heads) for _ in range(depth)])
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, patch * patch * channels))

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        b, _, height, width = x.shape
        freqs = torch.exp(-math.log(1000.0) * torch.arange(16, device=x.device) / 16)
        c = self.time(torch.cat([torch.cos(1000 * t[:, None] * freqs), torch.sin(1000 * t[:, None] * freqs)], 1)) + self.label(y)
        h = torch.cat([self.registers.expand(b, -1, -1), self.stem(x).flatten(2).transpose(1, 2) + self.pos], 1)
        for layer in self.layers:
            h, _ = layer(h, c)
        p, gh, gw = self.patch, height // self.patch, width // self.patch
        out = self.out(h[:, self.num_registers:]).reshape(b, gh, gw, p, p, self.channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, self.channels, height, width)


def register() -> Adapter:
    """The whole declaration: which class, where the blocks are, where the image tokens are."""
    return register_adapter(
        "register-net",
        matches=RegisterNet,
        blocks="layers",
        tokens=lambda output, model: output[0][:, model.num_registers:],
    )


def digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images).float().unsqueeze(1) / 8.0 - 1.0  # (1797, 1, 8, 8) in [-1, 1]
    return x, torch.from_numpy(data.target).long()


def train(steps: int = 300, batch: int = 64, seed: int = 0, log_every: int = 50) -> list[dict[str, float]]:
    """Train a RegisterNet with SRA; returns the logged figures."""
    torch.manual_seed(seed)
    register()
    x_all, y_all = digits()
    model = RegisterNet()
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, ema_decay=0.999)
    opt = torch.optim.AdamW([*model.parameters(), *sra.head.parameters()], lr=3e-4)
    gap, path = NoiseGap(max_gap=0.2), LinearPath()
    log = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x_all), (batch,))
        x0, y = x_all[idx], y_all[idx]
        y = torch.where(torch.rand(batch) < 0.1, 10, y)  # CFG label dropout, in the data
        noise = torch.randn_like(x0)
        t = torch.rand(batch)
        s = gap.sample(t)
        x_t, x_s = path.pair(x0, noise, t, s)

        pred = model(x_t, t, y)
        diff_loss = F.mse_loss(pred, noise - x0)
        loss = diff_loss + sra(model, x_t, x_s, t, s, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sra.update_teacher()
        if step % log_every == 0 or step == steps:
            row = {"step": step, "diff_loss": diff_loss.item(), **sra.metrics}
            log.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 1 is fastest for this model (default: %(default)s)")
    args = parser.parse_args()
    for name in ("steps", "batch", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)} is not accepted: use an integer >= 1")
    torch.set_num_threads(args.threads)
    train(args.steps, args.batch, args.seed)


if __name__ == "__main__":
    main()
