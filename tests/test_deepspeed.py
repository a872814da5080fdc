"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (gloo, two processes, ``DS_ACCELERATOR=cpu``, a tiny SiT that ZeRO-3
really partitions: ``stage3_param_persistence_threshold: 0``).

For each stage, each objective (SRA with its owned EMA, SRA with the user's EMA, SRA 2, SRA on a peft
LoRA model, LayerSync with an MLP head, Dispersive, REPA with a random tiny timm ViT as encoder, and
SRA + LayerSync + Dispersive on one model, sharing one capture) and each
build order (the aligner built before ``deepspeed.initialize`` and its head handed to the engine in
``ModelWithHeads``; or built after, on a head made beforehand; Dispersive has no parameters, so its
engine trains the bare model), three steps of ``engine.backward``/``engine.step``:

- every rank's SRA loss at every step equals a single-process reference trained on both ranks'
  batches (the engine averages gradients over ranks; the reference averages the two ranks' losses);
- the owned teacher after three updates equals an EMA kept by hand from the gathered weights, and
  ``teacher_weights()`` shows it through the model (under ZeRO-3: each rank holds only its slice);
- resume: an engine checkpoint plus ``sra.state_dict()`` saved after step 2, loaded into a fresh
  model, aligner and engine, gives the continuing run's third step bit for bit.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from sra_plugin import REPA, Dispersive, LatentAlignment, LayerSync, ModelWithHeads, SelfRepresentationAlignment, zero
from sra_plugin.heads import build_head
from sra_plugin.repa import REPAProjector
from sra_plugin.wrappers import unwrap
from tests._models import flow_batch, free_port, tiny_sit, torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# deepspeed is in the [dev] extra. Not imported here: its import picks an accelerator, which the
# worker processes set to the CPU first.
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install sra-plugin[dev]")

WORLD, STEPS, BATCH, DECAY, LR = 2, 3, 2, 0.5, 1e-2
SRA_VARIANTS = ("sra", "user_ema", "lora")
VARIANTS = (*SRA_VARIANTS, "sra2", "layersync", "dispersive", "repa", "composed")
ORDERS = ("before", "after")
ATTENTION = r".*\.attn\.(qkv|proj)"


# ------------------------------------------------------------------------------------------ objects
def make_model(variant: str) -> tuple[nn.Module, nn.Module | None]:
    """The student (a peft LoRA model for "lora") and, for "user_ema", the EMA copy the user keeps."""
    model = tiny_sit(seed=0, depth=4, class_dropout_prob=0.0)
    nn.init.normal_(model.final_layer.linear.weight, std=0.05)  # gradients reach every block from step 1
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=ATTENTION))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
    user_ema = copy.deepcopy(model).requires_grad_(False) if variant == "user_ema" else None
    return model, user_ema


def make_head(variant: str) -> nn.Module | None:
    """The head an aligner built after ``deepspeed.initialize`` uses: made before, so the engine trains it
    (Dispersive has none)."""
    torch.manual_seed(1)
    if variant == "dispersive":
        return None
    if variant == "repa":
        return REPAProjector(32, ENCODER_DIM, hidden=16)
    if variant == "composed":
        return nn.ModuleList([build_head("mlp", 32, 32), build_head("mlp", 32, 32)])
    return build_head("mlp", 32, 16 if variant == "sra2" else 32)


def make_encoder() -> nn.Module:
    """REPA's frozen encoder: a random tiny timm ViT (nothing downloaded); 32 px, patch 8: the model's 4x4 grid."""
    import timm

    torch.manual_seed(7)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=ENCODER_DIM, depth=2, num_heads=2, num_classes=0).requires_grad_(False)


ENCODER_DIM = 24


class Composed(nn.Module):
    """``sra(...) + ls(...) + disp(...)`` on one model: one capture, the student's blocks run once."""

    def __init__(self, model: nn.Module, heads: nn.ModuleList | None) -> None:
        super().__init__()
        sra_head, ls_head = ("mlp", "mlp") if heads is None else tuple(heads)
        self.sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=3, ema_decay=DECAY, head=sra_head)
        self.ls = LayerSync(model, student_layer=1, target_layer=4, head=ls_head)
        self.disp = Dispersive(model, layer=3)
        self.head = nn.ModuleList([self.sra.head, self.ls.head])
        self._student = self.sra._student

    @property
    def student_reruns(self) -> int:
        return self.sra.student_reruns + self.ls.student_reruns + self.disp.student_reruns

    def forward(self, model, x_t, x_s, t, s, y):
        return self.sra(model, x_t, x_s, t, s, y) + self.ls(model, x_t, t, y) + self.disp(model, x_t, t, y)

    def update_teacher(self) -> None:
        self.sra.update_teacher()


def make_aligner(variant: str, model: nn.Module, user_ema: nn.Module | None, head: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(1)
    kwargs = {} if head is None else {"head": head}
    if variant == "sra2":
        return LatentAlignment(model, layer=2, **kwargs)
    if variant == "layersync":
        return LayerSync(model, student_layer=2, target_layer=4, **{"head": "mlp", **kwargs})
    if variant == "dispersive":
        return Dispersive(model, layer=3)
    if variant == "repa":
        return REPA(model, make_encoder(), layer=2, projector_dim=16, **kwargs)
    if variant == "composed":
        return Composed(model, head)
    teacher = user_ema if user_ema is not None else "ema"
    return SelfRepresentationAlignment(model, student_layer=2, teacher_layer=3, ema_decay=DECAY, teacher=teacher, **kwargs)


def data(step: int, rank: int):
    x_t, x_s, t, s, y, target = flow_batch(BATCH, 100 * step + rank)
    x0 = x_t - t.view(-1, 1, 1, 1) * target  # the linear path: x_t = x0 + t * (noise - x0)
    images = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(100 * step + rank))
    return x_t, x_s, x0, t, s, y, target, images


def aligner_loss(aligner: nn.Module, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    x_t, x_s, x0, t, s, y, target, images = batch
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*found no student features")  # no fallback pass
        pred = model(x_t, t, y)
        if isinstance(aligner, LatentAlignment):
            align = aligner(model, x_t, x0, t, y)
        elif isinstance(aligner, REPA):
            align = aligner(model, x_t, t, y, images=images)
        elif isinstance(aligner, (LayerSync, Dispersive)):
            align = aligner(model, x_t, t, y)
        else:
            align = aligner(model, x_t, x_s, t, s, y)
    return F.mse_loss(pred, target) + align, align


@torch.no_grad()
def hand_ema_update(ema: nn.Module, model: nn.Module) -> None:
    """What a user does with their own EMA under ZeRO-3: read the weights inside GatheredParameters."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - DECAY)


@torch.no_grad()
def gathered(model: nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    import deepspeed

    params = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {n: p.detach().float().clone() for n, p in params}


def ds_config(stage: int) -> dict:
    return {
        "train_batch_size": BATCH * WORLD,
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def build_engine(stage: int, variant: str, order: str):
    import deepspeed

    model, user_ema = make_model(variant)
    if order == "before":
        aligner = make_aligner(variant, model, user_ema)
        bundle = ModelWithHeads(model, aligner) if any(True for _ in aligner.head.parameters()) else model
    else:
        head = make_head(variant)
        bundle = ModelWithHeads(model, head) if head is not None else model
    optimizer = torch.optim.AdamW([p for p in bundle.parameters() if p.requires_grad], lr=LR)
    engine, *_ = deepspeed.initialize(model=bundle, optimizer=optimizer, config=ds_config(stage))
    if order == "after":
        aligner = make_aligner(variant, engine, user_ema, head=head)
    return engine, aligner, user_ema


def run_case(stage: int, variant: str, order: str, rank: int, checkpoint_dir: str) -> dict:
    engine, aligner, user_ema = build_engine(stage, variant, order)
    student = aligner._student
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    hand = gathered(student, names)  # the owned EMA starts from the weights at first use (before step 1)
    losses = []
    for step in range(STEPS):
        if step == STEPS - 1:  # what resume must reproduce: the state after step 2
            engine.save_checkpoint(checkpoint_dir, tag="resume")
            torch.save(aligner.state_dict(), os.path.join(checkpoint_dir, f"aligner{rank}.pt"))
            user_state = copy.deepcopy(user_ema.state_dict()) if user_ema is not None else None
        loss, align = aligner_loss(aligner, engine, data(step, rank))
        engine.backward(loss)
        engine.step()
        if user_ema is not None:
            hand_ema_update(user_ema, student)
        if hasattr(aligner, "update_teacher"):
            aligner.update_teacher()
        now = gathered(student, names)
        hand = {n: torch.lerp(hand[n], now[n], 1 - DECAY) for n in names}
        losses.append(align.detach())
    owned = isinstance(aligner, SelfRepresentationAlignment) and aligner.ema is not None
    result = {
        "losses": torch.stack(losses),
        "sharded": owned and aligner.ema.sharded,
        "empty_outside_forward": all(p.numel() == 0 for p in student.parameters()),
        "ema_held": sum(v.numel() for v in aligner.ema.state_dict().values() if v.dim() > 0) if owned else 0,
        "ema_full": sum(v.numel() for v in hand.values()),
        "reruns": aligner.student_reruns,
    }
    if isinstance(aligner, SelfRepresentationAlignment):
        with aligner.teacher_weights():
            result["teacher"] = gathered(student, names)
        result["hand"] = hand
        result["after_exit"] = gathered(student, names)
        result["student"] = now
    result["head"] = gathered(aligner.head)

    # Resume: fresh objects in the same order, the engine's checkpoint and the aligner's state.
    engine2, aligner2, user_ema2 = build_engine(stage, variant, order)
    engine2.load_checkpoint(checkpoint_dir, tag="resume")
    aligner2.load_state_dict(torch.load(os.path.join(checkpoint_dir, f"aligner{rank}.pt"), weights_only=True))
    if user_ema2 is not None:
        user_ema2.load_state_dict(user_state)
    _, align2 = aligner_loss(aligner2, engine2, data(STEPS - 1, rank))
    result["resumed_loss"] = align2.detach()
    return result


# ------------------------------------------------------------------------------------------ reference
@functools.lru_cache(maxsize=None)
def reference(variant: str, order: str) -> dict:
    """One process, no engine: each step averages the two ranks' losses, as the engine averages gradients."""
    model, user_ema = make_model(variant)
    head = make_head(variant) if order == "after" else None
    aligner = make_aligner(variant, model, user_ema, head)
    params = [p for p in [*model.parameters(), *aligner.head.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    losses = []
    for step in range(STEPS):
        per_rank = [aligner_loss(aligner, model, data(step, rank)) for rank in range(WORLD)]
        (sum(loss for loss, _ in per_rank) / WORLD).backward()
        optimizer.step()
        optimizer.zero_grad()
        if user_ema is not None:
            with torch.no_grad():
                for e, p in zip(user_ema.parameters(), model.parameters()):
                    e.lerp_(p.detach(), 1 - DECAY)
        if hasattr(aligner, "update_teacher"):
            aligner.update_teacher()
        losses.append(torch.stack([align.detach() for _, align in per_rank]))
    head = {n: p.detach().float().clone() for n, p in aligner.head.named_parameters()}
    return {"losses": torch.stack(losses), "head": head}  # losses: (step, rank)


# ------------------------------------------------------------------------------------------ processes
CASES = [(stage, variant, order) for stage in (2, 3) for variant in VARIANTS for order in ORDERS]


def worker(rank: int, port: int, out_dir: str, cases: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # would compile a C++ op at run time
    deepspeed.utils.logger.setLevel("WARNING")
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    try:
        results = {}
        for case in cases:
            with tempfile.TemporaryDirectory() as checkpoint_dir:
                checkpoint_dir = [checkpoint_dir]
                dist.broadcast_object_list(checkpoint_dir, src=0)  # one folder for both ranks
                results[case] = run_case(*case, rank, checkpoint_dir[0])
                dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def launch(cases: list) -> list[dict]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(free_port(), out_dir, cases), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return launch(CASES)


def case_id(case: tuple) -> str:
    return "zero{}-{}-{}".format(*case)


SRA_CASES = [c for c in CASES if c[1] in SRA_VARIANTS]


@pytest.mark.slow
@pytest.mark.distributed
@needs_deepspeed
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_zero_loss_equals_single_process_reference_at_every_step(ranks, case):
    stage, variant, order = case
    expected = reference(variant, order)["losses"]
    for rank in range(WORLD):
        got = ranks[rank][case]
        assert got["reruns"] == 0  # the engine's forward fed the capture: no second student pass
        torch.testing.assert_close(got["losses"], expected[:, rank], rtol=1e-5, atol=1e-7, msg=f"rank {rank}")
    assert not torch.equal(ranks[0][case]["losses"], ranks[1][case]["losses"])  # different data per rank


@pytest.mark.distributed
@needs_deepspeed
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_zero_engine_trains_the_head_as_the_single_process_reference_does(ranks, case):
    stage, variant, order = case
    expected = reference(variant, order)["head"]
    assert bool(expected) == (variant != "dispersive")  # every objective here but Dispersive has a trainable head
    for rank in range(WORLD):
        assert ranks[rank][case]["empty_outside_forward"] == (stage == 3)  # ZeRO-3 really partitioned the model
        got = ranks[rank][case]["head"]
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")


@pytest.mark.distributed
@needs_deepspeed
@pytest.mark.parametrize("case", SRA_CASES, ids=case_id)
def test_zero_teacher_after_three_updates_is_the_hand_ema(ranks, case):
    for rank in range(WORLD):
        got = ranks[rank][case]
        for name, value in got["hand"].items():
            torch.testing.assert_close(got["teacher"][name], value, rtol=1e-6, atol=1e-7, msg=name)
            assert torch.equal(got["after_exit"][name], got["student"][name]), f"{name}: training weights not restored"
        # Three steps moved the student away from its EMA: the check above sees the teacher's weights.
        assert max((got["teacher"][n] - got["student"][n]).abs().max() for n in got["hand"]) > 1e-3


@pytest.mark.distributed
@needs_deepspeed
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_zero_resume_from_checkpoint_and_state_dict_is_bitwise(ranks, case):
    for rank in range(WORLD):
        got = ranks[rank][case]
        assert torch.equal(got["resumed_loss"], got["losses"][-1]), (rank, got["resumed_loss"], got["losses"][-1])


@pytest.mark.distributed
@needs_deepspeed
@pytest.mark.parametrize("case", [c for c in SRA_CASES if c[1] != "user_ema"], ids=case_id)
def test_zero3_owned_teacher_holds_only_this_ranks_slice(ranks, case):
    stage = case[0]
    for rank in range(WORLD):
        got = ranks[rank][case]
        assert got["empty_outside_forward"] == (stage == 3)  # ZeRO-3 really partitioned the tiny model
        assert got["sharded"] == (stage == 3)
        if stage == 3:  # each rank: its half of every EMA'd weight (rounded up), in float32
            assert got["ema_full"] / 2 <= got["ema_held"] <= got["ema_full"] / 2 + 64, (got["ema_held"], got["ema_full"])
        else:
            assert got["ema_held"] >= got["ema_full"]


# ------------------------------------------------------------------------------------------ one process
def fake_zero3(param: nn.Parameter, **tensor_attrs) -> nn.Parameter:
    """What ZeRO-3 leaves on a parameter, as far as sra_plugin.zero reads it."""
    param.ds_id, param.ds_status, param.ds_shape = 0, "NOT_AVAILABLE", param.shape
    param.ds_tensor = param.detach().reshape(-1).clone()
    for key, value in tensor_attrs.items():
        setattr(param.ds_tensor, key, value)
    return param


@pytest.mark.parametrize("attrs, setting", [
    ({"final_location": "OffloadDeviceEnum.nvme"}, "offload_param.device='nvme'"),
    ({"ds_quant_scale": torch.ones(1)}, "zero_quantized_weights"),
])
def test_unsupported_zero3_variants_are_refused_at_construction_with_the_fix(attrs, setting):
    model = tiny_sit(seed=0, depth=4)
    for name, p in model.named_parameters():  # ZeRO-3 converts every parameter; one has the unsupported setting
        fake_zero3(p, **(attrs if name == "blocks.0.attn.qkv.weight" else {}))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight") as info:
        SelfRepresentationAlignment(model, student_layer=2, teacher_layer=3)
    assert setting in str(info.value) and "teacher=" in str(info.value)
    assert not model._forward_hooks and all(not b._forward_hooks for b in model.blocks)  # nothing attached
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_zero_helpers_read_a_partitioned_parameter():
    p = fake_zero3(nn.Parameter(torch.arange(6.0).reshape(2, 3)))
    assert zero.is_partitioned(p) and zero.full_shape(p) == (2, 3)
    assert not zero.is_partitioned(nn.Parameter(torch.zeros(2)))


def test_model_with_heads_is_the_model_to_callers_and_to_unwrap():
    model = tiny_sit(seed=0, depth=4)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=3)
    align = LatentAlignment(model, layer=2)
    bundle = ModelWithHeads(model, sra, align)
    assert unwrap(bundle) is model
    assert [id(h) for h in bundle.heads] == [id(sra.head), id(align.head)]
    assert {n for n, _ in bundle.named_parameters()} == {
        *(f"model.{n}" for n, _ in model.named_parameters()),
        *(f"heads.0.{n}" for n, _ in sra.head.named_parameters()),
        *(f"heads.1.{n}" for n, _ in align.head.named_parameters()),
    }
    x_t, _, t, _, y, _ = flow_batch(2, 0)
    torch.testing.assert_close(bundle(x_t, t, y), model(x_t, t, y), rtol=0, atol=0)
    for bad in ((), ("mlp",)):
        with pytest.raises(TypeError, match="aligners_or_heads"):
            ModelWithHeads(model, *bad)


@pytest.mark.slow
@pytest.mark.distributed
@needs_deepspeed
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="pip install sra-plugin[dev]")
@pytest.mark.parametrize("mode", ["zero3", "fsdp2"])
def test_accelerate_zero_example_runs_on_two_cpu_processes(mode):
    """examples/accelerate_zero.py under torchrun: accelerate's DeepSpeed ZeRO-3 and FSDP2 plugins; every rank
    ends with the same student, head and teacher, and the teacher is not the student."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = torchrun([os.path.join(ROOT, "examples", "accelerate_zero.py"), "--mode", mode, "--steps", "3", "--batch-size", "4"],
                    done=f"{mode}: 2 processes", cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[:3000] + "\n...\n" + done.stderr[-1500:]
    line = next(l for l in done.stdout.splitlines() if l.startswith(f"{mode}: 2 processes"))
    assert "identical on every rank: True" in line and "teacher != student: True" in line, line
