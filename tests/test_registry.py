"""Registration: the declarative form and an ``Adapter`` subclass, exactly as the contract shows; a later
registration wins; ``adapter=`` overrides resolution; an unknown model gets a ``ValueError`` listing the
candidate block containers and a ``register_adapter(...)`` call that runs as printed."""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from examples.custom_backbone import RegisterNet, register, train
from sra_plugin import Adapter, SelfRepresentationAlignment, register_adapter, registered_adapters, resolve_adapter
from sra_plugin import registry


def step(model: nn.Module, sra: SelfRepresentationAlignment, layer_attr: str = "layers") -> Tensor:
    """One training forward and SRA call on digits-sized inputs; returns the SRA loss."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.full((4,), 0.7)
    s = torch.full((4,), 0.5)
    y = torch.randint(0, 10, (4,), generator=g)
    x_t, x_s = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise, (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
    model.train()
    model(x_t, t, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the training forward's capture must be used
        return sra(model, x_t, x_s, t, s, y)


def test_declarative_registration_as_in_the_contract() -> None:
    entry = register()  # examples/custom_backbone.py: matches=RegisterNet, blocks="layers", tokens=output[0][:, R:]
    model = RegisterNet(num_registers=3)
    assert resolve_adapter(model) is entry and entry.name == "register-net"
    assert entry.blocks(model) == list(model.layers)
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    assert sra.adapter is entry
    loss = step(model, sra)
    assert torch.isfinite(loss) and sra._capture.record is None
    # Tokens are the image tokens only: 16 patches of an 8x8 input, registers and the tuple's extra stripped.
    out = model.layers[0](torch.randn(2, 3 + 16, 64), torch.randn(2, 64))
    assert entry.tokens(out, model).shape == (2, 16, 64)
    loss.backward()
    assert model.layers[0].qkv.weight.grad is not None and model.layers[3].qkv.weight.grad is None


def test_declarative_registration_with_paths_forward_and_dim() -> None:
    class TwoStage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(1, 16)
            self.down = nn.ModuleList([nn.TransformerEncoderLayer(16, 2, 32, batch_first=True) for _ in range(2)])
            self.up = nn.ModuleList([nn.TransformerEncoderLayer(16, 2, 32, batch_first=True) for _ in range(3)])

        def forward(self, x: Tensor, noise_level: Tensor) -> Tensor:
            h = self.embed(x.flatten(2).transpose(1, 2)) + noise_level[:, None, None]
            for layer in [*self.down, *self.up]:
                h = layer(h)
            return h

    calls = []

    def forward(model: nn.Module, x: Tensor, t: Any, *args: Any, **kwargs: Any) -> Tensor:
        calls.append(t)
        return model(x, noise_level=t)

    entry = register_adapter("two-stage", matches=lambda m: isinstance(m, TwoStage), blocks=["down", "up"],
                             forward=forward, dim=16)
    model = TwoStage()
    assert entry.blocks(model) == [*model.down, *model.up]
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    x = torch.randn(2, 1, 4, 4)
    t, s = torch.tensor([0.9, 0.8]), torch.tensor([0.7, 0.6])
    model.train()
    model(x, t)
    loss = sra(model, x, x, t, s)
    assert torch.isfinite(loss) and calls[-1] is s  # the teacher went through `forward`


class RegistersAdapter(Adapter):
    """The subclass form, for RegisterNet."""

    name = "register-net-subclass"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, RegisterNet)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.layers)

    def tokens(self, output: Any, model: nn.Module) -> Tensor:
        return output[0][:, model.num_registers:]

    def forward(self, model: nn.Module, x: Tensor, t: Any, *args: Any, **kwargs: Any) -> Any:
        return model(x, t, *args, **kwargs)


def test_subclass_registration_and_later_wins() -> None:
    declared = register()
    subclass = register_adapter(RegistersAdapter())
    model = RegisterNet()
    assert registered_adapters()[0] is subclass
    assert resolve_adapter(model) is subclass  # registered later
    sra = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=3)
    assert sra.adapter is subclass and torch.isfinite(step(model, sra))
    again = register()  # registering the declaration again puts it first
    assert resolve_adapter(model) is again and again is not declared


def test_adapter_argument_overrides_resolution() -> None:
    register()
    subclass = register_adapter(RegistersAdapter())
    declared = register()  # newest: would win resolution
    model = RegisterNet()
    by_name = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=3, adapter="register-net-subclass")
    assert by_name.adapter is subclass
    by_name.remove()
    instance = RegistersAdapter()
    by_instance = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=3, adapter=instance)
    assert by_instance.adapter is instance and resolve_adapter(model) is declared
    with pytest.raises(ValueError, match="adapter='nope' is not registered"):
        SelfRepresentationAlignment(model, adapter="nope")
    with pytest.raises(TypeError, match="adapter=3"):
        SelfRepresentationAlignment(model, adapter=3)


def test_builtin_adapters_resolve_and_custom_ones_win_over_them() -> None:
    from examples.models import SiT

    model = SiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10)
    assert resolve_adapter(model).name == "dit"
    mine = register_adapter("my-sit", matches=SiT, blocks="blocks")
    assert resolve_adapter(model) is mine


class MadeUp(nn.Module):
    """An architecture no adapter knows; a list of projections beside its blocks, a stack of blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 2, stride=2)
        self.proj = nn.ModuleList([nn.Linear(16, 16) for _ in range(8)])
        self.trunk = nn.ModuleDict({"stack": nn.ModuleList([nn.TransformerEncoderLayer(16, 2, 32, batch_first=True) for _ in range(5)])})
        self.heads = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(2)])

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = self.stem(x).flatten(2).transpose(1, 2) + t[:, None, None]
        for layer in self.trunk["stack"]:
            h = layer(h)
        return h


def test_unknown_model_error_lists_candidates_and_prints_a_working_call() -> None:
    model = MadeUp()
    with pytest.raises(ValueError) as info:
        SelfRepresentationAlignment(model)
    message = str(info.value)
    assert message.startswith("model=MadeUp matches no registered adapter")
    blocks = message.split("Block lists, in the order the model defines them (path, count, block class):\n")[1].split("\nOther")[0]
    others = message.split("Other module lists, not proposed (projections, embeddings, text-only):\n")[1].split("\nDeclare")[0]
    # path, count, "x", class: composite blocks proposed; lists of bare layers listed, longest first, not proposed
    assert [line.split() for line in blocks.splitlines()] == [["trunk.stack", "5", "x", "TransformerEncoderLayer"]]
    assert [line.split() for line in others.splitlines()] == [["proj", "8", "x", "Linear"], ["heads", "2", "x", "Sequential"]]
    snippet = message.split("again:\n\n")[1]
    assert "blocks='trunk.stack'" in snippet and f"from {__name__} import MadeUp" in snippet
    # The printed call runs as is and makes the model usable.
    exec(re.sub(r"^    ", "", snippet, flags=re.M), {})
    assert resolve_adapter(model).name == "madeup"
    sra = SelfRepresentationAlignment(model, student_layer=2, teacher_layer=4)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    model.train()
    model(x, t)
    assert torch.isfinite(sra(model, x, x, t, t * 0.5))


def test_model_without_a_block_list_gets_told_to_declare_blocks() -> None:
    with pytest.raises(ValueError, match=r"(?s)No list of identical blocks.*register_adapter\('linear'"):
        SelfRepresentationAlignment(nn.Linear(3, 3))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (("x",), {"matches": RegisterNet}, r"needs \['blocks'\]"),
        (("x",), {"matches": RegisterNet, "blocks": "layers", "token": None}, r"unexpected keyword argument 'token'"),
        (("x",), {"matches": 3, "blocks": "layers"}, "matches=3 is not accepted"),
        (("x",), {"matches": RegisterNet, "blocks": 7}, "blocks=7 is not accepted"),
        (("x",), {"matches": RegisterNet, "blocks": "layers", "tokens": "output"}, "tokens='output' is not accepted"),
        (("",), {"matches": RegisterNet, "blocks": "layers"}, "name='' is not accepted"),
        ((RegistersAdapter(),), {"blocks": "layers"}, "pass one or the other"),
        ((42,), {}, "register_adapter got 42"),
    ],
)
def test_registration_mistakes_are_type_errors(args: tuple, kwargs: dict, match: str) -> None:
    before = list(registry._REGISTRY)
    with pytest.raises(TypeError, match=match):
        register_adapter(*args, **kwargs)
    assert registry._REGISTRY == before


def test_custom_backbone_example_trains() -> None:
    log = train(steps=4, batch=8, log_every=2)
    assert [row["step"] for row in log] == [2, 4]
    assert all(row["loss"] > 0 and row["diff_loss"] > 0 for row in log)
