"""sra-plugin: Self-Representation Alignment (arXiv 2505.02831) for any diffusion transformer, in one line."""

from .alignment import SelfRepresentationAlignment
from .latent import LatentAlignment
from .layersync import LayerSync
from .dispersive import Dispersive
from .repa import REPA
from .sradts import SRADTS
from .noise import CosinePath, DDPMPath, LinearPath, NoiseGap, flow_teacher_input
from .registry import Adapter, register_adapter, registered_adapters, resolve_adapter
from .wrappers import ModelWithHeads
from . import schedules


def _import_adapters():
    """Import (and so register) the built-in adapters.

    Installed, ``adapters/`` is the subpackage ``sra_plugin.adapters``. In a source checkout (the
    repository root on ``sys.path``, e.g. ``python benchmarks/overhead.py``) this directory shadows
    the installed package and ``adapters/`` sits beside it: load it from there under the same name.
    """
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    name = __name__ + ".adapters"
    source = Path(__file__).resolve().parent.parent / "adapters" / "__init__.py"
    if name in sys.modules or not source.is_file():
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(name, source, submodule_search_locations=[str(source.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


adapters = _import_adapters()  # registers the built-in adapters

__version__ = "0.3.0"
"""The version of this package (the one in pyproject.toml)."""

__all__ = [
    "SelfRepresentationAlignment",
    "LatentAlignment",
    "LayerSync",
    "Dispersive",
    "REPA",
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
