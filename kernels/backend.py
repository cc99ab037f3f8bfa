"""Which implementation runs each sequence kernel: the one choice, and the one table of fallbacks.

RecBLR has four sequence kernels and the loss's softmax (:class:`Kernel`), each a Triton kernel
with a PyTorch reference beside it. A model picks their implementation with one
:class:`KernelBackend`, set explicitly on its modules (``set_kernels`` in
``recblr_torchrec.modules``; the loss takes ``AUTO``). While a graph is being recorded some
kernels cannot run as Triton launches; :func:`implementation` is where those fallbacks are
declared, for every kernel and every way of recording, and :func:`kernel_table` lays them out for a
run's resolved config:

================  ===========  ======  ===========  =============  ==========
recording         linear_scan  bdlru   causal_conv  residual_norm  softmax_ce
================  ===========  ======  ===========  =============  ==========
eager             backend      backend backend      backend        backend
torch.compile     backend      backend pytorch      pytorch        pytorch
torch.export      pytorch      pytorch pytorch      pytorch        pytorch
torch.jit.trace   pytorch      pytorch pytorch      pytorch        pytorch
torch.jit.script  pytorch      pytorch pytorch      pytorch        pytorch
================  ===========  ======  ===========  =============  ==========

Under torch.compile the scan and the BD-LRU stay Triton kernels (registered custom ops, one opaque
node each) and the conv and the norm take their references, which Inductor fuses with the ops
around them. torch.export and TorchScript (the serving artifacts) record the references: the
scan as torch's scan operator or a scripted loop.

Beyond this table, the residual norm's kernel hands rows it cannot hold (wider than 4,096, or
float64) to its reference, and the Triton scan and BD-LRU refuse float64 with an error naming the fix.
"""

import os
from enum import Enum
from typing import Dict, Optional

import torch


class KernelBackend(str, Enum):
    """The implementation of every sequence kernel of a model (see :class:`Kernel`).

    ``PYTORCH`` is the reference: plain tensor ops, runs on any device, under TorchScript and in
    float64. ``TRITON`` is the GPU kernels (also on CPU under ``TRITON_INTERPRET=1``). ``AUTO``
    resolves by device: ``TRITON`` for CUDA tensors, ``PYTORCH`` for any other device.
    """

    PYTORCH = "pytorch"
    TRITON = "triton"
    AUTO = "auto"

    def resolve(self, device: torch.device) -> "KernelBackend":
        """The concrete backend for tensors on ``device`` (``AUTO`` resolved, others unchanged)."""
        return resolve_backend(self, device)

    @classmethod
    def parse(cls, value: "str | KernelBackend") -> "KernelBackend":
        if isinstance(value, KernelBackend):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            choices = ", ".join(b.value for b in cls)
            raise ValueError(f"unknown kernel backend {value!r}; choose one of: {choices}") from None


class Kernel(str, Enum):
    """RecBLR's sequence kernels and the loss's softmax, each in its own folder of this package."""

    LINEAR_SCAN = "linear_scan"
    BDLRU = "bdlru"
    CAUSAL_CONV = "causal_conv"
    RESIDUAL_NORM = "residual_norm"
    SOFTMAX_CE = "softmax_ce"


class Recording(str, Enum):
    """How the running code is being executed: eagerly, or recorded into a graph by one of torch's tools."""

    EAGER = "eager"
    COMPILE = "torch.compile"
    EXPORT = "torch.export"
    TRACE = "torch.jit.trace"
    SCRIPT = "torch.jit.script"


def recording() -> Recording:
    """The current :class:`Recording` (Python code never runs under ``torch.jit.script``).

    torch 2.11's Dynamo folds ``torch.compiler.is_exporting()`` to True in every graph it traces,
    so export is told apart from compile by Dynamo being off: this project exports with
    ``strict=False``, which does not run Dynamo.
    """
    if torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling():
        return Recording.EXPORT
    if torch.compiler.is_compiling():
        return Recording.COMPILE
    if torch.jit.is_tracing():
        return Recording.TRACE
    return Recording.EAGER


def resolve_backend(backend: "KernelBackend | str", device: torch.device) -> KernelBackend:
    """``KernelBackend.parse(backend).resolve(device)`` as a plain function.

    Inside code that ``torch.compile`` traces, torch 2.11's Dynamo cannot call the classmethod
    (nor a method of an enum member); a function with ``isinstance`` and ``is`` it traces on every
    version, to a constant.
    """
    if not isinstance(backend, KernelBackend):
        backend = KernelBackend.parse(backend)
    if backend is KernelBackend.AUTO:
        return KernelBackend.TRITON if device.type == "cuda" else KernelBackend.PYTORCH
    # off the GPU without the interpreter (code that Dynamo traces on a GPU never reads the variable)
    if backend is KernelBackend.TRITON and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        if recording() is not Recording.EAGER:  # a graph recorded off the GPU can only hold the reference
            return KernelBackend.PYTORCH
        raise ValueError(
            f"the Triton backend needs CUDA tensors, got {device}; move the inputs (or the model) to the "
            "GPU, use KernelBackend.AUTO or KernelBackend.PYTORCH (model.recblr.kernels: auto or pytorch), "
            "or set TRITON_INTERPRET=1 before importing triton (the CPU interpreter the tests use)"
        )
    return backend


def implementation(
    kernel: Kernel, backend: "KernelBackend | str", device: torch.device, mode: Optional[Recording] = None
) -> KernelBackend:
    """What runs ``kernel`` for tensors on ``device`` when a model asks for ``backend``, under
    ``mode`` (default: the current :func:`recording`): the table in the module docstring."""
    chosen = resolve_backend(backend, device)
    if chosen is KernelBackend.PYTORCH:
        return chosen
    mode = recording() if mode is None else mode
    if mode is Recording.EAGER:
        return chosen
    if mode is Recording.COMPILE and (kernel is Kernel.LINEAR_SCAN or kernel is Kernel.BDLRU):
        return chosen  # registered custom ops: one opaque node each in the compiled graph
    return KernelBackend.PYTORCH


def kernel_table(backends: Dict[Kernel, KernelBackend], device: torch.device) -> Dict[str, Dict[str, str]]:
    """{recording: {kernel: implementation}} for a model whose kernels ask for ``backends`` on
    ``device``: what a run's resolved config shows."""
    return {
        mode.value: {
            kernel.value: implementation(kernel, backend, device, mode).value for kernel, backend in backends.items()
        }
        for mode in Recording
    }
