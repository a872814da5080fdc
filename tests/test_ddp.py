"""DDP: two CPU processes with the gloo backend, ``DDP(model)`` and ``DDP(sra)``, different data per
rank: after several steps student, head and teacher are identical on both ranks. Without ``DDP(sra)``
the bare ``sra`` does the same itself (rank 0's head, gradients averaged: ``sra_plugin.headsync``);
with that turned off (``average_head_grads = False``) the heads drift apart (so the check can fail)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from sra_plugin import LatentAlignment, SelfRepresentationAlignment
from sra_plugin.schedules import stop_at
from tests._models import identical, spawn_ranks

WORLD, STEPS = 2, 4

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")


def train_latent(rank: int) -> dict:
    """DDP(model) + DDP(LatentAlignment), its weight 0 at steps 2 and 3 (nothing runs then, and DDP
    must not complain about the head's unused parameters)."""
    from tests._models import flow_batch, tiny_sit

    model = tiny_sit(seed=rank, depth=4)
    ddp_model = DDP(model)
    align = LatentAlignment(model, layer=2, weight=stop_at(2, 0.5))
    with torch.no_grad():
        for p in align.head.parameters():
            p.add_(0.1 * rank)
    align_call = DDP(align)
    opt = torch.optim.AdamW([*ddp_model.parameters(), *align.head.parameters()], lr=1e-3)
    losses = []
    for step in range(STEPS):
        x_t, _, t, _, y, target = flow_batch(4, 100 * step + rank)
        x0 = x_t - t.view(-1, 1, 1, 1) * target  # the linear path: x_t = x0 + t * (noise - x0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pred = ddp_model(x_t, t, y)
            loss = align_call(ddp_model, x_t, x0, t, y)
        (F.mse_loss(pred, target) + loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return {"model": model.state_dict(), "head": align.head.state_dict(), "step": align.step, "losses": torch.stack(losses),
            "reruns": align.student_reruns}


def train(rank: int, wrap_sra: bool = True, sra_first: bool = True, latent: bool = False, head_sync: bool = True) -> dict:
    from tests._models import flow_batch, tiny_sit

    if latent:
        return train_latent(rank)
    # Different initial weights per rank on purpose: DDP must broadcast rank 0's model, head and teacher.
    model = tiny_sit(seed=rank, depth=4)
    if sra_first:  # sra built on the bare model, before DDP: its teacher copies this rank's weights
        sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=3, ema_decay=0.5)
        ddp_model = DDP(model)
    else:
        ddp_model = DDP(model)
        sra = SelfRepresentationAlignment(ddp_model, student_layer=2, teacher_layer=3, ema_decay=0.5)
    with torch.no_grad():
        for p in sra.head.parameters():
            p.add_(0.1 * rank)
    sra.average_head_grads = head_sync
    sra_call = DDP(sra) if wrap_sra else sra  # what accelerator.prepare(model, sra, optimizer) does
    opt = torch.optim.AdamW([*ddp_model.parameters(), *sra.head.parameters()], lr=1e-3)
    losses = []
    for step in range(STEPS):
        x_t, x_s, t, s, y, target = flow_batch(4, 100 * step + rank)  # different data per rank
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the DDP forward feeds the capture: no fallback pass
            pred = ddp_model(x_t, t, y)
            align = sra_call(ddp_model, x_t, x_s, t, s, y)
        (F.mse_loss(pred, target) + align).backward()
        opt.step()
        opt.zero_grad()
        # Keep a name for the bare object: DDP(sra) hides its methods (sra_call.module is the same object).
        assert not wrap_sra or sra_call.module is sra
        sra.update_teacher()
        losses.append(align.detach())
    return {"model": model.state_dict(), "head": sra.head.state_dict(), "teacher": sra.teacher.state_dict(),
            "step": sra.step, "losses": torch.stack(losses), "head_sync": sra._head_sync.active}


RUNS = {
    "ddp_sra": dict(wrap_sra=True, sra_first=True),
    "plain_sra": dict(wrap_sra=False, sra_first=False),
    "plain_sra_no_sync": dict(wrap_sra=False, sra_first=False, head_sync=False),
    "latent": dict(latent=True),
}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return spawn_ranks(train, RUNS, WORLD)


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_model_and_ddp_sra_stay_identical_across_ranks(ranks):
    r0, r1 = (r["ddp_sra"] for r in ranks)
    assert r0["step"] == r1["step"] == STEPS
    assert not torch.equal(r0["losses"], r1["losses"])  # the ranks did see different data
    assert identical(r0["model"], r1["model"]), "student differs between ranks"
    assert identical(r0["head"], r1["head"]), "head differs between ranks"
    assert identical(r0["teacher"], r1["teacher"]), "teacher differs between ranks"
    assert not r0["head_sync"]  # inside DDP(sra) the head's gradients are DDP's to average: not twice
    print(f"ddp: {WORLD} ranks x {STEPS} steps: student, head, teacher bit-identical; "
          f"SRA losses rank 0 {r0['losses'].tolist()}, rank 1 {r1['losses'].tolist()}")


@pytest.mark.slow
@pytest.mark.distributed
def test_bare_sra_keeps_head_and_teacher_identical_itself(ranks):
    """No DDP(sra): the head starts from rank 0's (each rank's differed) and its gradients are averaged."""
    r0, r1 = (r["plain_sra"] for r in ranks)
    assert not torch.equal(r0["losses"], r1["losses"])  # the ranks did see different data
    assert identical(r0["model"], r1["model"]) and identical(r0["head"], r1["head"])
    assert identical(r0["teacher"], r1["teacher"])
    assert r0["head_sync"] and r1["head_sync"]


@pytest.mark.slow
@pytest.mark.distributed
def test_without_head_sync_the_heads_drift_apart(ranks):
    r0, r1 = (r["plain_sra_no_sync"] for r in ranks)
    assert identical(r0["model"], r1["model"])  # DDP(model) alone keeps the student in step
    assert not identical(r0["head"], r1["head"])


@pytest.mark.distributed
def test_ddp_latent_alignment_stays_identical_and_weight_zero_steps_run_nothing(ranks):
    r0, r1 = (r["latent"] for r in ranks)
    assert identical(r0["model"], r1["model"]) and identical(r0["head"], r1["head"])
    assert r0["step"] == r1["step"] == STEPS and r0["reruns"] == r1["reruns"] == 0
    assert bool((r0["losses"][:2] > 0).all()) and bool((r0["losses"][2:] == 0).all())
    assert not torch.equal(r0["losses"][:2], r1["losses"][:2])  # different data per rank
