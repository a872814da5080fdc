"""Small reference backbones that follow their upstream's names, structure and time convention."""

from .dit import DiT, DiT_models
from .sit import SiT, SiT_models

__all__ = ["DiT", "DiT_models", "SiT", "SiT_models"]
