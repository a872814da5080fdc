"""LayerSync and Dispersive on every built-in backbone (tests/test_adapters.py's cases) and every
diffusers family (tests/test_diffusers_families.py's tiny configs): both read the user's training
forward (no block runs again), equal the hand computation on that forward's image tokens, and
LayerSync's gradient reaches blocks up to its student block only."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sra_plugin import Dispersive, LayerSync, resolve_adapter
from sra_plugin.registry import ModelCall
from tests import test_adapters as builtin
from tests import test_diffusers_families as fam
from tests._models import has_grad


def builtin_case(name: str):
    case = builtin.CASES[name]
    model = case.build().train()
    x_t, _, _, t, _, args, kwargs = builtin.inputs(case)
    return model, x_t, t, args, kwargs, lambda: case.call(model, x_t, t, args, kwargs)


def diffusers_case(name: str):
    case = fam.CASES[name]
    model = case.build().train()
    _, x_t, _, t, _, cond = fam.inputs(case)
    return model, x_t, t, (), cond, lambda: fam.call(case, model, x_t, t, cond)


CASES = {**{f"builtin:{n}": (builtin_case, n) for n in builtin.CASES}, **{f"diffusers:{n}": (diffusers_case, n) for n in fam.CASES}}


@pytest.mark.parametrize("name", list(CASES))
def test_layersync_and_dispersive_on_every_family(name: str) -> None:
    build, key = CASES[name]
    model, x_t, t, args, kwargs, train_forward = build(key)
    adapter = resolve_adapter(model)
    blocks = adapter.blocks(model)
    depth = len(blocks)
    student, target = (1, depth) if depth <= 3 else (2, depth - 1)
    ls = LayerSync(model, student, target)
    disp = Dispersive(model, layer=student)

    # Our own record of the training forward: its inputs and every block's output.
    calls, outputs, counts = [], {}, [0] * depth
    handles = [model.register_forward_pre_hook(lambda m, a, k: calls.append(ModelCall(a, k)), with_kwargs=True)]
    for i, block in enumerate(blocks):
        def keep(module, a, output, i=i):
            counts[i] += 1
            outputs.setdefault(i + 1, output)
        handles.append(block.register_forward_hook(keep))
    train_forward()
    assert counts == [1] * depth
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a re-run would warn
        a = ls(model, x_t, t, *args, **kwargs)
        b = disp(model, x_t, t, *args, **kwargs)
    assert counts == [1] * depth  # neither objective ran a block again
    for h in handles:
        h.remove()
    tokens = {k: adapter.tokens(outputs[k], model, calls[0]) for k in (student, target)}
    cos = F.cosine_similarity(tokens[student].float(), tokens[target].float(), dim=-1)
    torch.testing.assert_close(a, 0.2 * (1 - cos).mean(), rtol=1e-4, atol=1e-6)
    z = tokens[student].detach().double().flatten(1)
    pairs = torch.cdist(z, z).pow(2) / z.shape[1]
    want = 0.25 * (torch.logsumexp(-pairs.flatten(), 0) - math.log(z.shape[0] ** 2))  # the release recipe's weight
    assert float(b.detach()) == pytest.approx(float(want), rel=1e-4, abs=1e-6)
    assert (ls.student_reruns, disp.student_reruns) == (0, 0)

    a.backward()
    for k, block in enumerate(blocks, start=1):
        if k > student:
            assert not has_grad(block), f"block {k} got LayerSync gradient through the detached target"
    assert has_grad(blocks[student - 1])


@pytest.mark.parametrize("name", list(CASES))
def test_repa_on_every_family_right_or_loud(name: str) -> None:
    """REPA with a random timm ViT of a 4x4 patch grid: on every image family (16 image tokens) the loss is
    the hand computation on the training forward's tokens; on the video families (32 tokens over 2 frames,
    no 2-D grid to resize the encoder's to) the call is refused with a ValueError."""
    import timm

    from sra_plugin import REPA

    build, key = CASES[name]
    model, x_t, t, args, kwargs, train_forward = build(key)
    adapter = resolve_adapter(model)
    torch.manual_seed(3)
    encoder = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, embed_dim=8, depth=1, num_heads=2, num_classes=0)
    images = torch.randn(x_t.shape[0], 3, 16, 16, generator=torch.Generator().manual_seed(4))
    repa = REPA(model, encoder, layer=1, projector_dim=8)
    calls, outputs = [], {}
    handles = [model.register_forward_pre_hook(lambda m, a, k: calls.append(ModelCall(a, k)), with_kwargs=True),
               adapter.blocks(model)[0].register_forward_hook(lambda m, a, o: outputs.setdefault(1, o))]
    train_forward()
    for h in handles:
        h.remove()
    tokens = adapter.tokens(outputs[1], model, calls[0])
    if tokens.shape[1] != 16 and x_t.dim() != 4:
        with pytest.raises(ValueError, match="resizing the encoder's grid needs 2-D inputs"):
            repa(model, x_t, t, *args, images=images, **kwargs)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = repa(model, x_t, t, *args, images=images, **kwargs)
    with torch.no_grad():
        target = encoder.eval().forward_features(images)[:, encoder.num_prefix_tokens:]
    assert target.shape[1] == tokens.shape[1] == 16  # every image family here has a 4x4 grid (resizing: tests/test_repa.py)
    want = 0.5 * (1 - F.cosine_similarity(repa.head(tokens.float()), target, dim=-1)).mean()
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-6)
    assert repa.student_reruns == 0 and all(p.grad is None for p in encoder.parameters())
