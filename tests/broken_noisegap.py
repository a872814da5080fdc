"""Deliberately wrong versions of ``NoiseGap.sample``, and a runner that shows the property tests catch each.

Each entry of ``BROKEN`` is a drop-in ``sample(self, t, generator=None)``. ``reference`` is a correct
re-implementation built from the same pieces as the broken ones, so that a failure under a broken
version is caused by its one mistake and not by the scaffolding. The first four are the mistakes
named in issue 4; the others are subtler ones the suite also has to catch.

Run them all (each one is a separate pytest run of the NoiseGap/path property tests)::

    python tests/broken_noisegap.py                 # exit status 0 iff every broken version fails
    python tests/broken_noisegap.py gap_too_large   # only some

or one by hand: ``python -m pytest tests/test_noise_properties.py --broken-noisegap=no_gap``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
SUITE = ["tests/test_noise_properties.py"]


def _draw(gap, t: Tensor, generator, scale: float = 1.0, widen: int = 0, global_rng: bool = False) -> Tensor:
    """Per-element gaps in float64: ``U * max_gap * scale`` or ``randint(0, max_gap + widen)``."""
    gen = None if global_rng else generator
    if gap.discrete:
        high = gap.max_gap + widen
        if high <= 0:
            return torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        return torch.randint(0, high, t.shape, generator=gen, device=t.device).to(torch.float64)
    return torch.rand(t.shape, generator=gen, device=t.device, dtype=torch.float64) * gap.max_gap * scale


def _finish(gap, t: Tensor, s: Tensor) -> Tensor:
    """Cast ``s`` (float64) to ``t``'s dtype, rounding towards ``t`` (never further than computed)."""
    towards_data = gap.noise_at == "hi"
    if not t.is_floating_point():
        s = s.ceil() if towards_data else s.floor()
        info = torch.iinfo(t.dtype)
        return s.clamp(info.min, info.max).to(t.dtype)
    out = s.to(t.dtype)
    away = out.to(torch.float64) < s if towards_data else out.to(torch.float64) > s
    return torch.where(away, torch.nextafter(out, t), out)


def _sample(gap, t: Tensor, generator=None, *, direction: int = 1, clamp: bool = True, guard: bool = True,
            scale: float = 1.0, widen: int = 0, global_rng: bool = False) -> Tensor:
    tw = t.to(torch.float64)
    d = _draw(gap, t, generator, scale, widen, global_rng)
    hi_side = (gap.noise_at == "hi") == (direction == 1)
    s = tw - d if hi_side else tw + d
    if clamp:
        s = s.clamp_min(gap.lo) if hi_side else s.clamp_max(gap.hi)
    if guard:
        s = torch.minimum(s, tw) if hi_side else torch.maximum(s, tw)
    return _finish(gap, t, s)


def reference(self, t: Tensor, generator=None) -> Tensor:
    return _sample(self, t, generator)


def wrong_direction(self, t: Tensor, generator=None) -> Tensor:
    """The teacher gets the *noisier* time: ``s = t + gap``."""
    return _sample(self, t, generator, direction=-1)


def missing_clamp(self, t: Tensor, generator=None) -> Tensor:
    """``s = t - gap`` without the clamp to ``[lo, hi]``."""
    return _sample(self, t, generator, clamp=False)


def gap_too_large(self, t: Tensor, generator=None) -> Tensor:
    """Gaps 10% too wide (continuous) and ``randint(0, max_gap + 1)`` (discrete)."""
    return _sample(self, t, generator, scale=1.1, widen=1)


def no_gap(self, t: Tensor, generator=None) -> Tensor:
    """The teacher sees the student's own time."""
    return t.clone()


def gap_off_by_one(self, t: Tensor, generator=None) -> Tensor:
    """Only the discrete off-by-one: ``randint(0, max_gap + 1)``, so ``t - s == max_gap`` happens."""
    return _sample(self, t, generator, widen=1)


def gap_too_small(self, t: Tensor, generator=None) -> Tensor:
    """Gaps 10% too narrow (continuous) and ``randint(0, max_gap - 1)`` (discrete)."""
    return _sample(self, t, generator, scale=0.9, widen=-1)


def no_boundary_guard(self, t: Tensor, generator=None) -> Tensor:
    """The clamp without ``min(s, t)``: below ``lo`` the teacher is pulled up to ``lo``, noisier than ``t``."""
    return _sample(self, t, generator, guard=False)


def ignores_generator(self, t: Tensor, generator=None) -> Tensor:
    """Draws from the global RNG, so a seeded generator does not reproduce ``s``."""
    return _sample(self, t, generator, global_rng=True)


BROKEN = {
    "reference": reference,
    "wrong_direction": wrong_direction,
    "missing_clamp": missing_clamp,
    "gap_too_large": gap_too_large,
    "no_gap": no_gap,
    "gap_off_by_one": gap_off_by_one,
    "gap_too_small": gap_too_small,
    "no_boundary_guard": no_boundary_guard,
    "ignores_generator": ignores_generator,
}


def _run(name: str | None) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "pytest", *SUITE, "-q", "-p", "no:cacheprovider", "--tb=no", "-rf"]
    if name:
        cmd.append(f"--broken-noisegap={name}")
    start = time.perf_counter()
    # The CI examples without shrinking: a failure is all that is asked for here.
    env = {**os.environ, "SRA_HYPOTHESIS_PROFILE": os.environ.get("SRA_HYPOTHESIS_PROFILE", "mutants")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    took = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if re.search(r"\b(passed|failed|error)", line)]
    failed = [m.group(1) for m in re.finditer(r"^FAILED \S+::(\S+)", proc.stdout, re.M)]
    summary = (lines[-1].strip("= ") if lines else proc.stdout[-300:]) + (f"  [{', '.join(failed)}]" if failed else "")
    return proc.returncode, summary, took


def main(argv: list[str]) -> int:
    names = argv or [n for n in BROKEN if n != "reference"]
    unknown = [n for n in names if n not in BROKEN]
    if unknown:
        print(f"unknown broken versions {unknown}: use some of {', '.join(BROKEN)}")
        return 2
    ok = True
    for name in [None, "reference", *names]:
        rc, summary, took = _run(name)
        must_fail = name not in (None, "reference")
        good = rc == 1 if must_fail else rc == 0
        ok &= good
        label = name or "NoiseGap.sample (the package's)"
        verdict = ("caught" if good else "NOT CAUGHT") if must_fail else ("passes" if good else "FAILS")
        print(f"{label:<34} {verdict:<10} {took:5.1f}s  {summary}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
