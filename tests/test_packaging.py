"""`pip install .` ships `sra_plugin.adapters` (the `sra_plugin/adapters/` folder) and no top-level
`adapters`; a source checkout imports as it is, also when it shadows an installed copy."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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


@pytest.mark.slow
def test_source_checkout_imports_beside_an_installed_copy(tmp_path):
    """With a regular install, running a script from the repository root (``python benchmarks/overhead.py``)
    imports ``sra_plugin/`` and its adapters from the checkout, not from the installed copy."""
    site, checkout = tmp_path / "site", tmp_path / "checkout"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(site), str(ROOT)],
        check=True, cwd=tmp_path, capture_output=True,
    )
    shutil.copytree(ROOT / "sra_plugin", checkout / "sra_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import sra_plugin, sra_plugin.adapters.dit as dit; from sra_plugin import registered_adapters; "
             "print(sra_plugin.__file__); print(dit.__file__); print(len(registered_adapters()))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, cwd=checkout, capture_output=True, text=True,
                         env={"PYTHONPATH": f"{checkout}:{site}", "PATH": ""})
    init, dit_file, count = out.stdout.split()
    assert init.startswith(str(checkout / "sra_plugin")) and dit_file.startswith(str(checkout / "sra_plugin" / "adapters"))
    assert int(count) >= 5


@pytest.mark.slow
def test_built_wheel_installs_and_runs_the_lora_example(tmp_path):
    """The wheel that ``pip wheel`` / ``python -m build`` makes, installed into a fresh venv, runs
    examples/finetune_lora.py from a folder outside the checkout (so only the installed package can import)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "sra_plugin", src / "sra_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                   check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = dist.glob("sra_plugin-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # The venv sees this interpreter's torch, diffusers and peft (not its .pth files, so not an editable
    # sra_plugin); its own site-packages comes first on sys.path.
    outer = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(purelib) / "outer_site.pth").write_text("\n".join(outer) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ROOT / "examples" / "finetune_lora.py", run / "finetune_lora.py")
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    where = subprocess.run([str(python), "-c", "import sra_plugin, sra_plugin.adapters.diffusers; print(sra_plugin.__file__)"],
                           check=True, cwd=run, env=env, capture_output=True, text=True).stdout.strip()
    assert where.startswith(purelib), where
    proc = subprocess.run([str(python), "finetune_lora.py", "--steps", "3", "--batch-size", "2"],
                          cwd=run, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "adapter='diffusers-flux'" in proc.stdout and "no SRA key, no hook" in proc.stdout
