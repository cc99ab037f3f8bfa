"""Sequence kernels for RecBLR, each with a PyTorch reference beside its Triton version.

This folder is imported as ``recblr_torchrec.kernels`` (never as a bare ``kernels``, a name an
unrelated PyPI package owns): the wheel maps it there through ``package-dir`` and a plain
checkout reaches it through ``recblr_torchrec/__init__.py``.

Glossary of shape letters used in every docstring here: B batch, T time, D channels,
N packed positions (sum of lengths), S sequences in a packed batch.
"""

from .backend import ScanBackend
from .linear_scan import linear_scan

__all__ = ["ScanBackend", "linear_scan"]
