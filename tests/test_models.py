"""The reference backbones keep their upstream's sizes, names and conventions."""

import pytest
import torch

from examples.models import DiT, DiT_models, SiT, SiT_models
from tests._models import TINY


@pytest.mark.parametrize("name, depth, hidden, heads", [("XL", 28, 1152, 16), ("L", 24, 1024, 16), ("B", 12, 768, 12), ("S", 12, 384, 6)])
def test_presets_have_upstream_sizes(name, depth, hidden, heads, monkeypatch):
    seen = {}
    monkeypatch.setattr(SiT, "__init__", lambda self, **kw: seen.update(kw) or None)
    SiT_models[f"SiT-{name}/2"]()
    assert (seen["depth"], seen["hidden_size"], seen["num_heads"], seen["patch_size"]) == (depth, hidden, heads, 2)
    assert set(DiT_models) == {f"DiT-{s}/{p}" for s in ("XL", "L", "B", "S") for p in (2, 4, 8)}


def test_dit_learns_sigma_and_sit_predicts_velocity_only():
    x = torch.randn(2, 4, 8, 8)
    dit, sit = DiT(**TINY), SiT(**TINY)
    assert dit(x, torch.tensor([10, 999]), torch.tensor([1, 2])).shape == (2, 8, 8, 8)
    assert sit(x, torch.tensor([0.1, 0.9]), torch.tensor([1, 2])).shape == (2, 4, 8, 8)
    for model in (dit, sit):
        for name in ("x_embedder", "t_embedder", "y_embedder", "pos_embed", "blocks", "final_layer"):
            assert hasattr(model, name)


def test_label_dropout_uses_the_null_id():
    model = SiT(**TINY, class_dropout_prob=1.0)
    seen = []
    model.y_embedder.embedding_table.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    model.train()(torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3]))
    model.eval()(torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 3]))
    assert seen[0].tolist() == [10, 10, 10] and seen[1].tolist() == [1, 2, 3]
