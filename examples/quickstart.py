"""The smallest complete SRA loop: a small SiT on sklearn's 8x8 digits, flow matching, SRA in one line.

    python examples/quickstart.py [steps] [--threads N]

It runs on one torch thread by default, as examples/train_digits.py does: for a model this small,
more threads mostly wait on each other, and on a CPU that other processes share they can make
a run several times slower.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # so `examples` imports from a clone
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from examples.models import SiT
from sra_plugin import LinearPath, NoiseGap, SelfRepresentationAlignment

parser = argparse.ArgumentParser(description="The smallest SRA loop: a small SiT on sklearn's 8x8 digits (CPU)")
parser.add_argument("steps", nargs="?", type=int, default=500, help="optimizer steps (default: %(default)s)")
parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 1 is fastest for this model (default: %(default)s)")
args = parser.parse_args()
if args.steps < 1 or args.threads < 1:
    parser.error(f"steps={args.steps}, --threads={args.threads}: both must be integers >= 1")
torch.set_num_threads(args.threads)
torch.manual_seed(0)
digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8 - 1  # (1797, 1, 8, 8) in [-1, 1]
labels = torch.tensor(digits.target)
model = SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=6, num_heads=4, num_classes=10)
sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4, ema_decay=0.995)
opt = torch.optim.AdamW([*model.parameters(), *sra.head.parameters()], lr=1e-3)
path, gap = LinearPath(), NoiseGap(max_gap=0.2)  # x_t = (1 - t) x0 + t noise; teacher at s <= t

for step in range(args.steps):
    idx = torch.randint(0, len(labels), (64,))
    x0, y, noise, t = images[idx], labels[idx], torch.randn(64, 1, 8, 8), torch.rand(64)
    s = gap.sample(t)
    x_t, x_s = path.pair(x0, noise, t, s)
    diff_loss = F.mse_loss(model(x_t, t, y), path.velocity(x0, noise))
    loss = diff_loss + sra(model, x_t, x_s, t, s, y)  # <- the one added line
    opt.zero_grad()
    loss.backward()
    opt.step()
    sra.update_teacher()  # EMA step; sra.teacher is also the model to sample from
    if step % 100 == 0:
        print(f"step {step}: diffusion {diff_loss.item():.4f}, alignment {sra.metrics['align_loss']:.4f}")
print(f"done: diffusion {diff_loss.item():.4f}, alignment {sra.metrics['align_loss']:.4f}")
