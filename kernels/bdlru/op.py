"""The BD-LRU as a torch custom op (``recblr_torchrec::bdlru``, its backward op, fakes and autograd
formula) and ``bdlru_triton``, which takes it under torch.compile and an equivalent
``torch.autograd.Function`` in eager mode."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .launch import bdlru_backward, bdlru_forward

__all__ = ["bdlru_triton"]


# The custom op: one opaque node for torch.compile (shapes from the fakes, gradients registered).


@torch.library.custom_op("recblr_torchrec::bdlru", mutates_args=())
def _bdlru_op(
    c: Tensor, gate_logits: Tensor, z: Tensor, decay_param: Tensor, offsets: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    return bdlru_forward(c, gate_logits, z, decay_param, offsets)


@_bdlru_op.register_fake
def _(c, gate_logits, z, decay_param, offsets):
    return torch.empty_like(c, memory_format=torch.contiguous_format), c.new_empty(c.shape, dtype=torch.float32)


@torch.library.custom_op("recblr_torchrec::bdlru_backward", mutates_args=())
def _bdlru_backward_op(
    dout: Tensor, c: Tensor, gate_logits: Tensor, z: Tensor, decay_param: Tensor, h: Tensor, offsets: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return bdlru_backward(dout, c, gate_logits, z, decay_param, h, offsets)


@_bdlru_backward_op.register_fake
def _(dout, c, gate_logits, z, decay_param, h, offsets):
    contiguous = torch.contiguous_format
    return (
        torch.empty_like(c, memory_format=contiguous),
        torch.empty_like(gate_logits, memory_format=contiguous),
        torch.empty_like(z, memory_format=contiguous),
        torch.empty_like(decay_param),
    )


def _setup_context(ctx, inputs, output) -> None:
    c, gate_logits, z, decay_param, offsets = inputs
    ctx.save_for_backward(c, gate_logits, z, decay_param, output[1], offsets)


def _backward(ctx, dout: Optional[Tensor], _dh: Optional[Tensor]):
    c, gate_logits, z, decay_param, h, offsets = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(c)
    return (*_bdlru_backward_op(dout, c, gate_logits, z, decay_param, h, offsets), None)


torch.library.register_autograd("recblr_torchrec::bdlru", _backward, setup_context=_setup_context)


class _FusedBDLRU(torch.autograd.Function):
    """The eager path: the same kernels as the custom op, without its dispatch costs (host time)."""

    @staticmethod
    def forward(ctx, c: Tensor, gate_logits: Tensor, z: Tensor, decay_param: Tensor, offsets: Optional[Tensor]):
        out, h = bdlru_forward(c, gate_logits, z, decay_param, offsets)
        ctx.save_for_backward(c, gate_logits, z, decay_param, h, offsets)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        c, gate_logits, z, decay_param, h, offsets = ctx.saved_tensors
        return (*bdlru_backward(dout, c, gate_logits, z, decay_param, h, offsets), None)


def bdlru_triton(c: Tensor, gate_logits: Tensor, z: Tensor, decay_param: Tensor, offsets: Optional[Tensor]) -> Tensor:
    """The fused kernel behind ``bdlru(..., backend=KernelBackend.TRITON)``."""
    if c.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the Triton BD-LRU takes float32, bfloat16 or float16, got {c.dtype}; use the PyTorch backend")
    if torch.compiler.is_compiling():
        return torch.ops.recblr_torchrec.bdlru(c, gate_logits, z, decay_param, offsets)[0]  # one graph node
    return _FusedBDLRU.apply(c, gate_logits, z, decay_param, offsets)
