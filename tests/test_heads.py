import pytest
import torch
from torch import nn

from sra_plugin.heads import MLPHead, build_head


def test_mlp_head_is_the_papers_shape():
    head = build_head("mlp", 32, 48)
    assert isinstance(head, MLPHead)
    layers = list(head)
    assert isinstance(layers[0], nn.Linear) and (layers[0].in_features, layers[0].out_features) == (32, 80)
    assert isinstance(layers[1], nn.SiLU)
    assert isinstance(layers[2], nn.Linear) and (layers[2].in_features, layers[2].out_features) == (80, 48)
    assert head(torch.randn(2, 5, 32)).shape == (2, 5, 48)


def test_linear_identity_and_module_heads():
    assert isinstance(build_head("linear", 8, 4), nn.Linear)
    assert isinstance(build_head("identity", 8, 8), nn.Identity)
    mine = nn.Linear(8, 8)
    assert build_head(mine, 8, 8) is mine


def test_bad_heads_raise():
    with pytest.raises(ValueError, match="head='identity'"):
        build_head("identity", 8, 4)
    with pytest.raises(ValueError, match="head='conv'"):
        build_head("conv", 8, 8)
