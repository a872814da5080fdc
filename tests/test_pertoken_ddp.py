"""DDP with per-token time (``SRADTS(separate=False)``): two CPU processes with the gloo backend, different
initial weights and data per rank. The student's pass runs through ``DDP(model)``'s forward, so after several
steps student, head and teacher are identical on both ranks, with ``DDP(dts)`` and with ``dts`` bare (it then
keeps its head in step itself). Called with the bare model instead of the wrapper, the students drift apart
(so the check can fail)."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from tests._models import identical, spawn_ranks

WORLD, STEPS = 2, 3

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")


def train(rank: int, wrap_dts: bool, through_wrapper: bool = True) -> dict:
    import warnings

    from sra_plugin import SRADTS
    from tests._models import tiny_sit

    model = tiny_sit(seed=rank, depth=4)  # different weights per rank: DDP must broadcast rank 0's
    ddp_model = DDP(model)
    dts = SRADTS(model, separate=False, student_layer=2, teacher_layer=3, ema_decay=0.5)
    with torch.no_grad():
        for p in dts.head.parameters():
            p.add_(0.1 * rank)
    dts_call = DDP(dts) if wrap_dts else dts
    opt = torch.optim.AdamW([*ddp_model.parameters(), *dts.head.parameters()], lr=1e-3)
    losses, warned = [], []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * step + rank)  # different data and draws per rank
        x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
        y = torch.randint(0, 10, (4,), generator=g)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pred, align = dts_call(ddp_model if through_wrapper else model, x0, noise, y, generator=g)
        warned += [str(w.message) for w in caught]
        (F.mse_loss(pred, noise - x0) + align).backward()
        opt.step()
        opt.zero_grad()
        dts.update_teacher()
        losses.append(align.detach())
    return {"model": model.state_dict(), "head": dts.head.state_dict(), "teacher": dts.teacher.state_dict(),
            "step": dts.step, "losses": torch.stack(losses), "warned": warned}


RUNS = {
    "ddp_dts": dict(wrap_dts=True),
    "bare_dts": dict(wrap_dts=False),
    "bare_model": dict(wrap_dts=True, through_wrapper=False),
}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return spawn_ranks(train, RUNS, WORLD)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("run", ["ddp_dts", "bare_dts"])
def test_per_token_sradts_under_ddp_stays_identical_across_ranks(ranks, run):
    r0, r1 = (r[run] for r in ranks)
    assert r0["step"] == r1["step"] == STEPS
    assert not torch.equal(r0["losses"], r1["losses"])  # the ranks did see different data
    assert identical(r0["model"], r1["model"]), "student differs between ranks"
    assert identical(r0["head"], r1["head"]), "head differs between ranks"
    assert identical(r0["teacher"], r1["teacher"]), "teacher differs between ranks"
    assert r0["warned"] == r1["warned"] == []


@pytest.mark.slow
@pytest.mark.distributed
def test_called_with_the_bare_model_the_students_drift_apart(ranks):
    r0, r1 = (r["bare_model"] for r in ranks)
    assert not identical(r0["model"], r1["model"])
    assert len(r0["warned"]) == 1 and "pass the wrapper" in r0["warned"][0]  # said once, not silent
