"""Suite-wide test settings.

Hypothesis profiles (pick one with ``SRA_HYPOTHESIS_PROFILE``):

- ``ci`` (default): derandomized, no deadline, no example database, 40 examples per property;
  the same examples on every run, so CI is reproducible and fast.
- ``deep``: random, no deadline, 1000 examples per property; for runs before a release, e.g.
  ``SRA_HYPOTHESIS_PROFILE=deep python -m pytest tests/test_noise_properties.py``.
- ``dev``: random, 100 examples, with the example database, for local work.
- ``mutants``: ``ci`` without shrinking, used by ``tests/broken_noisegap.py``.

``--broken-noisegap=NAME`` (or ``SRA_BROKEN_NOISEGAP=NAME``) replaces ``NoiseGap.sample`` with one of
the deliberately wrong versions in ``tests/broken_noisegap.py``, to show the property tests catch it;
``python tests/broken_noisegap.py`` runs them all.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile(
    "ci", max_examples=40, derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=_QUIET,
)
settings.register_profile("deep", max_examples=1000, deadline=None, print_blob=True, suppress_health_check=_QUIET)
settings.register_profile("dev", max_examples=100, deadline=None, print_blob=True)
# The ci examples without shrinking, for tests/broken_noisegap.py (only whether a test fails matters).
settings.register_profile("mutants", settings.get_profile("ci"), phases=[Phase.explicit, Phase.generate])
settings.load_profile(os.environ.get("SRA_HYPOTHESIS_PROFILE", "ci"))

# The test models are tiny: on a shared, busy machine several intra-op threads mostly wait on each
# other (a tiny SiT forward took 30x longer with 2 threads than with 1 under load).
torch.set_num_threads(int(os.environ.get("SRA_TEST_THREADS", "1")))


def _broken_versions() -> dict:
    path = Path(__file__).with_name("broken_noisegap.py")
    spec = importlib.util.spec_from_file_location("_sra_broken_noisegap", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BROKEN


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--broken-noisegap",
        default=os.environ.get("SRA_BROKEN_NOISEGAP") or None,
        help="replace NoiseGap.sample with a deliberately wrong version from tests/broken_noisegap.py "
        "(to check that the property tests fail)",
    )


def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("--broken-noisegap")
    if not name:
        return
    broken = _broken_versions()
    if name not in broken:
        raise pytest.UsageError(f"--broken-noisegap={name!r} is not accepted: use one of {', '.join(broken)}")
    from sra_plugin.noise import NoiseGap

    NoiseGap.sample = broken[name]


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"hypothesis profile: {settings.get_current_profile_name()}"]
    name = config.getoption("--broken-noisegap")
    if name:
        lines.append(f"NoiseGap.sample replaced by the broken version {name!r}")
    return lines


@pytest.fixture(autouse=True)
def clean_registry():
    """Every test leaves the adapter registry as it found it (an adapter one test registers would
    otherwise show up in another's view of the built-in registry)."""
    from sra_plugin import registry

    saved = list(registry._REGISTRY)
    yield
    registry._REGISTRY[:] = saved
