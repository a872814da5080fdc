"""examples/flux_lora_dreambooth.py: SRA in diffusers' Flux DreamBooth-LoRA step, run end to end on a tiny
random Flux, and its accelerate checkpoint resuming exactly."""

from __future__ import annotations

import inspect
import math
import re
import os
import sys
from pathlib import Path

import pytest
import torch

from examples import flux_lora_dreambooth as F
from sra_plugin import SelfRepresentationAlignment


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state: another test's Accelerator(mixed_precision="no") would
    refuse this module's bf16 one, and the other way round (a real run makes one per process)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_packing_is_flux_layout_and_inverts() -> None:
    latents = torch.randn(2, 3, 4, 6)
    tokens = F.pack_latents(latents)
    assert tokens.shape == (2, 2 * 3, 3 * 4)
    # Token (row i, column j) holds the 2x2 patch at (2i, 2j), channel-major, as FluxPipeline._pack_latents.
    i, j = 1, 2
    assert torch.equal(tokens[:, i * 3 + j], latents[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(2, -1))
    assert torch.equal(F.unpack_latents(tokens, 4, 6), latents)
    ids = F.latent_image_ids_of(4, 6)
    assert ids.shape == (6, 3) and ids[i * 3 + j].tolist() == [0.0, i, j]


def test_four_marked_lines_and_no_sra_in_hooks_or_prepare() -> None:
    """The script gains exactly four lines, each marked ``# SRA``; its save/load hooks and its
    ``accelerator.prepare`` calls are the script's own, with no mention of SRA."""
    source = Path(F.__file__).read_text()
    marked = [line.strip() for line in source.splitlines() if line.rstrip().endswith("# SRA")]
    assert len(marked) == 4, marked
    assert marked[0].startswith("sra = SelfRepresentationAlignment(transformer") and ".checkpoint_with(accelerator)" in marked[0]
    assert marked[1].startswith("params_to_optimize.append(") and "sra.head.parameters()" in marked[1]
    assert marked[2].startswith("loss = loss + sra(transformer, packed_noisy_model_input") and "flow_teacher_input(" in marked[2]
    assert marked[3] == "sra.update_teacher()  # SRA"
    train_source = inspect.getsource(F.train)
    for hook in ("save_model_hook", "load_model_hook"):
        body = train_source[train_source.index(f"def {hook}"):]
        body = body[:body.index("\n\n")]
        assert "sra" not in body.lower() and "raise ValueError" in body, hook
    prepares = [line for line in train_source.splitlines() if "accelerator.prepare" in line or line.strip().startswith("transformer,")]
    assert prepares and not any("sra" in line for line in prepares)
    assert "del text_encoder_one, text_encoder_two" in train_source  # the default path frees them, as the script


def assert_same_state(a: dict, b: dict) -> None:
    for key in ("lora", "sra", "text_lora"):
        if key in a or key in b:
            assert a[key].keys() == b[key].keys(), key
            different = [name for name in a[key] if not torch.equal(a[key][name], b[key][name])]
            assert not different, f"{key}: {different[:3]}"
    assert a["step"] == b["step"] and a["global_step"] == b["global_step"]


def test_dreambooth_with_accumulation_resumes_bitwise(capsys, keep_threads) -> None:
    """bf16 base, gradient accumulation 2: the run resumed from the checkpoint of step 2 (its LoRA and head
    initialised from another seed) has the uninterrupted run's losses, LoRA, head, EMA and step, bit for bit."""
    result = F.main(["--max-train-steps", "4", "--gradient-accumulation-steps", "2", "--quiet"])
    out = capsys.readouterr().out
    assert "adapter='diffusers-flux', blocks 2->5 of 6" in out and "teacher=shared-weight EMA" in out
    assert result["base_dtypes"] == {torch.bfloat16}  # LoRA and head: the script's dtype (bf16; float32 under fp16)
    assert result["student_reruns"] == 0  # sra reused the training forward's tokens every micro-batch
    assert result["step"] == result["global_step"] == 4  # the EMA and the step moved once per optimizer step
    assert len(result["loss"]) == 8 and all(math.isfinite(v) for v in result["loss"])
    uninterrupted, resumed = result["resume"]
    assert len(uninterrupted) == 4 and uninterrupted == resumed and "bitwise equal" in out
    full, resumed_run = result["resume_runs"]
    assert_same_state(full, resumed_run)  # LoRA, head, EMA teacher, sra.step
    assert any(name.startswith("ema.") for name in full["sra"]) and any(name.startswith("head.") for name in full["sra"])


def test_text_encoder_branch_resumes_bitwise(tmp_path: Path, keep_threads) -> None:
    """--train-text-encoder: the CLIP LoRA is prepared, accumulated, clipped, saved by the script's hooks and
    restored with the transformer's LoRA and sra's state."""
    args = F.parse_args(["--max-train-steps", "2", "--gradient-accumulation-steps", "2", "--train-text-encoder",
                         "--mixed-precision", "no", "--quiet"])
    torch.set_num_threads(1)
    full, resumed = F.check_resume(args, tmp_path)
    assert_same_state(full, resumed)
    assert "text_lora" in full and F.resumed_losses(args, full, resumed)[0] == resumed["loss"]
    saved = sorted(p.name for p in (tmp_path / "checkpoint-1").iterdir())
    assert {"custom_checkpoint_0.pkl", "transformer_lora.safetensors", "text_encoder_lora.safetensors"} <= set(saved)
    assert not any(name.startswith("model") for name in saved)  # the hooks kept accelerate from saving whole models


def test_resume_without_registering_sra_is_not_exact(tmp_path: Path, keep_threads, monkeypatch) -> None:
    """The check can fail: if sra is not registered for checkpointing, the resumed run's head is another one."""
    args = F.parse_args(["--max-train-steps", "2", "--quiet", "--mixed-precision", "no"])
    torch.set_num_threads(1)
    full, resumed = F.check_resume(args, tmp_path)
    assert_same_state(full, resumed)
    monkeypatch.setattr(SelfRepresentationAlignment, "checkpoint_with", lambda self, accelerator: self)
    full_off, resumed_off = F.check_resume(args, tmp_path / "off")
    uninterrupted, resumed_losses = F.resumed_losses(args, full_off, resumed_off)
    assert uninterrupted[0] != resumed_losses[0]


def test_flow_teacher_input_builds_x_s_from_the_same_latents_and_noise() -> None:
    from sra_plugin import NoiseGap, flow_teacher_input

    x0, noise = torch.randn(3, 4, 4, 6), torch.randn(3, 4, 4, 6)
    sigma = torch.tensor([0.9, 0.5, 0.05]).view(3, 1, 1, 1)
    got = flow_teacher_input(x0, noise, sigma, max_gap=0.2, pack=F.pack_latents, generator=torch.Generator().manual_seed(3))
    s = NoiseGap(max_gap=0.2).sample(sigma.flatten(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(got["s"], s) and bool((s <= sigma.flatten()).all()) and bool((s >= sigma.flatten() - 0.2).all())
    assert torch.equal(got["x_s"], F.pack_latents((1 - s.view(3, 1, 1, 1)) * x0 + s.view(3, 1, 1, 1) * noise))
    assert flow_teacher_input(x0, noise, sigma.flatten(), max_gap=0.0)["x_s"].shape == x0.shape
    for kwargs, error, words in (
        (dict(x0=x0.tolist(), noise=noise, sigma=sigma), TypeError, "x0=list is not accepted"),
        (dict(x0=x0, noise=noise[:2], sigma=sigma), ValueError, "noise of shape (2, 4, 4, 6) is not accepted"),
        (dict(x0=x0, noise=noise, sigma=sigma[:2]), ValueError, "one value per sample"),
        (dict(x0=x0, noise=noise, sigma=sigma, pack=1), TypeError, "pack=1 is not accepted"),
        (dict(x0=x0, noise=noise, sigma=sigma, max_gap=-1.0), ValueError, "max_gap=-1.0"),
    ):
        with pytest.raises(error, match=re.escape(words)):
            flow_teacher_input(**kwargs)


def test_checkpoint_with_refuses_what_is_no_accelerator() -> None:
    model, sra = _tiny_sit_pair()
    with pytest.raises(TypeError, match="accelerator=object is not accepted"):
        sra.checkpoint_with(object())


def test_bad_flags_name_the_flag(capsys, monkeypatch) -> None:
    for argv, word in ((["--max-train-steps", "0"], "--max-train-steps 0"), (["--max-train-steps", "1"], "--no-resume-check"),
                       (["--rank", "0"], "--rank 0"), (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps 0"),
                       (["--resume-from-checkpoint", "checkpoint-2"], "--output-dir")):
        with pytest.raises(SystemExit):
            F.parse_args(argv)
        assert word in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        F.parse_args([])
    assert "add --no-resume-check under torchrun" in capsys.readouterr().err
    assert F.parse_args(["--no-resume-check"]).no_resume_check


def _tiny_sit_pair():
    from sra_plugin import SelfRepresentationAlignment
    from tests._models import tiny_sit

    model = tiny_sit(0, init=lambda m: m, in_channels=1, depth=4)  # adaLN-zero as built
    sra = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=3)
    return model, sra


@pytest.mark.parametrize("way", ["prepared", "prepared, safe_serialization=False", "register_for_checkpointing"])
def test_accelerate_checkpoints_without_hooks_restore_sra(way: str, tmp_path: Path) -> None:
    """The hook-free ways: sra's head, owned EMA teacher and step come back, with accelerate's default
    safetensors writer too (0.3.0 crashed there: its extra state was a dict)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, sra = _tiny_sit_pair()
    opt = torch.optim.AdamW([*model.parameters(), *sra.head.parameters()])
    if way == "register_for_checkpointing":
        model, opt = accelerator.prepare(model, opt)
        accelerator.register_for_checkpointing(sra)
        save = dict()
    else:
        model, _, opt = accelerator.prepare(model, sra, opt)
        save = dict(safe_serialization=False) if "safe_serialization" in way else dict()
    sra.update_teacher()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.add_(1.0)  # so the teacher and the model differ
    sra.update_teacher()
    saved = {k: v.clone() for k, v in sra.state_dict().items() if isinstance(v, torch.Tensor)}
    accelerator.save_state(str(tmp_path), **save)
    with torch.no_grad():
        for v in sra.state_dict().values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                v.zero_()
    sra.step = 0
    accelerator.load_state(str(tmp_path))
    restored = sra.state_dict()
    assert sra.step == 2 and saved.keys() <= restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if v.is_floating_point() and not k.startswith("head"))


# ---------------------------------------------------------------- two processes (torchrun, gloo on CPU)
MP_ARGS = ["--max-train-steps", "4", "--gradient-accumulation-steps", "2", "--mixed-precision", "no",
           "--no-resume-check", "--quiet"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    """One torchrun of the example on two processes, accumulation 2, saving checkpoint-2; one torchrun
    resumed from it with another seed; and the one-process reference over the same micro-batches."""
    import torch.distributed as dist

    from tests._models import torchrun

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    out = tmp_path_factory.mktemp("dreambooth_ddp")
    script = str(Path(F.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(F.__file__).resolve().parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}
    runs = {
        "full": [*MP_ARGS, "--output-dir", str(out), "--checkpointing-steps", "2", "--report", str(out / "full")],
        "resumed": [*MP_ARGS, "--output-dir", str(out), "--checkpointing-steps", "100", "--seed", "99",
                    "--resume-from-checkpoint", "checkpoint-2", "--report", str(out / "resumed")],
    }
    results = {}
    for name, argv in runs.items():
        proc = torchrun([script, *argv], done="SelfRepresentationAlignment(", env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        results[name] = [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(2)]
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results["reference"] = F.train(F.parse_args([*MP_ARGS, "--simulate-processes", "2"]))
    finally:
        torch.set_num_threads(n)
    return results


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_stay_identical_and_match_one_process(two_processes) -> None:
    """Head, LoRA and EMA teacher identical on both ranks (sra averaged its head's gradients itself), and equal
    within float tolerance to one process that accumulates both ranks' micro-batches (the same mean gradient)."""
    r0, r1 = two_processes["full"]
    ref = two_processes["reference"]
    assert r0["loss"] != r1["loss"]  # the ranks saw different micro-batches
    assert_same_state(r0, r1)
    assert r0["step"] == ref["step"] == 4 and r0["student_reruns"] == r1["student_reruns"] == 0
    # The reference's micro-batches interleave the ranks': (rank 0, rank 1) per accumulation slot.
    assert ref["loss"][0::2] == pytest.approx(r0["loss"], abs=1e-5) and ref["loss"][1::2] == pytest.approx(r1["loss"], abs=1e-5)
    for key in ("lora", "sra"):
        for name, value in r0[key].items():
            if value.is_floating_point():
                torch.testing.assert_close(value, ref[key][name], rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
            else:
                assert torch.equal(value, ref[key][name]), name


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_resume_exactly(two_processes) -> None:
    full, resumed = two_processes["full"], two_processes["resumed"]
    for rank in range(2):
        assert resumed[rank]["loss"] == full[rank]["loss"][4:]  # optimizer steps 3-4: 2 micro-batches each
        assert_same_state(full[rank], resumed[rank])
