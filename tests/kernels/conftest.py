"""Kernel tests run on the GPU when there is one, else on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, at import,
before the test modules import the kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer a kernel must fill starts as NaN, so an unwritten element cannot pass."""
    from recblr_torchrec.kernels.linear_scan import launch as scan_launch

    def allocate_nan(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(scan_launch, "_allocate", allocate_nan)
