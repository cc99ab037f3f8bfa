"""RecBLR (behaviour-dependent linear recurrent units) on TorchRec.

Glossary of shape letters used across the package: B batch (users), T time (max length),
L a sequence's length, N packed positions (sum of L), S sequences, d embedding size,
D = expand * d recurrent channels, V rows of the item table (padding row 0 included).
"""

import importlib.util
import os
import sys


def _bridge_checkout_kernels() -> None:
    # Installed wheels and editable installs map the top-level kernels/ folder to
    # recblr_torchrec.kernels through package-dir. A plain checkout on PYTHONPATH has no such
    # mapping, so register the folder under that name here, once.
    name = __name__ + ".kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        raise ImportError(f"recblr_torchrec.kernels not found: expected {init}")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_bridge_checkout_kernels()

from .kernels import ScanBackend, linear_scan  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ScanBackend", "linear_scan", "__version__"]
