"""The package's shape (issue 28): each method is a short file resting on the one target protocol.

Code lines are the lines that hold a token of code: blank lines, comments and docstrings (a string
that is a statement of its own) are not counted.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sra_plugin"
LIMITS = {"alignment": 80, "latent": 100, "layersync": 100, "dispersive": 100, "repa": 100, "irepa": 60, "sradts": 100}
PROTOCOL = "sra_plugin.targets"


def code_lines(source: str) -> int:
    """How many lines of ``source`` hold code, docstrings, comments and blank lines left out."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in (tokenize.COMMENT, tokenize.NL)]
    statement_start = (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    lines: set[int] = set()
    for i, tok in enumerate(tokens):
        if tok.type in (*statement_start, tokenize.ENDMARKER):
            continue
        before = tokens[i - 1].type if i else tokenize.NEWLINE
        after = tokens[i + 1].type if i + 1 < len(tokens) else tokenize.ENDMARKER
        if tok.type == tokenize.STRING and before in statement_start and after in (tokenize.NEWLINE, tokenize.ENDMARKER):
            continue  # a docstring (or any bare string statement)
        lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines)


def imported_modules(path: Path) -> set[str]:
    """The absolute names of the modules ``path`` (a module of sra_plugin) imports from."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = "sra_plugin" if node.level == 1 else ""
            found.add(f"{base}.{node.module}" if base and node.module else (node.module or base))
            found.update(f"{base}.{alias.name}" for alias in node.names if base and not node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_counter_leaves_out_docstrings_comments_and_blank_lines():
    source = '"""Module\ndoc."""\n\n# a comment\nx = 1  # trailing\n\n\ndef f():\n    """Doc."""\n    return """not a\ndocstring"""\n'
    assert code_lines(source) == 4  # x = 1; def f():; the two lines of the returned string


@pytest.mark.parametrize("name", list(LIMITS))
def test_each_method_file_is_short(name):
    count = code_lines((PACKAGE / f"{name}.py").read_text())
    print(f"{name}.py: {count} code lines (limit {LIMITS[name]})")
    assert count < LIMITS[name], f"sra_plugin/{name}.py has {count} code lines; the limit is under {LIMITS[name]}"


@pytest.mark.parametrize("name", list(LIMITS))
def test_each_method_rests_on_the_target_protocol(name):
    assert PROTOCOL in imported_modules(PACKAGE / f"{name}.py"), f"sra_plugin/{name}.py does not import {PROTOCOL}"


def test_no_method_module_imports_the_teacher_directly():
    """Teacher code lives behind the target protocol (``targets.TeacherTarget``, ``targets.SelfTeaching``)."""
    assert not [name for name in LIMITS if "sra_plugin.teacher" in imported_modules(PACKAGE / f"{name}.py")]


# ---------------------------------------------------------------- a new method is a config, a target and a forward
def test_a_new_method_is_a_config_a_target_and_a_forward():
    """What adding a method takes, as a test: a config dataclass, ``_setup`` once, ``_make_target``, ``forward``.
    This one aligns block 2 through an MLP head to block 4 of the same forward, detached."""
    from dataclasses import dataclass

    import torch
    import torch.nn.functional as F

    from sra_plugin.config import MethodConfig, option, shown
    from sra_plugin.student import Objective, decode_state, resolve_objective
    from sra_plugin.targets import TapTarget
    from tests._models import flow_batch, tiny_sit

    @dataclass(frozen=True)
    class DeeperConfig(MethodConfig):
        layer: int = option()
        target_layer: int = option()
        loss: str = shown()

    class Deeper(Objective):
        def __init__(self, model, layer=2, target_layer=4, weight=0.5, loss="cosine"):
            super().__init__()
            student, adapter, blocks, at, weight = resolve_objective(model, None, weight, layer=layer, target_layer=target_layer)
            dims = (adapter.dim(student, blocks[at["layer"] - 1]), adapter.dim(student, blocks[at["target_layer"] - 1]))
            self._setup(student, adapter, DeeperConfig(at["layer"], at["target_layer"], loss), {"student": at["layer"], "target": at["target_layer"]},
                        head="mlp", dims=dims, loss=loss, weight=weight, check_finite=False)

        def _make_target(self):
            return TapTarget("target", self.target_layer, detach=True)

        def forward(self, model, x_t, t, *args, **kwargs):
            return self._run(model, x_t, t, args, kwargs)

    model = tiny_sit(class_dropout_prob=0.0)
    deeper = Deeper(model)
    seen = {}
    for k in (2, 4):
        model.blocks[k - 1].register_forward_hook(lambda m, a, o, k=k: seen.__setitem__(k, o))
    x_t, _, t, _, y, _ = flow_batch()
    model(x_t, t, y)
    loss = deeper(model, x_t, t, y)
    want = 0.5 * (1 - F.cosine_similarity(deeper.head(seen[2]), seen[4].detach(), dim=-1)).mean()
    torch.testing.assert_close(loss, want)
    assert deeper.metrics["student_reruns"] == 0  # the user's forward fed both taps
    assert "layer=2, target_layer=4, loss='cosine'" in repr(deeper)
    state = deeper.state_dict()
    assert {"layer": 2, "target_layer": 4}.items() <= decode_state(state["_extra_state"]).items()
    with pytest.raises(ValueError, match="target_layer: saved 4, here 5"):
        Deeper(model, target_layer=5).load_state_dict(state)


# ---------------------------------------------------------------- teacher kinds
@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_change_of_teacher_kind_is_a_new_object_and_the_saved_identity_has_no_side_effect(one_process_group):
    """An owned EMA built before ZeRO-3 partitioned the model (faked here, one process) becomes a ``ShardedEMA``
    when it is next used or saved: a new object, the old one left as it was; reading the extra state (the
    saved identity) alone changes nothing."""
    import torch

    from sra_plugin import SelfRepresentationAlignment
    from sra_plugin.student import decode_state
    from sra_plugin.teacher import OwnedCopy, ShardedEMA
    from tests._models import tiny_sit

    model = tiny_sit(seed=0, depth=4)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=3)
    owned = sra.ema
    assert type(owned) is OwnedCopy
    for p in model.parameters():  # what ZeRO-3 leaves on a parameter, as far as sra_plugin.zero reads it
        p.ds_id, p.ds_status, p.ds_shape, p.ds_tensor = 0, "NOT_AVAILABLE", p.shape, p.detach().reshape(-1).clone()
    identity = decode_state(sra.get_extra_state())
    assert sra.ema is owned and "zero3_slice_of_rank" not in identity and not identity["shared_teacher"]
    state = sra.state_dict()
    assert type(sra.ema) is ShardedEMA and type(owned) is OwnedCopy and owned.model is not None
    assert decode_state(state["_extra_state"])["zero3_slice_of_rank"] == "rank 0 of 1"
    assert not any(k.startswith("ema.model.") for k in state)
    for name in owned.names:  # each trainable parameter: this rank's slice (one process: all of it), exactly
        assert torch.equal(state[f"ema.ema.{name.replace('.', '-')}"], owned.values()[name].detach().reshape(-1)), name
