"""Does a stopped SRA pass leave diffusers' LoRA scaling changed? Flux + peft LoRA, called with
``joint_attention_kwargs={"scale": 0.5}``; prints every LoRA layer's scaling after each of three
``sra(...)`` calls and how far the next plain forward moved. diffusers 0.30 unscales after the last
block without ``finally``, so without the restore the scaling halves per call (1.0, 0.5, 0.25, 0.125).

    PYTHONPATH=. python benchmarks/lora_scale_stopped_pass.py     # in an env with the diffusers to check

Flux's ``img_ids``/``txt_ids`` are given with a batch axis, the form 0.30 needs (later versions accept it)."""
import diffusers
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from sra_plugin import SelfRepresentationAlignment
torch.set_num_threads(1)
torch.manual_seed(0)
model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
sra = SelfRepresentationAlignment(model, student_layer=1, teacher_layer=3)
g = torch.Generator().manual_seed(0)
x_t, x_s = torch.randn(2, 16, 4, generator=g), torch.randn(2, 16, 4, generator=g)
grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3)
cond = dict(encoder_hidden_states=torch.randn(2, 3, 16, generator=g), pooled_projections=torch.randn(2, 8, generator=g),
            img_ids=grid.expand(2, 16, 3), txt_ids=torch.zeros(2, 3, 3), joint_attention_kwargs={"scale": 0.5}, return_dict=False)
t, s = torch.tensor([0.7, 0.5]), torch.tensor([0.6, 0.4])


def scal() -> list[float]:
    return sorted({m.scaling["default"] for m in model.modules() if isinstance(m, BaseTunerLayer)})


with torch.no_grad():
    ref = model(x_t, timestep=t, **cond)[0]
print("diffusers", diffusers.__version__, "scaling before", scal())
for i in range(3):
    model(x_t, timestep=t, **cond)
    sra(model, x_t, x_s, t, s, **cond)
    print(" after sra call", i + 1, scal())
with torch.no_grad():
    out = model(x_t, timestep=t, **cond)[0]
print("next forward max |diff| vs before:", float((out - ref).abs().max()))
