"""The explicit choice of implementation for a kernel."""

import os
from enum import Enum

import torch


class ScanBackend(str, Enum):
    """Which implementation computes the linear recurrence h_t = a_t * h_{t-1} + b_t.

    ``PYTORCH`` is the reference: plain tensor ops, runs on any device, under TorchScript and
    in float64. ``TRITON`` is the GPU kernel (also runs on CPU under ``TRITON_INTERPRET=1``).
    ``AUTO`` picks per call: ``TRITON`` for CUDA tensors, ``PYTORCH`` for any other device.
    """

    PYTORCH = "pytorch"
    TRITON = "triton"
    AUTO = "auto"

    def resolve(self, device: torch.device) -> "ScanBackend":
        """The concrete backend for tensors on ``device`` (``AUTO`` resolved, others unchanged)."""
        return resolve_backend(self, device)

    @classmethod
    def parse(cls, value: "str | ScanBackend") -> "ScanBackend":
        if isinstance(value, ScanBackend):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            choices = ", ".join(b.value for b in cls)
            raise ValueError(f"unknown scan backend {value!r}; choose one of: {choices}") from None


def resolve_backend(backend: "ScanBackend | str", device: torch.device) -> ScanBackend:
    """``ScanBackend.parse(backend).resolve(device)`` as a plain function: what the kernels call.

    Inside code that ``torch.compile`` traces, torch 2.11's Dynamo cannot call the classmethod
    (nor a method of an enum member); a function with ``isinstance`` and ``is`` it traces on every
    version, to a constant.
    """
    if not isinstance(backend, ScanBackend):
        backend = ScanBackend.parse(backend)
    if backend is ScanBackend.AUTO:
        return ScanBackend.TRITON if device.type == "cuda" else ScanBackend.PYTORCH
    # off the GPU without the interpreter (code that Dynamo traces on a GPU never reads the variable)
    if backend is ScanBackend.TRITON and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        if tracing():  # a graph traced off the GPU can only hold the reference
            return ScanBackend.PYTORCH
        raise ValueError(
            f"the Triton backend needs CUDA tensors, got {device}; move the inputs (or the model) to the "
            "GPU, use ScanBackend.AUTO or ScanBackend.PYTORCH (scan_backend: auto or pytorch), or set "
            "TRITON_INTERPRET=1 before importing triton (the CPU interpreter the tests use)"
        )
    return backend


def tracing() -> bool:
    """True while torch.compile, torch.export or torch.jit.trace records a graph: the kernels'
    dispatchers then take their PyTorch reference (Inductor fuses it; a Triton launch inside a
    recorded graph would not be captured)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
