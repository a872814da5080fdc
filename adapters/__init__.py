"""Built-in adapters, one module per backbone family; importing this package registers them.

Installed as ``sra_plugin.adapters``. Registration order matters only among adapters that match the
same model: a later registration wins.
"""

from . import dit as dit  # noqa: F401
