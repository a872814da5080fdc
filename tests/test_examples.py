"""The examples and the quality benchmark, each in a very short mode with a tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import digits as D
from tests._models import GLOO_EXIT_ABORT, free_port, torchrun

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data() -> D.Digits:
    return D.load_digits_16()


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _finite_numbers(obj) -> list[float]:
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _finite_numbers(x)]
    if isinstance(obj, float):
        return [obj]
    return []


def test_digits_data(data: D.Digits) -> None:
    assert data.x_train.shape == (1437, 1, 16, 16) and data.x_test.shape == (360, 1, 16, 16)
    assert data.x_train.min() >= -1 and data.x_train.max() <= 1 and data.x_train.max() > 0.9
    assert sorted(torch.bincount(data.y_test).tolist())[0] >= 35  # stratified: every digit held out
    again = D.load_digits_16()
    assert torch.equal(again.x_test, data.x_test)  # the split is fixed


@pytest.mark.slow
def test_train_digits_writes_pictures_and_metrics(tmp_path: Path, keep_threads) -> None:
    from examples import train_digits

    out = tmp_path / "demo"
    metrics = train_digits.main([
        "--steps", "4", "--model-size", "tiny", "--sample-steps", "2", "--per-class", "2",
        "--no-classifier", "--quiet", "--out", str(out),
    ])
    import matplotlib.image as mpimg

    for name in ("samples.png", "loss_curves.png"):
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300
        assert img[..., :3].std() > 0.05  # not a blank canvas
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["runs"].keys() == {"without SRA", "with SRA"} == metrics["runs"].keys()
    assert saved["config"]["student_layer"] == 2 and saved["config"]["teacher_layer"] == 4
    sra_run, plain = saved["runs"]["with SRA"], saved["runs"]["without SRA"]
    assert "align_loss_last10pct" in sra_run and "align_loss_last10pct" not in plain
    assert 0.0 <= sra_run["probe_accuracy_block2_t0.5"] <= 1.0
    assert all(math.isfinite(v) for v in _finite_numbers(saved["runs"]))


def test_train_digits_rejects_bad_flags(capsys) -> None:
    from examples import train_digits

    for argv, word in ((["--steps", "0"], "--steps"), (["--model-size", "huge"], "--model-size"),
                       (["--ema-decay", "1.5"], "--ema-decay"), (["--loss", "dot"], "--loss")):
        with pytest.raises(SystemExit):
            train_digits.parse_args(argv)
        assert word in capsys.readouterr().err


def test_train_config_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="teacher_layer"):
        D.TrainConfig(model_size="tiny", student_layer=4, teacher_layer=2)
    with pytest.raises(ValueError, match="student_layer=9"):
        D.TrainConfig(model_size="tiny", student_layer=9, teacher_layer=10)
    with pytest.raises(ValueError, match="model_size='huge'"):
        D.TrainConfig(model_size="huge")
    with pytest.raises(ValueError, match="device='nope'"):
        D.check_device("nope")


def test_runs_from_one_seed_differ_only_by_the_sra_term(data: D.Digits) -> None:
    cfg = dict(steps=3, model_size="tiny", batch_size=8, seed=3)
    plain = D.train(D.TrainConfig(**cfg), data, use_sra=False, progress=False)
    zero = D.train(D.TrainConfig(**cfg, weight=0.0), data, use_sra=True, progress=False)
    with_sra = D.train(D.TrainConfig(**cfg), data, use_sra=True, progress=False)
    assert plain.diff_loss[0] == zero.diff_loss[0] == with_sra.diff_loss[0]  # same init and first batch
    # With a zero SRA weight the whole trajectory, EMA included, is the plain run's.
    for a, b in zip(plain.ema.state_dict().values(), zero.ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert plain.diff_loss[1:] != with_sra.diff_loss[1:]  # and the SRA term does change it
    assert len(with_sra.align_loss) == 3 and not plain.align_loss


def test_euler_sampler_shapes_range_and_determinism() -> None:
    torch.manual_seed(0)
    model = D.build_sit("tiny")
    for p in model.parameters():  # adaLN-zero starts at a zero output: give it something to integrate
        torch.nn.init.normal_(p, std=0.1)
    labels = D.class_grid_labels(2)
    a = D.euler_sample(model, labels, num_steps=3, generator=torch.Generator().manual_seed(1))
    b = D.euler_sample(model, labels, num_steps=3, generator=torch.Generator().manual_seed(1))
    c = D.euler_sample(model, labels, num_steps=3, cfg_scale=1.0, generator=torch.Generator().manual_seed(1))
    assert a.shape == (20, 1, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="cfg_scale=-1"):
        D.euler_sample(model, labels, cfg_scale=-1.0)
    with pytest.raises(ValueError, match="num_steps=0"):
        D.euler_sample(model, labels, num_steps=0)


def test_frechet_distance() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 6))
    assert abs(D.frechet_distance(a, a)) < 1e-4
    # Shifting every feature by 2 adds 6 * 2**2 = 24; doubling the spread adds 6 * (2 - 1)**2 = 6.
    assert D.frechet_distance(a, a + 2.0) == pytest.approx(24.0, rel=1e-3)
    assert D.frechet_distance(a, 2.0 * a) == pytest.approx(6.0, rel=0.05)


def test_classifier_is_saved_and_reused(tmp_path: Path, data: D.Digits, monkeypatch) -> None:
    small = D.Digits(data.x_train[:256], data.y_train[:256], data.x_test, data.y_test)
    path = tmp_path / "clf.pt"
    clf, acc = D.load_or_train_classifier(path, small, epochs=2)
    assert path.exists() and acc > 0.3  # well above 10% chance after two epochs on 256 digits

    def no_training(*args, **kwargs):
        raise AssertionError("the saved classifier should have been reused")

    monkeypatch.setattr(D, "train_classifier", no_training)
    again, acc2 = D.load_or_train_classifier(path, small, epochs=2)
    assert acc2 == acc
    for a, b in zip(clf.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(AssertionError, match="reused"):  # a different recipe is not reused
        D.load_or_train_classifier(path, small, epochs=3)


@pytest.mark.slow
def test_quality_benchmark_short(tmp_path: Path, keep_threads, capsys) -> None:
    from benchmarks import quality

    out = tmp_path / "q.json"
    result = quality.main([
        "--seeds", "0", "1", "--steps", "2", "--model-size", "tiny", "--per-class", "3", "--sample-steps", "1",
        "--workers", "1", "--threads", "1", "--classifier", str(tmp_path / "clf.pt"), "--classifier-epochs", "1",
        "--json", str(out), "--samples-dir", str(tmp_path / "grids"), "--eval-every", "1",
        "--table", str(tmp_path / "q.md"), "--plots", str(tmp_path / "curves.png"),
    ])
    saved = json.loads(out.read_text())
    variants = ["none", "sra"]
    assert saved["dataset"] == "digits" and list(saved["variants"]) == variants
    assert len(saved["runs"]) == 4 and {(r["seed"], r["variant"]) for r in saved["runs"]} == {
        (s, v) for s in (0, 1) for v in variants}
    by = {(r["seed"], r["variant"]): r for r in saved["runs"]}
    for metric in ("probe_block2", "probe_block4", "frechet", "class_accuracy", "heldout_diffusion_loss", "seconds_per_step"):
        entry = saved["summary"][metric]
        values = [by[(s, "sra")][metric] for s in (0, 1)]
        assert entry["sra"]["mean"] == pytest.approx(np.mean(values))
        assert entry["sra"]["std"] == pytest.approx(np.std(values, ddof=1))
        per_seed = [by[(s, "sra")][metric] - by[(s, "none")][metric] for s in (0, 1)]
        assert entry["difference"]["baseline"] == "none"
        assert entry["difference"]["sra"]["per_seed"] == pytest.approx(per_seed)
        assert entry["difference"]["sra"]["mean"] == pytest.approx(np.mean(per_seed))
    for r in saved["runs"]:
        assert [c["step"] for c in r["curve"]] == [1, 2]
        assert r["curve"][-1]["frechet"] == r["frechet"]  # the last point is the final measurement
        assert r["seconds_per_step"] == pytest.approx(r["train_seconds"] / 2)
    assert saved["table"] == result["table"] and saved["table"] in capsys.readouterr().out
    md = (tmp_path / "q.md").read_text()
    d = saved["summary"]["frechet"]["difference"]["sra"]
    assert f"{d['per_seed'][0]:+.4f}, {d['per_seed'][1]:+.4f}" in md
    assert (tmp_path / "clf.pt").exists() and (tmp_path / "curves.png").exists()
    grids = sorted(p.name for p in (tmp_path / "grids").iterdir())
    assert grids == [f"samples_seed{s}_{v}.png" for s in (0, 1) for v in variants]


def test_quickstart_runs(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "3"])
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("done: diffusion")
    numbers = [float(w.strip(",")) for w in last.split() if w[0].isdigit()]
    assert len(numbers) == 2 and all(math.isfinite(v) and v > 0 for v in numbers)


def test_ddp_example_one_process(monkeypatch, capsys) -> None:
    from examples import accelerate_ddp

    for key, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    accelerate_ddp.main(["--steps", "2", "--batch-size", "4"])
    assert "1 rank(s), 2 steps: student, head and teacher agree across ranks" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_example_two_processes_with_torchrun(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = "2 rank(s), 2 steps: student, head and teacher agree across ranks"
    proc = torchrun([str(ROOT / "examples" / "accelerate_ddp.py"), "--steps", "2", "--batch-size", "4"],
                    done=done, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-1500:]
    assert done in proc.stdout


def test_ddp_example_accelerate_flag_without_accelerate() -> None:
    from examples import accelerate_ddp

    try:
        import accelerate  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="pip install accelerate"):
            accelerate_ddp.main(["--steps", "1", "--accelerate"])
    else:
        accelerate_ddp.main(["--steps", "1", "--batch-size", "4", "--accelerate"])


def test_diffusers_sd3_example(capsys) -> None:
    from examples import diffusers_sd3

    result = diffusers_sd3.main(["--steps", "2", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert "adapter='diffusers-sd3', blocks 2->4 of 6" in out and "step 1:" in out
    assert math.isfinite(result["diffusion"]) and result["align_loss"] > 0
    assert result["gap"] > 0  # the teacher saw a less noisy input (timesteps in sigma * 1000)


def test_finetune_lora_example(capsys, keep_threads) -> None:
    pytest.importorskip("peft")
    from examples import finetune_lora

    result = finetune_lora.main(["--steps", "12", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert "adapter='diffusers-flux', blocks 2->4 of 6" in out and "teacher=shared-weight EMA" in out
    assert "SRA adds:" in out and "no SRA key, no hook" in out
    assert result["student_reruns"] == 0 and math.isfinite(result["diffusion"]) and result["align_loss"] > 0
    # The teacher is the LoRA parameters' EMA in float32: exactly their count in 4-byte floats, nothing of the base.
    assert result["sra_teacher_bytes"] == result["lora_bytes"] + 1  # + the one-byte "initted" flag
    assert result["sra_teacher_bytes"] < result["base_bytes"] / 10
    assert result["export_keys"] and all("lora_" in k for k in result["export_keys"])


EXAMPLE_SCRIPTS = sorted(p.name for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))  # _x.py: helpers, not examples


def help_entries(text: str) -> dict[str, str]:
    """argparse's ``--help`` output as ``{"--flag" or positional: its help text, unwrapped}``, without -h."""
    entries: dict[str, str] = {}
    section, current = None, None
    for line in text.splitlines():
        if line in ("options:", "optional arguments:", "positional arguments:"):
            section, current = line, None
        elif not line.strip() or not line.startswith(" "):
            section = None if not line.startswith(" ") and line.strip() else section
            current = None if not line.strip() else current
        elif section and re.match(r"^  \S", line):
            names, _, help_text = line.strip().partition("  ")
            options = re.findall(r"(?:^|, )(-{1,2}[\w-]+)", names)  # "-s, --steps STEPS", "--mode {a,b}"
            current = options[-1] if options else names.split()[0]
            entries[current] = help_text.strip()
        elif section and current:
            entries[current] = f"{entries[current]} {line.strip()}".strip()
    entries.pop("--help", None)
    return entries


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLE_SCRIPTS)
def test_every_example_takes_help(script: str, tmp_path: Path) -> None:
    """``python examples/<script> --help`` from outside the checkout: usage on stdout, exit 0, nothing run,
    and every flag's help says its default, once."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:") and "--help" in proc.stdout
    assert not list(tmp_path.iterdir())  # --help wrote nothing
    entries = help_entries(proc.stdout)
    usage = proc.stdout.split("\n\n", 1)[0]
    flags = set(re.findall(r"\[(--[\w-]+)", usage)) - {"--help"}
    assert flags <= set(entries), f"{script}: flags in the usage without an entry: {flags - set(entries)}"
    for name, help_text in entries.items():
        assert help_text.count("(default: ") == 1, f"{script} {name}: {help_text!r} does not state its default once"
        assert "(default: None)" not in help_text and "(default: False)" not in help_text, f"{script} {name}: {help_text!r}"


def test_help_entries_reads_wrapped_and_positional_help() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="x", description="a description ending in a colon::")
    parser.add_argument("steps", nargs="?", type=int, default=5, help="steps (default: %(default)s)")
    parser.add_argument("--a-very-long-option-name-that-wraps", default="v", help="word " * 30 + "(default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no output (default: off)")
    parser.add_argument("--bare", type=int, default=3)
    parser.add_argument("-m", "--mode", choices=("a", "b"), default="a", help="mode (default: %(default)s)")
    entries = help_entries(parser.format_help())
    assert set(entries) == {"steps", "--a-very-long-option-name-that-wraps", "--quiet", "--bare", "--mode"}
    assert entries["--mode"] == "mode (default: a)"
    assert entries["steps"] == "steps (default: 5)" and entries["--quiet"] == "no output (default: off)"
    assert entries["--a-very-long-option-name-that-wraps"].endswith("word (default: v)") and entries["--bare"] == ""


def test_accelerate_zero_says_fsdp1_has_no_teacher() -> None:
    """fsdp1 trains SRA 2 (no teacher): its closing line says so, instead of "teacher != student: False"."""
    from examples.accelerate_zero import summary

    without = summary("fsdp1", 2, 3, "LatentAlignment", [0.2, 0.1], True, False, False)
    assert "teacher != student" not in without and "no teacher in this mode" in without
    assert "student and head identical on every rank: True" in without
    with_teacher = summary("zero3", 2, 3, "SelfRepresentationAlignment", [0.2, 0.1], True, True, True)
    assert "identical on every rank: True" in with_teacher and "teacher != student: True" in with_teacher


@pytest.mark.parametrize("script", ["accelerate_ddp", "flux_lora_dreambooth"])
def test_examples_without_deepspeed_drop_only_its_cpu_notice(script: str) -> None:
    """accelerate imports DeepSpeed when it is installed, and on a machine without a GPU DeepSpeed then warns
    "Setting accelerator to CPU". The examples that do not use DeepSpeed drop that one message; another
    warning of the same logger still shows. (A fresh process: DeepSpeed decides its accelerator once.)"""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed: there is no notice to drop")
    code = (
        "import logging, os\n"
        f"from examples.{script} import quiet_deepspeed_cpu_notice\n"
        "quiet_deepspeed_cpu_notice(); quiet_deepspeed_cpu_notice()\n"
        "from deepspeed.accelerator import get_accelerator\n"
        "print('accelerator:', get_accelerator()._name)\n"
        "logging.getLogger('DeepSpeed').warning('another DeepSpeed warning')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Setting accelerator to CPU" not in out and "another DeepSpeed warning" in out
    if "accelerator: cpu" not in out:
        pytest.skip("DeepSpeed found a device here, so it had no CPU notice to give")


@pytest.mark.slow
def test_quickstart_runs_on_one_thread_unless_told(monkeypatch, capsys, keep_threads) -> None:
    torch.set_num_threads(2)
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "1"])
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    assert torch.get_num_threads() == 1
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "1", "--threads", "2"])
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    assert torch.get_num_threads() == 2
    assert capsys.readouterr().out.count("done: diffusion") == 2


def test_custom_backbone_sets_threads(monkeypatch, keep_threads) -> None:
    from examples import custom_backbone

    torch.set_num_threads(2)
    monkeypatch.setattr(sys, "argv", ["custom_backbone.py", "--steps", "1", "--batch", "4"])
    custom_backbone.main()
    assert torch.get_num_threads() == 1


def test_train_digits_summary_says_which_way_is_better_and_flags_worse() -> None:
    from examples.train_digits import summary_table

    results = {
        "without SRA": {"heldout_diffusion_loss_ema": 0.2172, "probe_accuracy_block2_t0.5": 0.40, "train_seconds": 10.0},
        "with SRA": {"heldout_diffusion_loss_ema": 0.2288, "probe_accuracy_block2_t0.5": 0.45, "train_seconds": 12.0,
                     "align_loss_last10pct": 0.3},
    }
    rows = {line.split()[0]: line for line in summary_table(results).splitlines()[1:]}
    assert rows["heldout_diffusion_loss_ema"].split()[3:] == ["lower", "WORSE"]
    assert rows["probe_accuracy_block2_t0.5"].split()[3:] == ["higher", "better"]
    assert rows["train_seconds"].split()[3:] == ["lower", "WORSE", "(slower)"]
    assert "SRA run only" in rows["align_loss_last10pct"]
    results["with SRA"]["heldout_diffusion_loss_ema"] = 0.2
    assert summary_table(results).splitlines()[1].split()[3:] == ["lower", "better"]


def test_train_digits_help_prints_each_default_once() -> None:
    from examples.train_digits import build_parser

    parser = build_parser()
    text = " ".join(parser.format_help().split())  # undo the line wrapping
    flags = [a for a in parser._actions if a.dest != "help"]
    with_default = [a for a in flags if a.default is not None and a.default is not False]
    assert len(with_default) >= 10
    for action in with_default:
        assert f"(default: {action.default})" in text, action.dest
    # Flags without a default value say theirs in words: the preset's layers, a switch that is off.
    assert text.count("(default: the preset's)") == 2 and text.count("(default: off)") == 2
    assert text.lower().count("default") == len(flags)  # once each, and nowhere else
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.slow
def test_train_digits_titles_plots_and_caches_the_classifier_outside_out(tmp_path: Path, monkeypatch, capsys, keep_threads) -> None:
    import matplotlib.figure
    from examples import train_digits

    fast_classifier = D.train_classifier
    monkeypatch.setattr(D, "train_classifier", lambda data, epochs, seed: fast_classifier(data, epochs=1, seed=seed))
    titles: dict[str, list[str]] = {}
    save = matplotlib.figure.Figure.savefig

    def recording_savefig(fig, path, *args, **kwargs):
        titles[Path(path).name] = [fig._suptitle.get_text() if fig._suptitle else ""] + [ax.get_title() for ax in fig.axes]
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    out, cache = tmp_path / "demo", tmp_path / "cache"
    train_digits.main(["--steps", "3", "--model-size", "tiny", "--sample-steps", "2", "--cfg-scale", "1.5", "--per-class", "2",
                       "--quiet", "--out", str(out), "--classifier-cache", str(cache)])
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["images.pt", "loss_curves.png", "metrics.json", "run.pt", "samples.png"]
    assert (cache / "digit_classifier.pt").exists() and str(cache / "digit_classifier.pt") in printed
    samples_title = titles["samples.png"][0]
    assert "Euler, 2 steps" in samples_title and "guidance scale 1.5" in samples_title
    curves = titles["loss_curves.png"]
    assert "with SRA" in curves[0] and "blocks 2->4" in curves[0] and all(curves[1:3])
    assert "better  SRA was" in printed and "classifier_accuracy_on_samples" in printed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["better"]["heldout_diffusion_loss_ema"] == "lower" and saved["better"]["classifier_accuracy_on_samples"] == "higher"


def test_ddp_example_modes_log_raw_alignment_and_check_ranks(monkeypatch, capsys) -> None:
    """Plain DDP and accelerate print the same figures: the raw alignment loss (sra.metrics) and the rank check."""
    pytest.importorskip("accelerate")
    from examples import accelerate_ddp

    for key, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    outputs = {}
    for mode in ([], ["--accelerate"]):
        accelerate_ddp.main(["--steps", "1", "--batch-size", "4", *mode])
        outputs[bool(mode)] = capsys.readouterr().out
    for out in outputs.values():
        assert "alignment (raw, before weight 0.2)" in out
        assert "1 rank(s), 1 steps: student, head and teacher agree across ranks" in out
    raw = [float(out.split("weight 0.2) ")[1].split()[0]) for out in outputs.values()]
    assert raw[0] > 0.2 and raw[1] > 0.2  # the raw loss, not 0.2 times it (the weighted term is about 0.1 here)


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_example_accelerate_two_processes_checks_ranks(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = "2 rank(s), 2 steps: student, head and teacher agree across ranks"
    proc = torchrun([str(ROOT / "examples" / "accelerate_ddp.py"), "--steps", "2", "--batch-size", "4", "--accelerate"],
                    done=done, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-1500:]  # the head holds the failing rank's own message
    assert done in proc.stdout


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("prints_result", [True, False])
def test_torchrun_helper_reruns_only_an_exit_abort_after_the_result(tmp_path: Path, prints_result: bool) -> None:
    """The multi-process example tests run again only when every check passed and printed, and a rank
    then died of gloo's abort at exit; any other failure fails at once."""
    script = tmp_path / "aborts_once.py"
    script.write_text(
        "import os, sys\n"
        f"runs = {str(tmp_path)!r} + '/runs-' + os.environ['RANK']\n"
        "n = len(open(runs).read()) if os.path.exists(runs) else 0\n"
        "open(runs, 'a').write('x')\n"
        f"if {prints_result}: print('all ranks agree', flush=True)\n"
        "if n == 0 and os.environ['RANK'] == '1':\n"
        f"    sys.stderr.write({GLOO_EXIT_ABORT!r} + '\\n'); sys.stderr.flush(); os.abort()\n"
    )
    proc = torchrun([str(script)], done="all ranks agree", cwd=tmp_path, timeout=120)
    runs = len((tmp_path / "runs-1").read_text())
    if prints_result:
        assert proc.returncode == 0 and runs == 2
    else:
        assert proc.returncode != 0 and runs == 1


@pytest.mark.slow
def test_layer_report_command_of_the_docs_runs_as_written_after_the_demo(tmp_path: Path, keep_threads) -> None:
    """docs/layers.md's command, with the demo's output folder moved to a temporary one."""
    import re
    import shlex

    from examples import train_digits

    out = tmp_path / "digits"
    train_digits.main(["--steps", "3", "--sample-steps", "2", "--per-class", "1", "--no-classifier", "--quiet",
                       "--out", str(out)])  # the demo's model size: the command's --model-kwargs must fit it
    assert (out / "run.pt").exists() and (out / "images.pt").exists()
    page = (ROOT / "docs" / "layers.md").read_text()
    command = next(block for block in re.findall(r"```bash\n(.*?)```", page, re.S) if "sra_plugin.report" in block)
    argv = shlex.split(command.replace("\\\n", " ").replace("outputs/digits", str(out)))
    assert argv[:3] == ["python", "-m", "sra_plugin.report"]
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "layers.png").exists()
