"""sra-plugin: Self-Representation Alignment (arXiv 2505.02831) for any diffusion transformer, in one line."""

from .alignment import SelfRepresentationAlignment
from .latent import LatentAlignment
from .layersync import LayerSync
from .dispersive import Dispersive
from .repa import REPA
from .irepa import IREPA
from .sradts import SRADTS
from .noise import CosinePath, DDPMPath, LinearPath, NoiseGap, flow_teacher_input
from .registry import Adapter, register_adapter, registered_adapters, resolve_adapter
from .wrappers import ModelWithHeads
from . import schedules
from . import adapters  # registers the built-in adapters

__version__ = "0.3.0"
"""The version of this package (the one in pyproject.toml)."""

__all__ = [
    "SelfRepresentationAlignment",
    "LatentAlignment",
    "LayerSync",
    "Dispersive",
    "REPA",
    "IREPA",
    "SRADTS",
    "NoiseGap",
    "LinearPath",
    "CosinePath",
    "DDPMPath",
    "flow_teacher_input",
    "Adapter",
    "register_adapter",
    "registered_adapters",
    "resolve_adapter",
    "ModelWithHeads",
    "schedules",
    "__version__",
]
