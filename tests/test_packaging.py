"""`pip install .` ships `sra_plugin.adapters` (from the `adapters/` folder) and no top-level `adapters`."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_adapters_as_a_subpackage(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(ROOT)],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    assert (target / "sra_plugin" / "adapters" / "__init__.py").exists()
    assert (target / "sra_plugin" / "py.typed").exists()
    assert not (target / "adapters").exists()
    probe = "import sra_plugin, sra_plugin.adapters; print(sra_plugin.adapters.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], check=True, cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": ""})
    assert out.stdout.strip().startswith(str(target))
