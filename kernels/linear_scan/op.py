"""The linear scan as a torch custom op (``recblr_torchrec::linear_scan``, its backward op, fakes and
autograd formula) and ``linear_scan_triton``, which takes it under torch.compile and an equivalent
``torch.autograd.Function`` in eager mode."""

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .launch import scan_backward, scan_forward

__all__ = ["linear_scan_op", "linear_scan_triton"]


# The custom op: one opaque node for torch.compile, with shapes from the fake and gradients below.


@torch.library.custom_op("recblr_torchrec::linear_scan", mutates_args=())
def _linear_scan_op(
    log_a: Tensor, b: Tensor, offsets: Optional[Tensor], initial_state: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    return scan_forward(log_a, b, offsets, initial_state)


@_linear_scan_op.register_fake
def _(log_a: Tensor, b: Tensor, offsets: Optional[Tensor], initial_state: Optional[Tensor]):
    num_seq = b.shape[0] if offsets is None else offsets.shape[0] - 1
    return torch.empty_like(b), b.new_empty((num_seq, b.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("recblr_torchrec::linear_scan_backward", mutates_args=())
def _linear_scan_backward_op(
    grad_h: Tensor,
    grad_final: Optional[Tensor],
    log_a: Tensor,
    h: Tensor,
    offsets: Optional[Tensor],
    initial_state: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    grad_log_a, grad_b, grad_h0 = scan_backward(grad_h, grad_final, log_a, h, offsets, initial_state)
    # Custom ops return tensors only: an empty one stands for "no initial state".
    return grad_log_a, grad_b, h.new_empty((0,)) if grad_h0 is None else grad_h0


@_linear_scan_backward_op.register_fake
def _(grad_h, grad_final, log_a, h, offsets, initial_state):
    grad_h0 = h.new_empty((0,)) if initial_state is None else torch.empty_like(initial_state)
    return torch.empty_like(log_a), torch.empty_like(h), grad_h0


def _setup_context(ctx, inputs, output) -> None:
    log_a, _, offsets, initial_state = inputs
    h, _ = output
    ctx.save_for_backward(log_a, h, offsets, initial_state)


def _backward(ctx, grad_h: Optional[Tensor], grad_final: Optional[Tensor]):
    log_a, h, offsets, initial_state = ctx.saved_tensors
    if grad_h is None:
        grad_h = torch.zeros_like(h)
    grad_log_a, grad_b, grad_h0 = _linear_scan_backward_op(grad_h, grad_final, log_a, h, offsets, initial_state)
    return grad_log_a, grad_b, None, (None if initial_state is None else grad_h0)


torch.library.register_autograd("recblr_torchrec::linear_scan", _backward, setup_context=_setup_context)

linear_scan_op: Callable[..., Tuple[Tensor, Tensor]] = torch.ops.recblr_torchrec.linear_scan


class _LinearScanFunction(torch.autograd.Function):
    """The eager path: the same kernels as the custom op, without its dispatch costs (host time)."""

    @staticmethod
    def forward(ctx, log_a: Tensor, b: Tensor, offsets: Optional[Tensor], initial_state: Optional[Tensor]):
        h, final = scan_forward(log_a, b, offsets, initial_state)
        ctx.save_for_backward(log_a, h, offsets, initial_state)
        ctx.set_materialize_grads(False)
        return h, final

    @staticmethod
    def backward(ctx, grad_h: Optional[Tensor], grad_final: Optional[Tensor]):
        log_a, h, offsets, initial_state = ctx.saved_tensors
        if grad_h is None:
            grad_h = torch.zeros_like(h)
        grad_log_a, grad_b, grad_h0 = scan_backward(grad_h, grad_final, log_a, h, offsets, initial_state)
        return grad_log_a, grad_b, None, grad_h0


def linear_scan_triton(
    log_a: Tensor, b: Tensor, offsets: Optional[Tensor], initial_state: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """The Triton backend of :func:`recblr_torchrec.linear_scan` (inputs already validated).

    Args:
        log_a: [B, T, D] or packed [N, D], float32, bfloat16 or float16.
        b: same shape as ``log_a``.
        offsets: None, or [S+1] int64/int32 jagged offsets for packed input.
        initial_state: None or [B or S, D].

    Returns:
        ``(h, final_state)``: h like ``b``; final_state [B or S, D] float32.
    """
    if torch.compiler.is_compiling():
        return linear_scan_op(log_a, b, offsets, initial_state)  # one opaque node in the graph
    return _LinearScanFunction.apply(log_a, b, offsets, initial_state)
