"""The causal depthwise convolution of RecBLR followed by SiLU, on packed (jagged) rows.

c_t = SiLU(bias + sum_{j<k} w[k-1-j] * x_{t-j}), taps before a sequence's first row read zero
(docs/model.md, the causal conv). Rows of several sequences are packed end to end; ``positions``
[N] gives each row's index inside its sequence, which is all the masking needs.

``KernelBackend.PYTORCH`` is the reference (k shifted multiply-adds; backward recomputes the
pre-activation from x). ``KernelBackend.TRITON`` is one kernel each way that reads x once and
writes c (or dx) once. While torch records a graph the reference runs whatever the backend
(``kernels.backend``; Inductor fuses it with the ops around it).

Example::

    >>> x, weight, bias = torch.randn(5, 3), torch.randn(3, 1, 4), torch.zeros(3)
    >>> positions = torch.tensor([0, 1, 0, 1, 2])                 # sequences of 2 and 3 rows
    >>> c = causal_conv_silu(x, weight, bias, positions, backend=KernelBackend.PYTORCH)
    >>> dense = causal_conv_dense(x[2:][None], weight, bias)[0]   # the second sequence alone
    >>> torch.allclose(c[2:], torch.nn.functional.silu(dense), atol=1e-6)
    True
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import Kernel, KernelBackend, implementation
from .pytorch import CausalConvSiLUPacked, causal_conv_dense, causal_conv_packed

__all__ = ["causal_conv_silu", "causal_conv_dense", "causal_conv_packed"]


def causal_conv_silu(
    x: Tensor, weight: Tensor, bias: Tensor, positions: Tensor, backend: KernelBackend = KernelBackend.TRITON
) -> Tensor:
    """SiLU(causal depthwise conv(x)) on packed rows.

    Args:
        x: [N, D], rows of several sequences end to end (a strided view is fine).
        weight: [D, 1, k], ``nn.Conv1d(D, D, k, groups=D).weight``.
        bias: [D].
        positions: [N] int64, each row's index inside its sequence.
        backend: ``TRITON``, ``PYTORCH`` or ``AUTO`` (the kernel for CUDA tensors).

    Returns:
        [N, D] in x's dtype.
    """
    if x.dim() != 2 or weight.dim() != 3 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1:
        raise ValueError(
            f"x must be [N, D] and weight [D, 1, k]; got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if positions.shape != x.shape[:1] or bias.shape != x.shape[1:]:
        raise ValueError(
            f"positions must be [N] = [{x.shape[0]}] and bias [D] = [{x.shape[1]}]; "
            f"got {tuple(positions.shape)} and {tuple(bias.shape)}"
        )
    if positions.device != x.device:
        raise ValueError(f"positions are on {positions.device} but x on {x.device}; move them to x's device")
    if implementation(Kernel.CAUSAL_CONV, backend, x.device) is KernelBackend.TRITON:
        from .triton import causal_conv_silu_triton  # lazily: the reference needs no Triton

        return causal_conv_silu_triton(x, weight, bias, positions)
    if torch.is_grad_enabled():
        return CausalConvSiLUPacked.apply(x, weight, bias, positions)
    return F.silu(causal_conv_packed(x, weight, bias, positions))
