"""Small reference backbones that follow their upstream's names, structure and time convention."""

from .dit import DiT, DiT_models
from .mmdit import MMDiT
from .sit import SiT, SiT_models
from .uvit import UViT, UViTT2I

__all__ = ["DiT", "DiT_models", "SiT", "SiT_models", "UViT", "UViTT2I", "MMDiT"]
