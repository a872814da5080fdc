"""Built-in adapters, one module per backbone family; importing this package registers them.

Installed as ``sra_plugin.adapters``. Registration order matters only among adapters that match the
same model: a later registration wins. None of these modules imports its backbone's library:
diffusers and timm models are recognised by class, from the modules already loaded.
"""

from . import dit as dit  # noqa: F401
from . import uvit as uvit  # noqa: F401
from . import mmdit as mmdit  # noqa: F401
from . import timm_vit as timm_vit  # noqa: F401
from . import diffusers as diffusers  # noqa: F401
