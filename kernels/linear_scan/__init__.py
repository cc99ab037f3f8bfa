"""The linear recurrence h_t = a_t * h_{t-1} + b_t, dense or packed (TorchRec jagged layout).

Example::

    >>> import torch
    >>> from recblr_torchrec import KernelBackend, linear_scan
    >>> log_a = -torch.rand(2, 5, 4)            # a = exp(log_a) in (0, 1]
    >>> b = torch.randn(2, 5, 4)
    >>> h, final = linear_scan(log_a, b, output_final_state=True, backend=KernelBackend.PYTORCH)
    >>> # the same two sequences packed end to end, lengths 5 and 5:
    >>> offsets = torch.tensor([0, 5, 10])
    >>> h_packed, final_packed = linear_scan(
    ...     log_a.reshape(10, 4), b.reshape(10, 4), offsets=offsets,
    ...     output_final_state=True, backend=KernelBackend.PYTORCH)
    >>> torch.allclose(h.reshape(10, 4), h_packed) and torch.allclose(final, final_packed)
    True
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backend import Kernel, KernelBackend, implementation
from . import pytorch as _pytorch

__all__ = ["linear_scan", "check_scan_inputs"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_offset_values(offsets: Tensor, num_rows: int) -> None:
    """Offsets start at 0, end at N and never decrease: one host synchronisation for all three."""
    drops = (offsets[1:] < offsets[:-1]).to(torch.int64)
    first_drop = drops.argmax() if drops.numel() else offsets.new_zeros((), dtype=torch.int64)
    first, last, any_drop, bad = torch.stack([offsets[0].long(), offsets[-1].long(), drops.sum(), first_drop]).tolist()
    if first != 0 or last != num_rows:
        raise ValueError(f"offsets must start at 0 and end at N={num_rows}, got {first} and {last}")
    if any_drop:
        raise ValueError(
            f"offsets must be non-decreasing: offsets[{bad}]={int(offsets[bad])} > "
            f"offsets[{bad + 1}]={int(offsets[bad + 1])}"
        )


def _check_triton_inputs(log_a: Tensor, b: Tensor, initial_state: Optional[Tensor]) -> None:
    """What the Triton backend adds to :func:`check_scan_inputs`: no fp64 (its device is checked by
    ``implementation``)."""
    for name, t in (("log_a", log_a), ("b", b)):
        if t.dtype == torch.float64:
            raise TypeError(
                f"{name} is float64, which the Triton backend does not take (it accumulates in float32); "
                "pass float32/bfloat16/float16 or use backend=KernelBackend.PYTORCH"
            )


def check_scan_inputs(log_a: Tensor, b: Tensor, offsets: Optional[Tensor], initial_state: Optional[Tensor]) -> int:
    """Validates the arguments of :func:`linear_scan`; returns the number of sequences."""
    if log_a.shape != b.shape:
        raise ValueError(f"log_a {tuple(log_a.shape)} and b {tuple(b.shape)} must have the same shape")
    for name, t in (("log_a", log_a), ("b", b)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; pass float32, bfloat16, float16 or float64")
    if log_a.device != b.device:
        raise ValueError(f"log_a is on {log_a.device} but b is on {b.device}; move both to one device")
    if offsets is None:
        if log_a.dim() != 3:
            raise ValueError(
                f"dense input must be [B, T, D], got {tuple(log_a.shape)}; for packed [N, D] input pass offsets"
            )
        num_sequences = log_a.shape[0]
    else:
        if log_a.dim() != 2:
            raise ValueError(f"packed input must be [N, D] with offsets, got {tuple(log_a.shape)}")
        if offsets.dim() != 1 or offsets.numel() < 1:
            raise ValueError(f"offsets must be 1-D [S+1], got shape {tuple(offsets.shape)}")
        if offsets.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"offsets has dtype {offsets.dtype}; pass int64 (TorchRec's offsets)")
        if offsets.device != log_a.device:
            raise ValueError(f"offsets is on {offsets.device} but log_a is on {log_a.device}")
        if not torch.compiler.is_compiling():  # value checks read the device: eager mode only
            _check_offset_values(offsets, log_a.shape[0])
        num_sequences = offsets.numel() - 1
    if initial_state is not None:
        expected = (num_sequences, log_a.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(
                f"initial_state must be {expected} (one state per sequence), got {tuple(initial_state.shape)}"
            )
        if initial_state.device != log_a.device:
            raise ValueError(f"initial_state is on {initial_state.device} but log_a is on {log_a.device}")
        if initial_state.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"initial_state has dtype {initial_state.dtype}; pass a float tensor")
    return num_sequences


def linear_scan(
    log_a: Tensor,
    b: Tensor,
    offsets: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    backend: KernelBackend = KernelBackend.TRITON,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Computes h_t = exp(log_a_t) * h_{t-1} + b_t per channel, restarting at every sequence.

    Args:
        log_a: [B, T, D] (dense) or [N, D] (packed) log of the decay, <= 0 for a stable scan.
        b: same shape as ``log_a``: the input added at every step.
        offsets: None for dense input, else [S+1] int64 with offsets[0] = 0 and offsets[-1] = N
            (TorchRec's jagged offsets); zero-length sequences are allowed.
        initial_state: optional [B or S, D] state before the first step (zeros when None).
        output_final_state: also return the state after each sequence's last step.
        backend: ``KernelBackend.TRITON`` (GPU kernel), ``KernelBackend.PYTORCH`` (reference) or
            ``KernelBackend.AUTO`` (the kernel for CUDA tensors, the reference elsewhere); while
            torch records a graph, what ``kernels.backend.implementation`` declares.

    Returns:
        ``(h, final_state)``: h has the shape and dtype of ``b``; final_state is [B or S, D] in
        float32 (float64 for float64 inputs), or None when ``output_final_state`` is False.
        Accumulation is in float32 at least, whatever the input dtype.
    """
    check_scan_inputs(log_a, b, offsets, initial_state)
    if implementation(Kernel.LINEAR_SCAN, backend, b.device) is KernelBackend.PYTORCH:
        h, final = _pytorch.linear_scan_pytorch(log_a, b, offsets, initial_state)
    else:
        _check_triton_inputs(log_a, b, initial_state)
        from . import op as _op  # imported lazily: Triton is not needed for the reference

        h, final = _op.linear_scan_triton(log_a, b, offsets, initial_state)
    return h, (final if output_final_state else None)
