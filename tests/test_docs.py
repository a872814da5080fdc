"""The documentation: the MkDocs site builds with ``--strict`` (no broken link or anchor, no docstring
griffe cannot read), every public name has an API entry, the README stays short and true to the code,
and the REPA snippet runs as written."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

import sra_plugin

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def test_docs_build_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict`` from the repository root, as a contributor or CI runs it."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    api = (site / "api" / "objectives" / "index.html").read_text()
    assert "SelfRepresentationAlignment" in api and "update_teacher" in api  # rendered from the docstrings
    assert (site / "assets" / "evidence3" / "scratch_samples_seed0.png").stat().st_size > 10_000  # the image, not a link


def api_directives() -> list[str]:
    return [m.group(1) for page in sorted((DOCS / "api").glob("*.md"))
            for m in re.finditer(r"^::: *([\w.]+)", page.read_text(), flags=re.M)]


def test_every_public_name_has_an_api_entry() -> None:
    """A new name in ``sra_plugin.__all__`` without a ``:::`` entry in docs/api/ fails here."""
    targets = api_directives()
    assert targets
    missing = [name for name in sra_plugin.__all__
               if not any(t == f"sra_plugin.{name}" or (t.startswith("sra_plugin.") and t.endswith(f".{name}")) for t in targets)]
    assert not missing, f"no ::: entry in docs/api/*.md for {missing}"
    for module in ("sra_plugin.schedules", "sra_plugin.noise"):
        assert module in targets


def test_readme_is_short() -> None:
    assert len(README.read_bytes()) <= 20_000


def test_readme_opens_with_the_two_commands_cpu_torch_first() -> None:
    first = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    # The CPU-only torch step is a comment before the install (a machine without pytorch.org's index, or
    # with a GPU, runs the commands as written), and it comes first.
    cpu = next(i for i, line in enumerate(first) if "pip install torch --index-url https://download.pytorch.org/whl/cpu" in line)
    dev = next(i for i, line in enumerate(first) if line.startswith('pip install -e ".[dev]"'))
    assert cpu < dev and first[cpu].lstrip().startswith("#")
    commands = [line.split("#", 1)[0].strip() for line in first]
    assert "python examples/train_digits.py" in commands[dev]
    assert [c for c in commands if c][-1] == "python -m pytest -q"


def _slug(heading: str) -> str:
    """Python-Markdown's toc slugify (the anchors MkDocs makes; GitHub's agree for these headings)."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def test_readme_and_docs_links_resolve() -> None:
    """Relative links (GitHub follows them) point at files that exist, and anchors into docs pages exist."""
    pages = [README, *DOCS.rglob("*.md")]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve()
            assert file.exists(), f"{page.relative_to(ROOT)} links to {target}"
            if anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
                slugs = {_slug(h) for h in headings}
                assert anchor in slugs, f"{page.relative_to(ROOT)} links to {target}: no such heading"


def _g(x: float) -> str:
    return f"{x:g}"


def test_readme_methods_table_states_the_codes_defaults() -> None:
    """The README's table of methods against the constructors' signatures and recipes."""
    import inspect

    from sra_plugin import alignment, dispersive, layersync

    rows = {}
    for line in README.read_text().split("## The methods", 1)[1].split("\n## ", 1)[0].splitlines():
        name = re.match(r"\| \[`(\w+)`\]", line)
        if name:
            rows[name.group(1)] = line
    assert set(rows) == {"SelfRepresentationAlignment", "LatentAlignment", "LayerSync", "Dispersive", "REPA", "IREPA", "SRADTS"}

    def default(cls, name):
        return inspect.signature(cls).parameters[name].default

    sra = sra_plugin.SelfRepresentationAlignment
    expect = {"SelfRepresentationAlignment": [
        f"blocks {_g(default(sra, 'student_layer'))} → {_g(default(sra, 'teacher_layer'))}",
        f"EMA teacher {_g(default(sra, 'ema_decay'))}",
        *(f'`recipe="{r}"`: `{v["loss"]}`' + (" (β 0.05)" if v["loss"] == "smooth_l1" else "") + f" × {_g(v['weight'])}"
          for r, v in alignment.RECIPES.items()),
    ]}
    assert default(sra, "recipe") == "paper"
    la = sra_plugin.LatentAlignment
    expect["LatentAlignment"] = [f"block {_g(default(la, 'layer'))}", f"`{default(la, 'loss')}` × {_g(default(la, 'weight'))}"]
    ls = sra_plugin.LayerSync
    expect["LayerSync"] = [
        f"blocks {_g(default(ls, 'student_layer'))} → {_g(default(ls, 'target_layer'))}", f"`{default(ls, 'loss')}` (1 − cos)",
        *(f'`recipe="{r}"`: × {_g(v["weight"])}, ' + ("target detached" if v["detach_target"] else "not detached")
          for r, v in layersync.RECIPES.items()),
    ]
    expect["Dispersive"] = [
        f'`recipe="{r}"`: ' + ("last block" if v["layer"] == -1 else f"block {_g(v['layer'])}")
        + f", τ {_g(v['temperature'])}, × {_g(v['weight'])}" for r, v in dispersive.RECIPES.items()
    ]
    assert default(sra_plugin.Dispersive, "recipe") == "release" and dispersive.RECIPES["release"]["weight"] == 0.25
    repa = sra_plugin.REPA
    expect["REPA"] = [f"block {_g(default(repa, 'layer'))}", f"projector {default(repa, 'projector_dim')}",
                      f"`{default(repa, 'loss')}` (1 − cos) × {_g(default(repa, 'weight'))}"]
    irepa = sra_plugin.IREPA
    expect["IREPA"] = [f"block {_g(default(irepa, 'layer'))}", f"`Conv2d` {default(irepa, 'kernel_size')}x{default(irepa, 'kernel_size')}",
                       f"× {_g(default(irepa, 'weight'))}"]
    dts = sra_plugin.SRADTS
    assert default(dts, "teacher_layer") == pytest.approx(2 / 3)
    expect["SRADTS"] = [f"blocks {_g(default(dts, 'student_layer'))} → 2/3", f"groups {_g(default(dts, 'mask_ratio'))}",
                        f"max gap {_g(default(dts, 'max_gap'))}", f"`{default(dts, 'loss')}` × {_g(default(dts, 'weight'))}",
                        f"EMA {_g(default(dts, 'ema_decay'))}"]
    for name, facts in expect.items():
        for fact in facts:
            assert fact in rows[name], f"README's {name} row does not say {fact!r}: {rows[name]}"


def test_repa_snippet_runs_as_written() -> None:
    """docs/methods/repa.md's snippet, unchanged, with a random timm DINOv2 (as it builds it) and a small SiT."""
    pytest.importorskip("timm")
    from examples.models import SiT

    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "methods" / "repa.md").read_text(), flags=re.S)
    snippet = next(b for b in blocks if "vit_base_patch14_dinov2" in b)
    assert 'timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224)' in snippet
    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10)
    batch = 2
    scope = {"model": model, "x_t": torch.randn(batch, 1, 8, 8), "t": torch.rand(batch), "y": torch.randint(0, 10, (batch,)),
             "diff_loss": torch.zeros(()), "images": torch.randn(batch, 3, 224, 224)}
    exec(compile(snippet, str(DOCS / "methods" / "repa.md"), "exec"), scope)
    loss, repa = scope["loss"], scope["repa"]
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 0
    loss.backward()
    scope["opt"].step()
    assert repa.metrics["student_reruns"] == 0  # the snippet's own forward fed the objective
    assert all(p.grad is not None for p in repa.parameters())
    assert all(p.grad is None for p in repa.encoder.parameters())  # the encoder stays frozen
