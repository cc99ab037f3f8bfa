"""LayerNorm(Dropout(branch) + residual): the residual mix of every RecBLR layer, in one pass.

``KernelBackend.PYTORCH`` is the reference, ``F.layer_norm(F.dropout(branch) + residual)``.
``KernelBackend.TRITON`` is one kernel each way (:mod:`.triton`): forward reads branch and residual
once and writes the output once; backward recomputes the sum from them (the dropout mask from a
seed, never stored) and writes both input gradients once, with the weight and bias gradients from
per-program partials. PyTorch's LayerNorm kernel is slow at the narrow widths of sequential
recommenders (d = 64: ~0.6 ms for a 409,600-row pass on an H200, several times its bytes) and the
dropout, add and norm are three more passes each way. While torch records a graph the reference
runs whatever the backend (``kernels.backend``; Inductor fuses it with the ops around it).

The two backends draw different dropout masks (the kernel's come from Triton's Philox with a seed
drawn by torch's generator of the input's device, so ``torch.manual_seed`` and checkpoint replay
reproduce them, and a captured CUDA graph draws new ones at every replay).

Example::

    >>> branch, residual = torch.randn(5, 8), torch.randn(5, 8)
    >>> weight, bias = torch.ones(8), torch.zeros(8)
    >>> out = dropout_add_layer_norm(branch, residual, weight, bias, p=0.2, training=False,
    ...                              eps=1e-12, backend=KernelBackend.PYTORCH)
    >>> torch.allclose(out, F.layer_norm(branch + residual, (8,), weight, bias, 1e-12))
    True
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import Kernel, KernelBackend, implementation

__all__ = ["dropout_add_layer_norm"]

MAX_WIDTH = 4096  # widest row the kernel holds in registers; wider rows take the reference


def dropout_add_layer_norm(
    branch: Tensor,
    residual: Optional[Tensor],
    weight: Tensor,
    bias: Tensor,
    p: float = 0.0,
    training: bool = False,
    eps: float = 1e-5,
    backend: KernelBackend = KernelBackend.TRITON,
) -> Tensor:
    """LayerNorm(Dropout_p(branch) + residual) over the last dimension.

    Args:
        branch: [..., d], the sub-layer output dropout applies to (in training, when p > 0).
        residual: [..., d] like ``branch``, or None (LayerNorm(Dropout(branch))).
        weight, bias: [d], the LayerNorm's affine parameters.
        p: dropout probability in [0, 1).
        training: dropout is applied only in training.
        eps: the LayerNorm's epsilon.
        backend: ``TRITON``, ``PYTORCH`` or ``AUTO`` (the kernel for CUDA tensors).

    Returns:
        [..., d], the dtype ``F.layer_norm`` gives: the inputs' (promoted) dtype, float32 under
        autocast.
    """
    if implementation(Kernel.RESIDUAL_NORM, backend, branch.device) is not KernelBackend.TRITON:
        return _reference(branch, residual, weight, bias, p, training, eps)
    width = branch.shape[-1]
    if residual is not None and residual.shape != branch.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must have the branch's shape {tuple(branch.shape)}")
    if weight.shape != (width,) or bias.shape != (width,):
        raise ValueError(f"weight and bias must be [d] = [{width}]; got {tuple(weight.shape)} and {tuple(bias.shape)}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p={p} must be in [0, 1)")
    tensors = (branch, weight, bias) if residual is None else (branch, residual, weight, bias)
    fits = 0 < width <= MAX_WIDTH and branch.numel() < 2**31 - 2**12 and all(t.dtype in _FLOATS for t in tensors)
    if not fits:
        return _reference(branch, residual, weight, bias, p, training, eps)
    from .triton import dropout_add_layer_norm_triton  # lazily: the reference needs no Triton

    if torch.is_autocast_enabled(branch.device.type):
        out_dtype = torch.float32  # autocast runs layer_norm in float32
    else:
        out_dtype = branch.dtype if residual is None else torch.promote_types(branch.dtype, residual.dtype)
    return dropout_add_layer_norm_triton(branch, residual, weight, bias, p if training else 0.0, eps, out_dtype)


def _reference(
    branch: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor, p: float, training: bool, eps: float
) -> Tensor:
    mixed = F.dropout(branch, p, training)
    if residual is not None:
        mixed = mixed + residual
    return F.layer_norm(mixed, (branch.shape[-1],), weight, bias, eps)


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
