"""sra_plugin.report: linear CKA, the per-pair matrix on a tiny model, the probe, the heatmap and the CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sra_plugin import register_adapter
from sra_plugin.report import block_features, cka_matrix, layer_report, linear_cka, main, ridge_probe
from tests._models import TINY, randomise_gates, tiny_sit


def hsic_cka_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """CKA written the other way: HSIC of the linear Gram matrices with the centring matrix H,
    HSIC(K, L) = tr(K H L H) / (n - 1)^2, CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h)) / (n - 1) ** 2

    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def _random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_cka_of_a_matrix_with_itself_is_one() -> None:
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_maps_scaling_and_shifts() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(80, 6, generator=gen, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(6, 9, generator=gen, dtype=torch.float64)) + 0.3 * torch.randn(80, 9, generator=gen, dtype=torch.float64)
    base = linear_cka(x, y)
    assert 0.05 < base < 0.99  # a real, intermediate value, so invariance is not trivially 1 == 1
    q = _random_orthogonal(9, 2)
    assert linear_cka(x, y @ q) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x @ _random_orthogonal(6, 3), y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(3.7 * x, 0.01 * y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x + 5.0, y - 2.0) == pytest.approx(base, rel=1e-10)  # features are centred
    # ...but not to an anisotropic scaling of the features: CKA is not CCA.
    assert linear_cka(x * torch.tensor([10.0, 1, 1, 1, 1, 0.1], dtype=torch.float64), y) != pytest.approx(base, rel=1e-3)


def test_cka_matches_the_hsic_formula() -> None:
    rng = np.random.default_rng(4)
    for d1, d2 in ((3, 3), (5, 12), (20, 2)):
        x = rng.normal(size=(40, d1))
        y = x[:, :1] @ rng.normal(size=(1, d2)) + rng.normal(size=(40, d2))
        assert linear_cka(x, y) == pytest.approx(hsic_cka_numpy(x, y), rel=1e-9)
        # Without centring the value would differ: a shifted copy still agrees with the formula.
        assert linear_cka(x + 3.0, y) == pytest.approx(hsic_cka_numpy(x + 3.0, y), rel=1e-9)
    independent = linear_cka(rng.normal(size=(4000, 3)), rng.normal(size=(4000, 3)))
    assert independent < 0.01  # unrelated features: near 0


def test_cka_matrix_entries_are_pairwise_cka() -> None:
    gen = torch.Generator().manual_seed(5)
    a = [torch.randn(30, 4, generator=gen) for _ in range(3)]
    b = [a[0] @ torch.randn(4, 5, generator=gen), torch.randn(30, 2, generator=gen)]
    m = cka_matrix(a, b)
    assert m.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            assert m[i, j] == pytest.approx(linear_cka(a[i], b[j]), rel=1e-12)


def test_cka_rejects_mismatched_samples() -> None:
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match=r"\(samples, features\)"):
        linear_cka(torch.randn(5, 2, 2), torch.randn(5, 2))


def _tiny_batches(model, n: int = 48, batch: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n // batch):
        x0 = torch.randn(batch, TINY["in_channels"], TINY["input_size"], TINY["input_size"], generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        t, s = torch.full((batch,), 0.6), torch.full((batch,), 0.4)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        x_s = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        y = torch.randint(0, TINY["num_classes"], (batch,), generator=gen)
        out.append((x_t, x_s, t, s, y))
    return out


def tiny_model(seed: int = 0):
    # adaLN-zero blocks start as identities: strong random gates make every block change the tokens.
    return randomise_gates(tiny_sit(seed, depth=5), std=0.5)


@pytest.fixture
def tiny():
    return tiny_model()


def test_report_matrix_shape_and_diagonal_on_a_tiny_model(tiny) -> None:
    batches = _tiny_batches(tiny)
    same = [(x_t, x_t, t, t, y) for x_t, _, t, _, y in batches]
    rep = layer_report(tiny, same)  # teacher = the model itself on the same input: diagonal is exactly 1
    assert rep.cka.shape == (5, 5) and rep.n_images == 48
    np.testing.assert_allclose(np.diag(rep.cka), 1.0, atol=1e-9)
    assert np.all((rep.cka > 0) & (rep.cka <= 1 + 1e-9))
    np.testing.assert_allclose(rep.cka, rep.cka.T, atol=1e-9)  # same features on both sides: symmetric
    assert tiny.training  # the mode is restored


def test_report_reads_the_blocks_the_adapter_names(tiny) -> None:
    batches = _tiny_batches(tiny)
    feats, mean = block_features(tiny, [(b[0], b[2], (b[4],), {}) for b in batches])
    # Block 3's features by hand: hook blocks[2] directly and mean-pool its output.
    seen = []
    h = tiny.blocks[2].register_forward_hook(lambda m, a, o: seen.append(o.mean(1)))
    tiny.eval()
    with torch.no_grad():
        for x_t, _, t, _, y in batches:
            tiny(x_t, t, y)
    h.remove()
    torch.testing.assert_close(feats[2], torch.cat(seen))
    assert len(feats) == 5 and feats is not None and mean[2].shape == (48, TINY['hidden_size'])


def test_report_with_an_ema_teacher_differs_from_self(tiny) -> None:
    batches = _tiny_batches(tiny)
    other = tiny_model(seed=1)
    other.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        for p in other.blocks[4].parameters():
            p.add_(torch.randn_like(p))  # only the last block differs
    own = layer_report(tiny, batches)
    vs_other = layer_report(tiny, batches, teacher=other)
    np.testing.assert_allclose(own.cka[:, :4], vs_other.cka[:, :4], atol=1e-9)
    assert np.abs(own.cka[:, 4] - vs_other.cka[:, 4]).max() > 1e-3


def test_report_tokens_pooling(tiny) -> None:
    batches = _tiny_batches(tiny)
    rep = layer_report(tiny, batches, pool="tokens", tokens_per_image=4)
    assert rep.cka.shape == (5, 5) and rep.pool == "tokens"
    feats, _ = block_features(tiny, [(b[0], b[2], (b[4],), {}) for b in batches], pool="tokens", tokens_per_image=4)
    assert feats[0].shape == (48 * 4, TINY['hidden_size'])
    assert not np.allclose(rep.cka, layer_report(tiny, batches).cka)  # a different quantity than mean-pooled
    with pytest.raises(ValueError, match="pool='max'"):
        layer_report(tiny, batches, pool="max")


def test_ridge_probe_reads_a_linear_signal_and_not_noise() -> None:
    gen = torch.Generator().manual_seed(6)
    y = torch.randint(0, 4, (400,), generator=gen)
    centres = torch.randn(4, 10, generator=gen) * 3
    x = centres[y] + torch.randn(400, 10, generator=gen)
    assert ridge_probe(x, y) > 0.9
    assert ridge_probe(torch.randn(400, 10, generator=gen), y) < 0.45  # chance is 0.25
    with pytest.raises(ValueError, match="labels"):
        ridge_probe(x, y[:-1])


def test_report_probe_table_and_ranking(tiny, tmp_path: Path) -> None:
    batches = _tiny_batches(tiny)
    labels = torch.cat([b[4] for b in batches])
    rep = layer_report(tiny, batches, labels=labels, student_layer=2, teacher_layer=4)
    assert rep.student_probe.shape == (5,) and rep.teacher_probe.shape == (5,)
    assert np.all((rep.student_probe >= 0) & (rep.student_probe <= 1))
    ranked = rep.ranked_pairs()
    assert len(ranked) == 10 and all(j > i for i, j, _ in ranked)  # 5 blocks: 10 pairs with a later teacher
    assert [c for *_, c in ranked] == sorted((c for *_, c in ranked), reverse=True)
    assert ranked[rep.rank_of(2, 4) - 1][:2] == (2, 4)
    text = rep.table()
    assert "2->4" in text and "probe" in text and f"{rep.cka[1, 3]:.3f}*" in text
    d = rep.to_dict()
    assert d["default_pair"] == [2, 4] and d["default_pair_cka"] == pytest.approx(rep.cka[1, 3])
    png = rep.heatmap(tmp_path / "h.png")
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    assert img.shape[0] > 200 and img[..., :3].std() > 0.05
    with pytest.raises(ValueError, match="one label per image"):
        layer_report(tiny, batches, labels=labels[:-1])


def test_report_accepts_mappings_and_rejects_bad_batches(tiny) -> None:
    batches = _tiny_batches(tiny)
    as_dicts = [dict(x_t=b[0], x_s=b[1], t=b[2], s=b[3], args=(b[4],)) for b in batches]
    np.testing.assert_allclose(layer_report(tiny, as_dicts).cka, layer_report(tiny, batches).cka)
    with pytest.raises(ValueError, match="lacks"):
        layer_report(tiny, [dict(x_t=batches[0][0])])
    with pytest.raises(TypeError, match="batch 0"):
        layer_report(tiny, [batches[0][:2]])
    with pytest.raises(ValueError, match="empty"):
        layer_report(tiny, [])


def test_report_uses_a_registered_adapter_for_an_unknown_model() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = torch.nn.Linear(3, 8)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))

        def forward(self, x, t):
            h = self.inp(x) + t[:, None, None]
            for layer in self.layers:
                h = torch.tanh(layer(h))
            return h

    register_adapter("report-test-net", matches=Net, blocks="layers")
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(20, 6, 3)
    t = torch.rand(20)
    with pytest.warns(RuntimeWarning, match="only 20 images|the ranking means nothing"):  # 20 images of a random net
        rep = layer_report(net, [(x, x, t, t)])
    assert rep.cka.shape == (3, 3)
    np.testing.assert_allclose(np.diag(rep.cka), 1.0, atol=1e-9)


def test_report_command_line(tiny, tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "run.pt"
    ema = tiny_model(seed=1)
    ema.load_state_dict(tiny.state_dict())
    torch.save({"model": tiny.state_dict(), "ema": ema.state_dict()}, ckpt)
    gen = torch.Generator().manual_seed(0)
    data = tmp_path / "data.pt"
    torch.save({"x0": torch.randn(40, TINY["in_channels"], 8, 8, generator=gen), "y": torch.randint(0, 10, (40,), generator=gen)}, data)
    png, js = tmp_path / "layers.png", tmp_path / "layers.json"
    rep = main([
        "--model", "examples.models:SiT", "--model-kwargs", json.dumps({**TINY, "depth": 5}), "--checkpoint", str(ckpt),
        "--state-key", "model", "--teacher-state-key", "ema", "--data", str(data), "--labels-key", "y",
        "--cond-value", "10", "--t", "0.5", "--s", "0.5", "--batch-size", "16", "--student-layer", "2",
        "--teacher-layer", "4", "--png", str(png), "--json", str(js),
    ])
    out = capsys.readouterr().out
    assert "linear CKA" in out and "2->4" in out and png.exists()
    saved = json.loads(js.read_text())
    assert np.array(saved["cka"]).shape == (5, 5)
    # Teacher = identical weights at the same time and noise: the diagonal is 1.
    np.testing.assert_allclose(np.diag(rep.cka), 1.0, atol=1e-9)
    assert len(saved["student_probe"]) == 5


@pytest.mark.slow
def test_report_imports_no_plotting_or_backbone_code() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = "import sys, sra_plugin.report; print(sorted(m for m in ('matplotlib', 'sklearn', 'examples') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    help_text = subprocess.run([sys.executable, "-m", "sra_plugin.report", "--help"], cwd=root, capture_output=True,
                               text=True, check=True).stdout
    assert "--teacher-state-key" in help_text and "--pool" in help_text
    import ast

    tree = ast.parse((root / "sra_plugin" / "report.py").read_text())
    for node in ast.walk(tree):  # drop docstrings: only the code counts
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node) is not None:
            node.body = node.body[1:] or [ast.Pass()]
    code = ast.unparse(tree)
    assert ("adapter.blocks(" in code or "resolve_blocks(" in code) and "adapter.forward(" in code  # blocks through the registry
    for word in (".blocks[", "x_embedder", "SiT", "DiT", "transformer_blocks"):  # no backbone knowledge
        assert word not in code, word


# ------------------------------------------------------------------ issue 19 (8, CLI) and issue 20 (1)
def song_unbiased_hsic_numpy(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, written out on the (n, n) Gram matrices with zeroed diagonals."""
    n = len(k)
    k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    return float(np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                 - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def test_debiased_cka_matches_the_unbiased_hsic_on_gram_matrices() -> None:
    from sra_plugin.report import debiased_cka

    rng = np.random.default_rng(7)
    for n, d1, d2 in ((5, 3, 4), (12, 7, 2), (40, 6, 9)):
        x = rng.normal(size=(n, d1))
        y = x[:, :1] @ rng.normal(size=(1, d2)) + rng.normal(size=(n, d2))
        xc, yc = x - x.mean(0), y - y.mean(0)
        k, l = xc @ xc.T, yc @ yc.T
        want = song_unbiased_hsic_numpy(k, l) / np.sqrt(song_unbiased_hsic_numpy(k, k) * song_unbiased_hsic_numpy(l, l))
        assert debiased_cka(x, y) == pytest.approx(want, rel=1e-9)
        assert debiased_cka(x + 4.0, 0.1 * y @ _random_orthogonal(d2, n).numpy()) == pytest.approx(want, rel=1e-9)


def test_debiased_cka_reads_independent_features_near_zero_at_8_images_and_identical_ones_as_one() -> None:
    from sra_plugin.report import debiased_cka

    biased, debiased = [], []
    for seed in range(100):
        gen = torch.Generator().manual_seed(seed)
        x, y = torch.randn(8, 64, generator=gen), torch.randn(8, 64, generator=gen)
        biased.append(linear_cka(x, y))
        debiased.append(debiased_cka(x, y))
        assert debiased_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert np.mean(biased) > 0.85  # what the report read before: unrelated features look alike
    assert abs(np.mean(debiased)) < 0.06  # sd of one draw is about 0.2 at n = 8: the mean of 100 is within 0.06
    with pytest.raises(ValueError, match="at least 4 samples, got 3"):
        debiased_cka(torch.randn(3, 2), torch.randn(3, 2))


def test_layer_report_uses_the_debiased_estimator_and_warns_below_32_images(tiny) -> None:
    from sra_plugin.report import FEW_IMAGES

    assert FEW_IMAGES == 32
    batches = _tiny_batches(tiny, n=8, batch=8)
    with pytest.warns(RuntimeWarning, match="the ranking means nothing"), pytest.warns(RuntimeWarning, match="only 8 images"):
        rep = layer_report(tiny, batches)
    feats_s, _ = block_features(tiny, [(b[0], b[2], (b[4],), {}) for b in batches])
    feats_t, _ = block_features(tiny, [(b[1], b[3], (b[4],), {}) for b in batches])
    np.testing.assert_allclose(rep.cka, cka_matrix(feats_s, feats_t, "debiased"), atol=1e-12)
    assert not np.allclose(rep.cka, cka_matrix(feats_s, feats_t))  # not the biased one
    assert rep.estimator == "debiased" and "only 8 images" in rep.table() and rep.to_dict()["estimator"] == "debiased"
    biased = layer_report(tiny, _tiny_batches(tiny), estimator="biased")
    assert biased.estimator == "biased"
    with pytest.raises(ValueError, match="estimator='unbiased' is not accepted"):
        layer_report(tiny, batches, estimator="unbiased")


def test_report_says_the_ranking_means_nothing_on_an_untrained_model() -> None:
    """adaLN-zero blocks start as identities: every pair scores the same, and the report says so."""
    untrained = tiny_sit(0, depth=5)
    batches = _tiny_batches(untrained)
    with pytest.warns(RuntimeWarning, match="the ranking means nothing"):
        rep = layer_report(untrained, batches, student_layer=2, teacher_layer=4)
    assert rep.ranking_is_flat and "the ranking means nothing" in rep.table() and rep.to_dict()["ranking_is_flat"]
    trained_like = layer_report(tiny_model(), batches)
    assert not trained_like.ranking_is_flat and "means nothing" not in trained_like.table()


def _dit_data(tmp_path: Path, n: int = 40) -> Path:
    gen = torch.Generator().manual_seed(0)
    data = tmp_path / "images.pt"
    torch.save({"x0": torch.randn(n, TINY["in_channels"], 8, 8, generator=gen), "y": torch.randint(0, 10, (n,), generator=gen)}, data)
    return data


def readme_command(tmp_path: Path) -> list[str]:
    """docs/layers.md, "From the command line", on the reference DiT (class-conditional), untrained."""
    return ["--model", "examples.models:DiT", "--model-kwargs", json.dumps(TINY), "--data", str(_dit_data(tmp_path)),
            "--labels-key", "y", "--t", "0.5", "--s", "0.4", "--png", str(tmp_path / "layers.png")]


def test_report_command_on_a_class_conditional_model_names_the_conditioning_flags(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(readme_command(tmp_path))
    err = capsys.readouterr().err
    assert "missing 1 required positional argument: 'y'" in err and "--cond-key" in err and "--cond-value" in err


@pytest.mark.slow
def test_report_command_on_a_class_conditional_model_with_its_labels(tmp_path: Path, capsys) -> None:
    with pytest.warns(RuntimeWarning, match="means nothing"):
        rep = main([*readme_command(tmp_path), "--cond-key", "y", "--time", "ddpm"])
    out = capsys.readouterr().out
    assert rep.cka.shape == (TINY["depth"],) * 2 and "the ranking means nothing" in out  # untrained: identity blocks
    with pytest.warns(RuntimeWarning):
        null = main([*readme_command(tmp_path), "--cond-value", "10", "--time", "ddpm"])
    assert null.n_images == 40


@pytest.mark.parametrize("args, words", [
    (["--cond-kwarg", "y=labels"], ["--cond-kwarg: key 'labels' is not in --data", "'x0'", "'y'"]),
    (["--cond-kwarg", "y=x0@3"], ["is not per image along axis 3"]),
    (["--cond-kwarg", "not a name=y"], ["--cond-kwarg 'not a name=y' is not accepted", "NAME=KEY[@AXIS]"]),
    (["--time", "ddpm", "--t", "500"], ["--t 500.0 is not accepted", "noise level in [0, 1]"]),
    (["--time", "ddpm", "--path", "cosine"], ["--path is not used with --time ddpm"]),
])
def test_report_command_line_misuse_is_named(tmp_path: Path, capsys, args: list[str], words: list[str]) -> None:
    with pytest.raises(SystemExit):
        main([*readme_command(tmp_path), *args])
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err


def family_model(name: str) -> torch.nn.Module:
    """A factory for ``--model``: the tiny random model of tests/test_diffusers_families.py."""
    from tests.test_diffusers_families import CASES

    return CASES[name].build()


FAMILY_TIME = {"dit": "ddpm", "pixart": "ddpm"}  # diffusers DiT / PixArt take DDPM steps; the rest: sigma, x1000 or not
IMAGE_AXIS = {"encoder_hidden_states_llama3": 1}  # HiDream's Llama states are (layers, B, T, D)
SHARED = ("img_ids", "txt_ids")  # one row per token, the same for every image


def family_names() -> list[str]:
    from tests.test_diffusers_families import CASES

    return list(CASES)


@pytest.mark.parametrize("name", family_names())
def test_report_command_line_on_every_diffusers_family(name: str, tmp_path: Path) -> None:
    """The CLI passes the conditioning by keyword and the time in the model's convention; its matrix is
    layer_report's on batches built by hand from the same latents, noise and conditioning."""
    from tests.test_diffusers_families import B, CASES

    from sra_plugin.noise import DDPMPath, LinearPath

    case, n, batch = CASES[name], 8, 4
    draws = [case.cond(torch.Generator().manual_seed(k)) for k in range(n // B)]
    per_image, shared = {}, {}
    for key, value in draws[0].items():
        if key in SHARED or not isinstance(value, (torch.Tensor, list)):
            shared[key] = value
        elif isinstance(value, torch.Tensor):
            axis = IMAGE_AXIS.get(key, 0)
            per_image[key] = (torch.cat([d[key] for d in draws], axis), axis)
        else:
            per_image[key] = ([v for d in draws for v in d[key]], 0)
    x0 = torch.randn(n, *case.x, generator=torch.Generator().manual_seed(9))
    data = tmp_path / "data.pt"
    torch.save({"x0": x0, **{k: v for k, (v, _) in per_image.items()}, **shared}, data)
    time = FAMILY_TIME.get(name, "sigma1000" if case.t_scale == 1000.0 else "unit")
    argv = ["--model", "tests.test_report:family_model", "--model-kwargs", json.dumps({"name": name}), "--data", str(data),
            "--images", str(n), "--batch-size", str(batch), "--time", time, "--png", str(tmp_path / "l.png")]
    argv += [f"--cond-kwarg={k}={k}@{axis}" for k, (_, axis) in per_image.items()] + [f"--shared-kwarg={k}" for k in shared]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few images: the report says so
        rep = main(argv)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        by_hand = []
        for lo in range(0, n, batch):
            sl = slice(lo, lo + batch)
            if time == "ddpm":
                steps = {v: torch.full((batch,), int(1000 * v)) for v in (0.5, 0.4)}
                x_t, x_s = (DDPMPath.linear()(x0[sl], noise[sl], steps[v]) for v in (0.5, 0.4))
                t, s = steps[0.5], steps[0.4]
            else:
                x_t, x_s = (LinearPath()(x0[sl], noise[sl], torch.full((batch,), v)) for v in (0.5, 0.4))
                t, s = (torch.full((batch,), v * case.t_scale) for v in (0.5, 0.4))
            kwargs = {**shared, **{k: (v.narrow(a, lo, batch) if isinstance(v, torch.Tensor) else v[sl]) for k, (v, a) in per_image.items()}}
            by_hand.append({"x_t": x_t, "x_s": x_s, "t": t, "s": s, "kwargs": kwargs})
        want = layer_report(family_model(name), by_hand)
    assert rep.cka.shape == (case.depth, case.depth) and np.isfinite(rep.cka).all()
    np.testing.assert_allclose(rep.cka, want.cka, rtol=1e-6, atol=1e-9)


def test_report_command_line_takes_a_dotted_factory_such_as_a_classmethod(tmp_path: Path, capsys) -> None:
    """``--model package:Class.from_config`` (or ``.from_pretrained``): how a diffusers model is built, no wrapper module."""
    from tests.test_diffusers_families import CASES

    gen = torch.Generator().manual_seed(0)
    n, text = 8, 5
    data = tmp_path / "sd3.pt"
    torch.save({"x0": torch.randn(n, 4, 8, 8, generator=gen), "prompt_embeds": torch.randn(n, text, 16, generator=gen),
                "pooled": torch.randn(n, 8, generator=gen)}, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = main(["--model", "diffusers:SD3Transformer2DModel.from_config", "--model-kwargs", json.dumps({"config": CASES["sd3"].config}),
                    "--data", str(data), "--cond-kwarg", "encoder_hidden_states=prompt_embeds", "--cond-kwarg", "pooled_projections=pooled",
                    "--time", "sigma1000", "--png", str(tmp_path / "l.png")])
    assert rep.cka.shape == (3, 3) and "linear CKA" in capsys.readouterr().out
