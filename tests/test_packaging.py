"""`pip install .` ships `sra_plugin.adapters` (from the `adapters/` folder) and no top-level `adapters`;
a source checkout imports as it is, also when it shadows an installed copy."""

import shutil
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


def test_source_checkout_imports_beside_an_installed_copy(tmp_path):
    """With a regular install, running a script from the repository root (``python benchmarks/overhead.py``)
    imports ``sra_plugin/`` from the checkout, which has no ``adapters`` subfolder: it must load ``adapters/``."""
    site, checkout = tmp_path / "site", tmp_path / "checkout"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(site), str(ROOT)],
        check=True, cwd=tmp_path, capture_output=True,
    )
    for folder in ("sra_plugin", "adapters"):
        shutil.copytree(ROOT / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import sra_plugin, sra_plugin.adapters.dit as dit; from sra_plugin import registered_adapters; "
             "print(sra_plugin.__file__); print(dit.__file__); print(len(registered_adapters()))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, cwd=checkout, capture_output=True, text=True,
                         env={"PYTHONPATH": f"{checkout}:{site}", "PATH": ""})
    init, dit_file, count = out.stdout.split()
    assert init.startswith(str(checkout / "sra_plugin")) and dit_file.startswith(str(checkout / "adapters"))
    assert int(count) >= 5
