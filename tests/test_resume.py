"""Resume: save model, sra and optimizer, rebuild from scratch, load with ``weights_only=True``, and
the next steps are bit-identical on CPU. A state dict of another configuration fails with a clear
error before anything changes. Security: no network access and no unsafe ``torch.load`` in the
package or the examples."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sra_plugin import SelfRepresentationAlignment
from sra_plugin.student import decode_state, encode_state
from tests._models import flow_batch, tiny_sit

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, SAVE_AT = 6, 3


def build(seed: int, **sra_kwargs):
    model = tiny_sit(seed=seed)  # label dropout on: the global RNG matters and is seeded per step
    kwargs = dict(student_layer=2, teacher_layer=4, ema_decay=0.9, **sra_kwargs)
    sra = SelfRepresentationAlignment(model, **kwargs)
    opt = torch.optim.AdamW([*model.parameters(), *sra.head.parameters()], lr=1e-3, weight_decay=0.01)
    return model, sra, opt


def train_step(model, sra, opt, step: int) -> torch.Tensor:
    torch.manual_seed(1000 + step)  # what a resumable loop does: the step decides every random draw
    x_t, x_s, t, s, y, target = flow_batch(4, step)
    pred = model(x_t, t, y)
    loss = F.mse_loss(pred, target) + sra(model, x_t, x_s, t, s, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sra.update_teacher()
    return loss.detach()


def states(model, sra, opt) -> dict[str, dict]:
    return {"model": model.state_dict(), "sra": sra.state_dict(), "optimizer": opt.state_dict()}


def assert_bit_identical(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_bit_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_bit_identical(u, v, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_is_bit_identical(tmp_path):
    model, sra, opt = build(seed=0)
    straight = [train_step(model, sra, opt, step) for step in range(STEPS)]
    final = states(model, sra, opt)

    model, sra, opt = build(seed=0)
    first = [train_step(model, sra, opt, step) for step in range(SAVE_AT)]
    torch.save(states(model, sra, opt), tmp_path / "ckpt.pt")
    del model, sra, opt

    model, sra, opt = build(seed=123)  # from scratch: other weights, other head, fresh EMA, step 0
    assert sra.step == 0
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    sra.load_state_dict(checkpoint["sra"])
    opt.load_state_dict(checkpoint["optimizer"])
    assert sra.step == SAVE_AT
    rest = [train_step(model, sra, opt, step) for step in range(SAVE_AT, STEPS)]

    assert_bit_identical(first + rest, straight, "losses")
    assert_bit_identical(states(model, sra, opt), final, "state")
    assert len({float(x) for x in straight}) == STEPS  # the steps did differ from one another


def test_sra_state_carries_step_and_identity():
    model, sra, opt = build(seed=0)
    for step in range(2):
        train_step(model, sra, opt, step)
    state = sra.state_dict()
    assert state["_extra_state"].dtype == torch.uint8  # every checkpoint writer takes it, safetensors included
    assert decode_state(state["_extra_state"]) == {
        "step": 2, "steps_from_updates": True, "student_layer": 2, "teacher_layer": 4, "depth": 6, "head": "mlp", "owned_teacher": True, "shared_teacher": False,
    }
    assert {k.split(".")[0] for k in state} == {"_extra_state", "head", "ema"}


def _snapshot(sra: SelfRepresentationAlignment) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sra.state_dict().items()}


@pytest.mark.parametrize(
    "saved,here,words",
    [
        (dict(student_layer=2), dict(student_layer=3), ["student_layer: saved 2, here 3"]),
        (dict(teacher_layer=4), dict(teacher_layer=5), ["teacher_layer: saved 4, here 5"]),
        (dict(head="linear"), dict(head="mlp"), ["head: saved 'linear', here 'mlp'"]),
        (dict(teacher="user"), dict(), ["owned_teacher: saved False, here True"]),
        (dict(head=nn.Sequential(nn.Linear(32, 48), nn.SiLU(), nn.Linear(48, 32))),
         dict(head=nn.Sequential(nn.Linear(32, 16), nn.SiLU(), nn.Linear(16, 32))),
         ["head.0.weight", "(48, 32)", "(16, 32)"]),
    ],
    ids=["student-layer", "teacher-layer", "head-kind", "teacher-kind", "head-shape"],
)
def test_state_of_another_configuration_fails_before_anything_changes(tmp_path, saved, here, words):
    def make(seed, kwargs):
        model = tiny_sit(seed=seed)
        if kwargs.get("teacher") == "user":
            kwargs = {**kwargs, "teacher": tiny_sit(seed=seed + 1)}
        return SelfRepresentationAlignment(model, **{"student_layer": 2, "teacher_layer": 4, **kwargs})

    source = make(0, saved)
    source.step = 9
    torch.save(source.state_dict(), tmp_path / "sra.pt")
    target = make(5, here)
    target.step = 1
    before = _snapshot(target)
    with pytest.raises(ValueError) as info:
        target.load_state_dict(torch.load(tmp_path / "sra.pt", weights_only=True))
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"
    assert target.step == 1
    assert_bit_identical(_snapshot(target), before, "unchanged")


def test_state_without_sra_identity_is_refused():
    model, sra, _ = build(seed=0)
    for wrong in ({"student_layer": 2}, torch.tensor([1, 2, 3], dtype=torch.uint8), torch.zeros(3), encode_state({"x": 1})):
        with pytest.raises(ValueError, match="no extra state of a SelfRepresentationAlignment"):
            sra.set_extra_state(wrong)
    assert sra.step == 0


def test_resume_under_accumulation_reads_the_schedule_at_the_saved_step():
    """The step rule's state is saved: after a resume, the micro-batches of an optimizer step read the
    schedule's weight at that step, as in the run that was not interrupted."""
    def run(sra, model, opt, steps: range) -> list[float]:
        weights = []
        for step in steps:
            for micro in range(2):
                torch.manual_seed(1000 + 2 * step + micro)
                x_t, x_s, t, s, y, target = flow_batch(2, 2 * step + micro)
                (F.mse_loss(model(x_t, t, y), target) + sra(model, x_t, x_s, t, s, y)).backward()
                weights.append(sra.metrics["weight"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            sra.update_teacher()
        return weights

    schedule = lambda step: 0.1 * (step + 1)  # noqa: E731
    model, sra, opt = build(seed=0, weight=schedule)
    straight = run(sra, model, opt, range(3))
    model, sra, opt = build(seed=0, weight=schedule)
    first = run(sra, model, opt, range(2))
    saved = states(model, sra, opt)
    model, sra, opt = build(seed=5, weight=schedule)
    model.load_state_dict(saved["model"]), sra.load_state_dict(saved["sra"]), opt.load_state_dict(saved["optimizer"])
    rest = run(sra, model, opt, range(2, 3))
    # before the first update_teacher() each call counts a step (the rule); after it, only updates do
    assert first + rest == straight == pytest.approx([0.1, 0.2, 0.2, 0.2, 0.3, 0.3])
    assert sra.step == 3


def test_state_saved_by_0_2_with_a_dict_extra_state_still_loads():
    model, sra, opt = build(seed=0)
    for step in range(2):
        train_step(model, sra, opt, step)
    old = {**sra.state_dict(), "_extra_state": decode_state(sra.state_dict()["_extra_state"])}  # 0.2.0 wrote a dict
    _, fresh, _ = build(seed=1)
    fresh.load_state_dict(old)
    assert fresh.step == 2
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in old.items() if k != "_extra_state")


# ---------------------------------------------------------------- security
NETWORK_MODULES = {"urllib", "http", "requests", "httpx", "aiohttp", "ftplib", "smtplib",
                   "huggingface_hub", "urllib3", "webbrowser"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}  # a socket bound here (a free port for gloo) stays on the machine
NETWORK_CALLS = {"load_state_dict_from_url", "download_url_to_file", "hf_hub_download", "snapshot_download",
                 "from_pretrained", "urlopen", "urlretrieve", "load_dataset", "fetch_openml"}


def _sources() -> list[pathlib.Path]:
    files = [p for d in ("sra_plugin", "adapters", "examples", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    assert len(files) >= 10
    return files


def _call_name(node: ast.Call) -> str:
    f = node.func
    if isinstance(f, ast.Attribute):
        base = f.value.id if isinstance(f.value, ast.Name) else ""
        return f"{base}.{f.attr}" if base else f.attr
    return f.id if isinstance(f, ast.Name) else ""


def _problems(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for mod in mods:
                if mod.split(".")[0] in NETWORK_MODULES:
                    found.append(f"{name}:{node.lineno} imports {mod}")
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "hub" for a in node.names):
                found.append(f"{name}:{node.lineno} imports torch.hub")
        elif isinstance(node, ast.Call):
            call = _call_name(node)
            if call.split(".")[-1] in NETWORK_CALLS or call.startswith("hub.") or call.split(".")[-1].startswith("fetch_"):
                found.append(f"{name}:{node.lineno} calls {call}")
            if call.split(".")[-1] in {"connect", "create_connection", "sendto"}:
                found.append(f"{name}:{node.lineno} calls {call}")
            if call.split(".")[-1] == "bind" and node.args:
                address = node.args[0].elts[0] if isinstance(node.args[0], ast.Tuple) and node.args[0].elts else None
                if not (isinstance(address, ast.Constant) and address.value in LOOPBACK):
                    found.append(f"{name}:{node.lineno} binds a socket beyond loopback")
            if call.split(".")[-1] == "load" and call.split(".")[0] in {"torch", "load"}:
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    found.append(f"{name}:{node.lineno} calls {call} without weights_only=True")
        elif isinstance(node, ast.Attribute) and node.attr == "hub" and isinstance(node.value, ast.Name) and node.value.id == "torch":
            found.append(f"{name}:{node.lineno} uses torch.hub")
    return found


def test_scanner_finds_what_it_looks_for():
    bad = (
        "import urllib.request\nimport torch\nfrom huggingface_hub import hf_hub_download\n"
        "torch.load('a.pt')\ntorch.load('a.pt', weights_only=False)\ntorch.hub.load('x', 'y')\n"
        "m = Model.from_pretrained('org/name')\nfrom sklearn.datasets import fetch_lfw_people\nfetch_lfw_people()\n"
        "sock.connect(('example.org', 80))\nsock.bind(('0.0.0.0', 0))\n"
    )
    assert len(_problems(bad, "bad")) == 10
    ok = "import torch, socket\nstate = torch.load(p, map_location='cpu', weights_only=True)\nsock.bind(('127.0.0.1', 0))\n"
    assert _problems(ok, "ok") == []


def test_no_network_and_only_weights_only_loads():
    problems = [p for path in _sources() for p in _problems(path.read_text(), str(path.relative_to(ROOT)))]
    assert problems == []


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_extra_state_keeps_its_shape_as_the_step_grows_and_loads_with_distributed_checkpoint(tmp_path):
    """torch.distributed.checkpoint (FSDP2's and accelerate's sharded checkpoints) loads into tensors of
    the saved shapes: the extra state's shape must not change from step 9 to step 10."""
    import torch.distributed.checkpoint as dcp

    model, sra, opt = build(seed=0)
    for step in range(2):
        train_step(model, sra, opt, step)
    assert sra.state_dict()["_extra_state"].shape == build(seed=0)[1].state_dict()["_extra_state"].shape
    dcp.save(sra.state_dict(), checkpoint_id=str(tmp_path), no_dist=True)
    _, fresh, _ = build(seed=1)
    fresh.step = 12345  # a longer number than the saved 2
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path), no_dist=True)
    fresh.load_state_dict(state)
    assert fresh.step == 2
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sra.state_dict().items())
