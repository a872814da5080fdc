"""sra-plugin: Self-Representation Alignment (arXiv 2505.02831) for any diffusion transformer, in one line."""

from .alignment import SelfRepresentationAlignment
from .noise import CosinePath, DDPMPath, LinearPath, NoiseGap
from .registry import Adapter, register_adapter, registered_adapters, resolve_adapter

from . import adapters as adapters  # registers the built-in adapters  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "SelfRepresentationAlignment",
    "NoiseGap",
    "LinearPath",
    "CosinePath",
    "DDPMPath",
    "Adapter",
    "register_adapter",
    "registered_adapters",
    "resolve_adapter",
    "__version__",
]
