"""The models and training batches the cost benchmarks time: one ``Workload`` per backbone family (its batch,
its call, its diffusion loss, the teacher's input and time) and the ``Config`` of each model size
(``configs()``: small ones for the CPU, SiT-XL/2 for a GPU)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sra_plugin import DDPMPath, LinearPath, NoiseGap


# ---------------------------------------------------------------------------------------- workloads
@dataclass
class Batch:
    x0: Tensor
    noise: Tensor
    t: Tensor  # the time the model is called with
    x_t: Tensor
    target: Tensor
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


class Workload:
    """How one backbone family is trained: its batch, its call, its diffusion loss, its teacher time."""

    family = "?"

    def __init__(self, model: nn.Module, batch: int, latent: int, channels: int) -> None:
        self.batch, self.latent, self.channels = batch, latent, channels

    def make_batch(self, gen: torch.Generator, device: torch.device) -> Batch:
        raise NotImplementedError

    def predict(self, model: nn.Module, x: Tensor, t: Tensor, b: Batch) -> Tensor:
        raise NotImplementedError

    def diffusion_loss(self, pred: Tensor, b: Batch) -> Tensor:
        return F.mse_loss(pred.float(), b.target)

    def teacher_pair(self, b: Batch) -> tuple[Tensor, Tensor]:
        """``(x_s, s)``: the teacher's input and time, from the same x0 and noise."""
        raise NotImplementedError

    def _noise(self, gen: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        shape = (self.batch, self.channels, self.latent, self.latent)
        return torch.randn(shape, generator=gen).to(device), torch.randn(shape, generator=gen).to(device)


class SiTWorkload(Workload):
    """SiT in the REPA/SRA convention: linear path, t = 0 data, velocity target, class labels."""

    family = "sit"
    path = LinearPath()
    gap = NoiseGap(max_gap=0.2)

    def __init__(self, model: nn.Module, batch: int, latent: int, channels: int) -> None:
        super().__init__(model, batch, latent, channels)
        self.num_classes = model.y_embedder.num_classes

    def make_batch(self, gen: torch.Generator, device: torch.device) -> Batch:
        x0, noise = self._noise(gen, device)
        t = torch.rand(self.batch, generator=gen).to(device)
        y = torch.randint(0, self.num_classes, (self.batch,), generator=gen).to(device)
        return Batch(x0, noise, t, self.path(x0, noise, t), self.path.velocity(x0, noise), args=(y,))

    def predict(self, model: nn.Module, x: Tensor, t: Tensor, b: Batch) -> Tensor:
        return model(x, t, *b.args)

    def teacher_pair(self, b: Batch) -> tuple[Tensor, Tensor]:
        s = self.gap.sample(b.t)
        return self.path(b.x0, b.noise, s), s


class DiTWorkload(SiTWorkload):
    """DiT: DDPM integer steps, epsilon target on the first half of the (learn_sigma) output."""

    family = "dit"
    path = DDPMPath.linear()
    gap = NoiseGap(max_gap=200, lo=1, hi=999, discrete=True)

    def make_batch(self, gen: torch.Generator, device: torch.device) -> Batch:
        x0, noise = self._noise(gen, device)
        t = torch.randint(0, 1000, (self.batch,), generator=gen).to(device)
        y = torch.randint(0, self.num_classes, (self.batch,), generator=gen).to(device)
        return Batch(x0, noise, t, self.path(x0, noise, t), noise, args=(y,))

    def diffusion_loss(self, pred: Tensor, b: Batch) -> Tensor:
        return F.mse_loss(pred[:, : self.channels].float(), b.target)


class SD3Workload(Workload):
    """diffusers SD3 MMDiT: rectified flow in sigma, ``timestep = sigma * 1000``, text tokens and pooled vector."""

    family = "sd3"
    path = LinearPath()
    gap = NoiseGap(max_gap=0.2)
    text_tokens = 16

    def __init__(self, model: nn.Module, batch: int, latent: int, channels: int) -> None:
        super().__init__(model, batch, latent, channels)
        self.joint_dim = model.config.joint_attention_dim
        self.pooled_dim = model.config.pooled_projection_dim

    def make_batch(self, gen: torch.Generator, device: torch.device) -> Batch:
        x0, noise = self._noise(gen, device)
        sigma = torch.rand(self.batch, generator=gen).to(device)
        ehs = torch.randn(self.batch, self.text_tokens, self.joint_dim, generator=gen).to(device)
        pooled = torch.randn(self.batch, self.pooled_dim, generator=gen).to(device)
        return Batch(x0, noise, sigma * 1000, self.path(x0, noise, sigma), self.path.velocity(x0, noise),
                     kwargs={"encoder_hidden_states": ehs, "pooled_projections": pooled})

    def predict(self, model: nn.Module, x: Tensor, t: Tensor, b: Batch) -> Tensor:
        return model(hidden_states=x, timestep=t, **b.kwargs).sample

    def teacher_pair(self, b: Batch) -> tuple[Tensor, Tensor]:
        s = self.gap.sample(b.t / 1000)
        return self.path(b.x0, b.noise, s), s * 1000


# ---------------------------------------------------------------------------------------- configurations
@dataclass
class Config:
    name: str
    family: str
    build: Callable[[], nn.Module]
    student_layer: int
    teacher_layer: int
    batch: int
    latent: int
    channels: int = 4
    amp: torch.dtype | None = None
    target: float | None = None  # None: floor + 0.03
    note: str = ""


def _sit(size: str, latent: int, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from examples.models import SiT_models

        return SiT_models[f"SiT-{size}/2"](input_size=latent, num_classes=1000, **kw)
    return build


def _dit(size: str, latent: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from examples.models import DiT_models

        return DiT_models[f"DiT-{size}/2"](input_size=latent, num_classes=1000)
    return build


def _sd3(latent: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from diffusers import SD3Transformer2DModel

        # A small random MMDiT: 12 joint blocks of width 384 (6 heads of 64), 16 text tokens.
        return SD3Transformer2DModel(
            sample_size=latent, patch_size=2, in_channels=4, out_channels=4, num_layers=12,
            attention_head_dim=64, num_attention_heads=6, joint_attention_dim=256,
            caption_projection_dim=384, pooled_projection_dim=128, pos_embed_max_size=max(latent // 2, 16),
        )
    return build


def configs() -> dict[str, Config]:
    cpu = {
        # SiT-B/2: the paper's pair for SiT-B, 3 -> 8 of 12. SiT-S uses the same pair (not given in the paper).
        "SiT-S/2": Config("SiT-S/2", "sit", _sit("S", 8), 3, 8, batch=16, latent=8),
        "SiT-B/2": Config("SiT-B/2", "sit", _sit("B", 8), 3, 8, batch=8, latent=8),
        # DiT-XL's 8 -> 16 of 28 scaled to 12 blocks: 3 -> 7.
        "DiT-S/2": Config("DiT-S/2", "dit", _dit("S", 8), 3, 7, batch=16, latent=8),
        "SD3-MMDiT": Config("SD3-MMDiT", "sd3", _sd3(8), 3, 8, batch=16, latent=8),
    }
    gpu = {
        "SiT-XL/2": Config("SiT-XL/2", "sit", _sit("XL", 32), 8, 20, batch=32, latent=32, amp=torch.bfloat16, target=1.26),
    }
    return {**cpu, **gpu}


DEFAULTS = {"cpu": ["SiT-S/2", "SiT-B/2", "DiT-S/2", "SD3-MMDiT"], "cuda": ["SiT-XL/2"]}
WORKLOADS = {"sit": SiTWorkload, "dit": DiTWorkload, "sd3": SD3Workload}
