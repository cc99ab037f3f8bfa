"""Sequence kernels for RecBLR, each with a PyTorch reference beside its Triton version.

This folder is imported as ``recblr_torchrec.kernels`` (never as a bare ``kernels``, a name an
unrelated PyPI package owns): the package install maps it there (``package-dir`` in
pyproject.toml), for a wheel and for the editable install of a checkout alike. One
:class:`KernelBackend` picks the implementation of every kernel; ``backend.py`` declares what
runs instead while torch records a graph.

Glossary of shape letters used in every docstring here: B batch, T time, D channels,
N packed positions (sum of lengths), S sequences in a packed batch.
"""

from .backend import Kernel, KernelBackend
from .linear_scan import linear_scan

__all__ = ["Kernel", "KernelBackend", "linear_scan"]
