"""RecBLR (behaviour-dependent linear recurrent units) on TorchRec.

The checkout's top-level ``kernels/`` folder is this package's ``recblr_torchrec.kernels``, mapped
by the package install (``package-dir`` in pyproject.toml): install the checkout first
(``bash scripts/setup_venv.sh``, or ``python -m pip install -e .``).

Glossary of shape letters used across the package: B batch (users), T time (max length),
L a sequence's length, N packed positions (sum of L), S sequences, d embedding size,
D = expand * d recurrent channels, V rows of the item table (padding row 0 included).
"""

try:
    from .kernels import KernelBackend, linear_scan
except ModuleNotFoundError as error:  # the checkout is on sys.path but not installed
    if error.name != f"{__name__}.kernels":
        raise
    raise ModuleNotFoundError(
        f"{__name__}.kernels is the checkout's kernels/ folder, which only the package install maps: run "
        "`bash scripts/setup_venv.sh` (or `python -m pip install -e .`; offline: `python -m pip install --no-deps "
        "--no-build-isolation -e .`) in the checkout, then import again",
        name=error.name,
    ) from None

__version__ = "0.1.0"
__all__ = ["KernelBackend", "linear_scan", "__version__"]
