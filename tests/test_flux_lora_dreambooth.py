"""examples/flux_lora_dreambooth.py: SRA in diffusers' Flux DreamBooth-LoRA step, run end to end on a tiny
random Flux, and its accelerate checkpoint resuming exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from examples import flux_lora_dreambooth as F


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
    ids = F.latent_image_ids(4, 6)
    assert ids.shape == (6, 3) and ids[i * 3 + j].tolist() == [0.0, i, j]


def test_dreambooth_step_trains_in_float32_on_bf16_and_resumes_bitwise(capsys, keep_threads) -> None:
    result = F.main(["--steps", "4", "--quiet"])
    out = capsys.readouterr().out
    assert "adapter='diffusers-flux', blocks 2->5 of 6" in out and "teacher=shared-weight EMA" in out
    assert result["head_dtype"] == torch.float32 and result["lora_dtypes"] == {torch.float32}
    assert result["base_dtypes"] == {torch.bfloat16}
    assert result["student_reruns"] == [0, 0, 0, 0]  # sra reused the training forward's tokens every step
    assert all(math.isfinite(v) for v in result["loss"]) and min(result["align_loss"]) > 0
    assert all(total > diff for total, diff in zip(result["loss"], result["diffusion"]))  # the SRA term is in the loss
    uninterrupted, resumed = result["resume"]
    assert len(uninterrupted) == 2 and uninterrupted == resumed and "bitwise equal" in out


def test_resume_without_sra_state_is_not_exact(tmp_path: Path, keep_threads) -> None:
    """The check can fail: if the load hook skips sra's state, the resumed run's head is another one."""
    args = F.parse_args(["--steps", "2", "--quiet"])
    torch.set_num_threads(1)
    uninterrupted, resumed = F.check_resume(args, tmp_path, restore_sra=False)
    assert uninterrupted[0] != resumed[0]
    saved = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert "sra.pt" in saved and "transformer_lora.safetensors" in saved
    assert not any(name.startswith("model") for name in saved)  # the hooks kept accelerate from saving whole models


def test_bad_flags_name_the_flag(capsys) -> None:
    for argv, word in ((["--steps", "0"], "--steps 0"), (["--steps", "1"], "--no-resume-check"),
                       (["--rank", "0"], "--rank 0")):
        with pytest.raises(SystemExit):
            F.parse_args(argv)
        assert word in capsys.readouterr().err


def _tiny_sit_pair():
    from examples.models import SiT
    from sra_plugin import SelfRepresentationAlignment

    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10)
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
