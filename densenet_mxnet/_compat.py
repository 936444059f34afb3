"""Import MXNet 1.9.1 beside numpy 1.24+: the one place that restores the numpy aliases it uses.

numpy 1.24 removed the deprecated aliases ``numpy.bool`` and ``numpy.int`` (plain ``bool`` and
``int``); MXNet 1.9.1, the last release, still reads ``numpy.bool`` at import time. We add an
alias only where numpy does not define the name, so a numpy that has it keeps its own. Importing
``mxnet`` first fails (``module 'numpy' has no attribute 'bool'``); importing this package after
such a failure still works.
"""

from __future__ import annotations

import sys

import numpy as np

_REMOVED_ALIASES = {"bool": bool, "int": int}

for _name, _value in _REMOVED_ALIASES.items():
    if _name not in np.__dict__:
        setattr(np, _name, _value)

# An `import mxnet` that failed before this module ran leaves MXNet's submodules half-initialised
# in sys.modules (the package itself is removed); drop them so that MXNet imports afresh.
if "mxnet" not in sys.modules:
    for _module in [m for m in sys.modules if m.startswith("mxnet.")]:
        del sys.modules[_module]

import mxnet  # noqa: E402  (must follow the aliases)

__all__ = ["mxnet"]
