"""Property-based tests of ``NoiseGap`` and the interpolation paths (issue 4).

Each property is checked for continuous and discrete steps, both orientations, any ``lo <= hi``,
any ``max_gap >= 0``, batch shapes from 0-d to 3-d (empty included), floating and integer dtypes
and every available device. ``tests/broken_noisegap.py`` shows that wrong implementations fail here.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from sra_plugin import CosinePath, DDPMPath, LinearPath, NoiseGap

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPES = FLOAT_DTYPES + [torch.int32, torch.int64]
SEED = 20250502  # the fixed seed of the statistical tests


# ---------------------------------------------------------------------------------------- strategies
@st.composite
def gaps(draw, discrete: bool | None = None, positive: bool = False) -> NoiseGap:
    """A valid NoiseGap: continuous ranges in [-100, 200], discrete ones in [-50, 1100] steps."""
    discrete = draw(st.booleans()) if discrete is None else discrete
    noise_at = draw(st.sampled_from(["hi", "lo"]))
    if discrete:
        lo = draw(st.one_of(st.just(1), st.integers(-50, 1000)))
        hi = draw(st.one_of(st.just(max(lo, 999)), st.integers(lo, 1100)))
        max_gap = draw(st.integers(1 if positive else 0, 300))
    else:
        anywhere = st.tuples(st.floats(-100, 100), st.floats(0, 100)).map(lambda p: (p[0], p[0] + p[1]))
        lo, hi = draw(st.one_of(st.just((0.0, 1.0)), anywhere))
        positive_gap = st.floats(1e-3, 2.0) | st.floats(1e-3, 50)
        max_gap = draw(positive_gap if positive else st.just(0.0) | positive_gap)
    return NoiseGap(max_gap=max_gap, lo=lo, hi=hi, discrete=discrete, noise_at=noise_at)


@st.composite
def times(draw, gap: NoiseGap, dtype: torch.dtype | None = None, device: str | None = None) -> torch.Tensor:
    """``t`` of any shape: inside the range, on and near its ends, and outside it on both sides."""
    if dtype is None:
        dtype = draw(st.sampled_from(DTYPES if gap.discrete else FLOAT_DTYPES))
    device = draw(st.sampled_from(DEVICES)) if device is None else device
    shape = draw(array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    lo, hi, g = float(gap.lo), float(gap.hi), float(gap.max_gap)
    margin = max(2 * g, 1.0)
    value = st.one_of(
        st.floats(lo, hi),
        st.sampled_from([lo, hi, min(lo + g, hi), max(hi - g, lo)]),
        st.floats(lo - margin, hi + margin),
    )
    values = draw(st.lists(value, min_size=math.prod(shape), max_size=math.prod(shape)))
    t = torch.tensor(values, dtype=torch.float64).reshape(shape)
    if not dtype.is_floating_point:
        t = t.round()
    return t.to(device=device, dtype=dtype)


@st.composite
def cases(draw, discrete: bool | None = None, positive: bool = False) -> tuple[NoiseGap, torch.Tensor, int]:
    """A NoiseGap, a ``t`` for it and a generator seed."""
    gap = draw(gaps(discrete, positive))
    return gap, draw(times(gap)), draw(st.integers(0, 2**31))


def sample(gap: NoiseGap, t: torch.Tensor, seed: int) -> torch.Tensor:
    return gap.sample(t, generator=torch.Generator(t.device).manual_seed(seed))


def f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(device="cpu", dtype=torch.float64)


def in_range(gap: NoiseGap, t: torch.Tensor) -> torch.Tensor:
    tt = f64(t)
    return (tt >= gap.lo) & (tt <= gap.hi)


def toward_noise(gap: NoiseGap, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """How far ``t`` is from ``s`` towards the noise end (``t - s`` for ``noise_at="hi"``)."""
    return f64(t) - f64(s) if gap.noise_at == "hi" else f64(s) - f64(t)


def ks_uniform(r: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of the sample ``r`` from U[0, 1)."""
    r, n = r.sort().values, r.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - r, r - (i - 1) / n).max())


def ks_critical(n: int, alpha: float = 1e-6) -> float:
    """Asymptotic KS critical value: a correct sampler exceeds it with probability ``alpha``."""
    return math.sqrt(-math.log(alpha / 2) / 2) / math.sqrt(n)


# ------------------------------------------------------------------------------------------ NoiseGap
@given(cases())
def test_teacher_never_noisier_than_student(case):
    """For every t (inside the range or not), s <= t with noise_at="hi" and s >= t with noise_at="lo"."""
    gap, t, seed = case
    assert (toward_noise(gap, t, sample(gap, t, seed)) >= 0).all()


@given(cases())
def test_gap_never_exceeds_max_gap(case):
    """|t - s| <= max_gap for continuous steps; for discrete ones |t - s| < max_gap (s == t if max_gap == 0)."""
    gap, t, seed = case
    d = toward_noise(gap, t, sample(gap, t, seed))
    if gap.discrete:
        assert (d <= max(gap.max_gap - 1, 0)).all(), d.max()
    else:
        assert (d <= gap.max_gap).all(), d.max()


@given(cases())
def test_s_stays_in_range_wherever_t_does(case):
    """Where lo <= t <= hi, also lo <= s <= hi."""
    gap, t, seed = case
    s = f64(sample(gap, t, seed))[in_range(gap, t)]
    assert ((s >= gap.lo) & (s <= gap.hi)).all()


@given(gaps(), st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), st.sampled_from(DEVICES))
def test_rounding_to_low_precision_keeps_every_bound(gap, dtype, device):
    """In float16, bfloat16 and float32, over 4,096 times spread across the range and past both ends,
    rounding s to t's dtype never makes the teacher noisier, widens the gap past max_gap, or leaves [lo, hi]."""
    gen = torch.Generator(device).manual_seed(SEED)
    margin = max(float(gap.max_gap), 1.0)
    u = torch.rand(4096, generator=gen, device=device, dtype=torch.float64)
    t = (gap.lo - margin + (gap.hi - gap.lo + 2 * margin) * u).to(dtype)
    s = gap.sample(t, generator=gen)
    d = toward_noise(gap, t, s)
    assert (d >= 0).all()
    assert (d <= (max(gap.max_gap - 1, 0) if gap.discrete else gap.max_gap)).all(), d.max()
    inside = f64(s)[in_range(gap, t)]
    assert ((inside >= gap.lo) & (inside <= gap.hi)).all()


@given(gaps(discrete=False, positive=True), st.sampled_from([torch.float32, torch.float64]), st.sampled_from(DEVICES))
def test_continuous_gap_uniform_away_from_boundary(gap, dtype, device):
    """Where t is at least max_gap from the data end, |t - s| / max_gap is uniform on [0, 1).

    20,000 draws with a fixed seed; tolerance: the KS distance from U[0, 1) stays below the
    alpha = 1e-6 critical value plus the relative resolution of t's dtype near the range.
    """
    assume(gap.hi - gap.lo >= gap.max_gap and gap.max_gap >= 0.05)
    n = 20_000
    gen = torch.Generator(device).manual_seed(SEED)
    span = gap.hi - gap.lo - gap.max_gap
    start = gap.lo + gap.max_gap if gap.noise_at == "hi" else gap.lo
    t = (start + span * torch.rand(n, generator=gen, device=device, dtype=torch.float64)).to(dtype)
    tt = f64(t)
    t = t[((tt >= gap.lo + gap.max_gap) if gap.noise_at == "hi" else (tt <= gap.hi - gap.max_gap)).to(t.device)]
    assume(t.numel() >= n // 2)
    r = toward_noise(gap, t, gap.sample(t, generator=gen)) / gap.max_gap
    assert r.min() >= 0 and r.max() < 1, (r.min(), r.max())
    resolution = 2 * torch.finfo(dtype).eps * max(abs(gap.lo), abs(gap.hi), 1.0) / gap.max_gap
    assert ks_uniform(r) < ks_critical(r.numel()) + resolution


@given(gaps(discrete=True, positive=True), st.sampled_from([torch.int64, torch.int32, torch.float32, torch.float16]),
       st.sampled_from(DEVICES))
def test_discrete_gap_uniform_away_from_boundary(gap, dtype, device):
    """Where t is at least max_gap - 1 steps from the data end, |t - s| is uniform on {0, ..., max_gap - 1}.

    20,000 draws with a fixed seed: every step count occurs, none outside, and the KS distance of
    (|t - s| + 1/2) / max_gap from U[0, 1) stays below 1/(2 max_gap) plus the alpha = 1e-6 critical value.
    """
    m = gap.max_gap
    first, last = (gap.lo + m - 1, gap.hi) if gap.noise_at == "hi" else (gap.lo, gap.hi - m + 1)
    assume(first <= last)
    n = 20_000
    gen = torch.Generator(device).manual_seed(SEED)
    t = torch.randint(int(first), int(last) + 1, (n,), generator=gen, device=device).to(dtype)
    k = toward_noise(gap, t, gap.sample(t, generator=gen))
    assert torch.equal(k.unique(), torch.arange(m, dtype=torch.float64)), k.unique()
    assert ks_uniform((k + 0.5) / m) < 0.5 / m + ks_critical(n)


@given(cases())
def test_zero_max_gap_gives_s_equal_t(case):
    """With max_gap = 0 the teacher sees the student's time: s == t."""
    gap, t, seed = case
    gap = NoiseGap(0, gap.lo, gap.hi, gap.discrete, gap.noise_at)
    assert torch.equal(sample(gap, t, seed), t)


@given(cases())
def test_s_equals_t_at_the_boundary(case):
    """At the data end of the range, or past it, s == t: t <= lo with noise_at="hi", t >= hi with "lo"."""
    gap, t, seed = case
    tt = f64(t)
    edge = tt <= gap.lo if gap.noise_at == "hi" else tt >= gap.hi
    s = sample(gap, t, seed)
    assert torch.equal(f64(s)[edge], tt[edge])


@given(cases())
def test_shape_dtype_device_follow_t(case):
    """s has the shape, dtype and device of t."""
    gap, t, seed = case
    s = sample(gap, t, seed)
    assert (s.shape, s.dtype, s.device) == (t.shape, t.dtype, t.device)


@given(cases(positive=True))
def test_same_seed_same_s(case):
    """Two generators with the same seed give the same s, whatever the global RNG does in between."""
    gap, t, seed = case
    first = sample(gap, t, seed)
    torch.rand(7, device=t.device)
    assert torch.equal(sample(gap, t, seed), first)


@given(st.floats(max_value=0, exclude_max=True, allow_infinity=False) | st.integers(max_value=-1), st.booleans())
def test_negative_max_gap_raises(max_gap, discrete):
    """max_gap < 0 raises ValueError naming max_gap."""
    with pytest.raises(ValueError, match="max_gap"):
        NoiseGap(max_gap=max_gap, discrete=discrete)


@given(st.floats(-1e6, 1e6), st.floats(0, 1e6, exclude_min=True), st.booleans())
def test_lo_above_hi_raises(hi, excess, discrete):
    """lo > hi raises ValueError naming lo and hi."""
    lo = hi + excess
    assume(lo > hi)
    with pytest.raises(ValueError, match=r"lo=.*hi="):
        NoiseGap(max_gap=0, lo=lo, hi=hi, discrete=discrete)


@given(st.text(max_size=8).filter(lambda s: s not in ("hi", "lo")))
def test_unknown_noise_at_raises(noise_at):
    """noise_at other than "hi" / "lo" raises ValueError naming noise_at."""
    with pytest.raises(ValueError, match="noise_at"):
        NoiseGap(noise_at=noise_at)


# --------------------------------------------------------------------------------------------- paths
CONTINUOUS_PATHS = [LinearPath("hi"), LinearPath("lo"), CosinePath("hi"), CosinePath("lo")]


@st.composite
def signals(draw, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, noise), float32 or float64, shape (B, 3)."""
    dtype = draw(st.sampled_from(["float32", "float64"]))
    batch = draw(st.integers(1, 4)) if batch is None else batch
    elements = st.floats(-1e3, 1e3, width=32)
    x0, noise = (torch.from_numpy(draw(arrays(dtype, (batch, 3), elements=elements))) for _ in range(2))
    return x0, noise


@given(st.sampled_from(CONTINUOUS_PATHS), signals())
def test_path_ends(path, xs):
    """At the data end the path returns x0 exactly, at the noise end the noise exactly."""
    x0, noise = xs
    data_end, noise_end = (0.0, 1.0) if path.noise_at == "hi" else (1.0, 0.0)
    batch = x0.shape[0]
    assert torch.equal(path(x0, noise, torch.full((batch,), data_end)), x0)
    assert torch.equal(path(x0, noise, torch.full((batch,), noise_end)), noise)


@st.composite
def path_cases(draw):
    """A path, a matching NoiseGap on its time range, and per-sample t."""
    batch = draw(st.integers(1, 6))
    if draw(st.booleans()):
        path = draw(st.sampled_from(CONTINUOUS_PATHS))
        gap = NoiseGap(draw(st.floats(0, 1)), 0.0, 1.0, noise_at=path.noise_at)
        t = torch.tensor(draw(st.lists(st.floats(0, 1) | st.sampled_from([0.0, 1.0]), min_size=batch, max_size=batch)))
    else:
        steps = draw(st.integers(2, 1000))
        path = DDPMPath.linear(steps)
        gap = NoiseGap(draw(st.integers(0, steps)), 0, steps - 1, discrete=True)
        t = torch.tensor(draw(st.lists(st.integers(0, steps - 1), min_size=batch, max_size=batch)))
    return path, gap, t


@given(path_cases(), st.integers(0, 2**31), st.data())
def test_teacher_input_snr_not_below_student(case, seed, data):
    """From the same x0 and noise, x_s has a signal-to-noise ratio no lower than x_t's."""
    path, gap, t = case
    s = sample(gap, t, seed)
    x0, noise = data.draw(signals(batch=t.shape[0]))
    x_t, x_s = path.pair(x0, noise, t, s)
    assert torch.equal(x_t, path(x0, noise, t)) and torch.equal(x_s, path(x0, noise, s))
    assert (path.snr(s) >= path.snr(t)).all()


@given(gaps(discrete=False), st.sampled_from([torch.int32, torch.int64]))
def test_continuous_gap_on_integer_steps_raises(gap, dtype):
    """A continuous NoiseGap refuses integer t (its fractional gap would round back to s == t)."""
    with pytest.raises(TypeError, match="discrete=True"):
        gap.sample(torch.tensor([500, 600], dtype=dtype))
