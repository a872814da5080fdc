"""Teacher noise levels and the interpolation paths that turn (x0, noise, t) into x_t.

SRA (arXiv 2505.02831, Sec. 3.2, "dynamic interval"): the teacher sees the same sample at a
*less noisy* time ``s = t - max_gap * U(0, 1)``, clamped to the time range. The same ``x0`` and the
same ``noise`` tensor build both ``x_t`` and ``x_s``.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import Tensor

from ._checks import is_real, plain_number

__all__ = ["NoiseGap", "LinearPath", "CosinePath", "DDPMPath", "flow_teacher_input"]

_ORIENTATIONS = ("hi", "lo")


def _check_orientation(noise_at: str) -> None:
    if noise_at not in _ORIENTATIONS:
        raise ValueError(
            f"noise_at={noise_at!r} is not accepted: use 'hi' (large t is noise, the DiT/REPA/SRA "
            "convention) or 'lo' (small t is noise, the original SiT convention)"
        )


def _work_dtype(t: Tensor) -> torch.dtype:
    # float64 keeps rounding below the resolution of t itself; MPS has no float64.
    return torch.float32 if t.device.type == "mps" else torch.float64


class NoiseGap:
    """Samples the teacher's time ``s`` from the student's time ``t``.

    Paper, Sec. 3.2: "we gradually decrease the noise level of the teacher input ... the interval
    between the two noise levels is sampled dynamically". Here ``s = clamp(t - max_gap * U(0, 1), lo, hi)``
    with ``U`` drawn per element, and the teacher is never noisier than the student: where the clamp
    would push ``s`` past ``t`` (``t`` outside ``[lo, hi]``) ``s = t``. Only the data-side bound is
    applied, so a ``t`` beyond the noise end still moves by at most ``max_gap``. Casting back to
    ``t``'s dtype rounds towards ``t``, so rounding never widens the gap or leaves the range.

    ``discrete=True`` is for integer steps (DDPM): ``s = t - randint(0, max_gap)``, so ``t - s < max_gap``.
    ``noise_at="lo"`` is for codebases where small ``t`` is pure noise; then ``s >= t``.
    ``s`` has the shape, dtype and device of ``t``.
    """

    def __init__(
        self,
        max_gap: float = 0.2,
        lo: float = 0.0,
        hi: float = 1.0,
        discrete: bool = False,
        noise_at: Literal["hi", "lo"] = "hi",
    ) -> None:
        if not is_real(max_gap) or not math.isfinite(max_gap):
            raise ValueError(f"max_gap={max_gap!r} is not accepted: use a finite number >= 0")
        if max_gap < 0:
            raise ValueError(f"max_gap={max_gap!r} is not accepted: use a number >= 0")
        for name, value in (("lo", lo), ("hi", hi)):
            if not is_real(value) or math.isnan(value):
                raise ValueError(f"{name}={value!r} is not accepted: use a number")
        if lo > hi:
            raise ValueError(f"lo={lo!r} > hi={hi!r}: use lo <= hi")
        if discrete and float(max_gap) != int(max_gap):
            raise ValueError(f"max_gap={max_gap!r} is not accepted with discrete=True: use a whole number of steps")
        _check_orientation(noise_at)
        self.max_gap = int(max_gap) if discrete else float(max_gap)
        self.lo, self.hi = plain_number(lo), plain_number(hi)
        self.discrete = bool(discrete)
        self.noise_at = noise_at

    def __repr__(self) -> str:
        return (
            f"NoiseGap(max_gap={self.max_gap}, lo={self.lo}, hi={self.hi}, "
            f"discrete={self.discrete}, noise_at={self.noise_at!r})"
        )

    def sample(self, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The teacher's time for each element of ``t``."""
        if not isinstance(t, Tensor):
            raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"t has dtype {t.dtype}: use a real floating or integer tensor")
        if not self.discrete and not t.is_floating_point():
            # A fractional gap on whole steps would round back to t: the teacher would get no gap.
            raise TypeError(
                f"t has integer dtype {t.dtype} but NoiseGap(discrete=False): for integer steps use "
                f"NoiseGap(max_gap=<steps>, lo=1, hi=<T - 1>, discrete=True), or pass a floating t"
            )
        work = _work_dtype(t)
        tw = t.to(work)
        if self.discrete:
            if self.max_gap > 0:
                gap = torch.randint(0, self.max_gap, t.shape, generator=generator, device=t.device).to(work)
            else:
                gap = torch.zeros_like(tw)
        else:
            u = torch.rand(t.shape, generator=generator, device=t.device, dtype=work)
            gap = u * self.max_gap
        # Clamping to the far end too would move a t beyond it by more than max_gap.
        if self.noise_at == "hi":
            s = torch.minimum((tw - gap).clamp_min(self.lo), tw)
        else:
            s = torch.maximum((tw + gap).clamp_max(self.hi), tw)
        # Round towards t, not to nearest: a rounded s could lie past max_gap or outside [lo, hi].
        if not t.is_floating_point():
            s = s.ceil() if self.noise_at == "hi" else s.floor()
            info = torch.iinfo(t.dtype)
            return s.clamp(info.min, info.max).to(t.dtype)
        out = s.to(t.dtype)
        if t.dtype == work:
            return out
        back = out.to(work)
        away = back < s if self.noise_at == "hi" else back > s
        return torch.where(away, torch.nextafter(out, t), out)


def _expand(coef: Tensor, like: Tensor) -> Tensor:
    return coef.reshape(coef.shape + (1,) * (like.dim() - coef.dim())).to(like.dtype)


class _ContinuousPath:
    """``x_t = alpha(t) * x0 + sigma(t) * noise`` on ``t`` in [0, 1]."""

    def __init__(self, noise_at: Literal["hi", "lo"] = "hi") -> None:
        _check_orientation(noise_at)
        self.noise_at = noise_at

    def _tau(self, t: Tensor | float) -> Tensor:
        device = t.device if isinstance(t, Tensor) else None
        t = torch.as_tensor(t, dtype=torch.float32 if device is not None and device.type == "mps" else torch.float64, device=device)
        return t if self.noise_at == "hi" else 1 - t

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __call__(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t`` for a batch: ``t`` is a scalar or has one entry per sample."""
        alpha, sigma = self.alpha_sigma(t)
        return _expand(alpha, x0) * x0 + _expand(sigma, noise) * noise

    def pair(self, x0: Tensor, noise: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_t, x_s)`` from the same ``x0`` and the same ``noise``, as SRA requires."""
        return self(x0, noise, t), self(x0, noise, s)

    def snr(self, t: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return alpha**2 / sigma**2


class LinearPath(_ContinuousPath):
    """Rectified-flow / SiT path: ``x_t = (1 - t) x0 + t noise`` (``noise_at="hi"``).

    ``velocity`` is the flow-matching target ``d x_t / dt``.
    """

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        tau = self._tau(t)
        return 1 - tau, tau

    def velocity(self, x0: Tensor, noise: Tensor) -> Tensor:
        v = noise - x0
        return v if self.noise_at == "hi" else -v


class CosinePath(_ContinuousPath):
    """Trigonometric path: ``x_t = cos(pi t / 2) x0 + sin(pi t / 2) noise`` (``noise_at="hi"``)."""

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        tau = self._tau(t)
        # sin of the complement, not cos: cos(pi / 2) is 6e-17 in floating point, so x_1 would not be the noise.
        return torch.sin(0.5 * math.pi * (1 - tau)), torch.sin(0.5 * math.pi * tau)


class DDPMPath:
    """DDPM forward process on integer steps: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""

    def __init__(self, alphas_cumprod: Tensor) -> None:
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() == 0:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(alphas_cumprod.shape)}")
        if bool(((alphas_cumprod <= 0) | (alphas_cumprod > 1)).any()):
            raise ValueError("alphas_cumprod must lie in (0, 1]")
        self.alphas_cumprod = alphas_cumprod

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "DDPMPath":
        """The linear beta schedule of DDPM and DiT."""
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        return cls(torch.cumprod(1 - betas, 0))

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t)
        if t.is_floating_point():
            if bool((t != t.round()).any()):
                raise ValueError("t must hold whole step indices for DDPMPath")
            t = t.long()
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar.sqrt(), (1 - abar).sqrt()

    __call__ = _ContinuousPath.__call__
    pair = _ContinuousPath.pair
    snr = _ContinuousPath.snr


def flow_teacher_input(x0: Tensor, noise: Tensor, sigma: Tensor, max_gap: float = 0.2,
                       pack: Callable[[Tensor], Tensor] | None = None,
                       generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The teacher's input of a flow-matching script, as the keyword arguments ``x_s=`` and ``s=`` of
    ``sra(...)``: ``s = NoiseGap(max_gap).sample(sigma)`` (per sample, in ``sigma``'s dtype) and
    ``x_s = (1 - s) * x0 + s * noise`` from the same ``x0`` and ``noise`` that built the student's input,
    passed through ``pack`` if given (Flux: the script packs 2x2 latent patches into tokens). ``sigma`` holds
    one value per sample, shaped ``(B,)`` or ``(B, 1, ..., 1)`` as the diffusers scripts' ``get_sigmas``.

    One line in diffusers' Flux DreamBooth-LoRA script::

        loss = loss + sra(transformer, packed_noisy_model_input, t=timesteps / 1000, **flow_teacher_input(
            model_input, noise, sigmas, pack=lambda x: FluxPipeline._pack_latents(x, *x.shape)), **conditioning)
    """
    for name, value in (("x0", x0), ("noise", noise), ("sigma", sigma)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}={type(value).__name__} is not accepted: use a torch.Tensor")
    if noise.shape != x0.shape:
        raise ValueError(f"noise of shape {tuple(noise.shape)} is not accepted: use the shape of x0, {tuple(x0.shape)}")
    batch = x0.shape[0] if x0.dim() else None
    if batch is None or sigma.numel() != batch or (sigma.dim() > 1 and sigma.shape[0] != batch):
        raise ValueError(
            f"sigma of shape {tuple(sigma.shape)} is not accepted: use one value per sample of x0 {tuple(x0.shape)}, "
            f"shaped ({batch},) or ({batch}, 1, ..., 1)"
        )
    if pack is not None and not callable(pack):
        raise TypeError(f"pack={pack!r} is not accepted: use a function of the latents, or None")
    s = NoiseGap(max_gap=max_gap).sample(sigma.reshape(batch), generator=generator)
    coef = s.reshape((batch,) + (1,) * (x0.dim() - 1)).to(x0.dtype)
    x_s = (1.0 - coef) * x0 + coef * noise
    return {"x_s": x_s if pack is None else pack(x_s), "s": s}
