"""PyTorch reference for the causal depthwise convolution (+ SiLU) of RecBLR, dense and packed."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv_dense(x: Tensor, weight: Tensor, bias: Tensor, history: Optional[Tensor] = None) -> Tensor:
    """Depthwise causal conv over time. x [B, T, D], weight [D, 1, k] -> [B, T, D].

    ``history`` [B, k-1, D] holds the inputs before x[:, 0] (oldest first); zeros when None.
    """
    k = weight.shape[-1]
    if history is None:
        padded = F.pad(x.transpose(1, 2), (k - 1, 0))
    else:
        padded = torch.cat([history.to(x.dtype), x], dim=1).transpose(1, 2)
    out = F.conv1d(padded, weight, bias, groups=x.shape[-1])
    return out.transpose(1, 2)


def _shift(x: Tensor, j: int) -> Tensor:
    """Rows moved j steps later (row t holds x[t - j]; the first j rows are zero)."""
    return F.pad(x[:-j], (0, 0, j, 0)) if j < x.shape[0] else torch.zeros_like(x)


def causal_conv_packed(x: Tensor, weight: Tensor, bias: Tensor, positions: Tensor) -> Tensor:
    """The same conv on packed rows. x [N, D]; positions [N] index inside each sequence.

    Tap j reads the row j steps back, masked where that row belongs to an earlier sequence.
    """
    k = weight.shape[-1]
    weight, bias = weight.to(x.dtype), bias.to(x.dtype)  # under bf16 autocast: a bf16 conv, like F.conv1d
    out = torch.addcmul(bias, x, weight[:, 0, k - 1])
    for j in range(1, k):
        shifted = _shift(x, j) * (positions >= j).unsqueeze(-1).to(x.dtype)
        out = torch.addcmul(out, shifted, weight[:, 0, k - 1 - j])
    return out


class CausalConvSiLUPacked(torch.autograd.Function):
    """SiLU(causal_conv_packed(x)) that keeps only its inputs for backward and recomputes the rest.

    Autograd through :func:`causal_conv_packed` keeps a shifted, masked copy of x per tap and the
    pre-SiLU output ([N, D] each); x itself is a view of the input projection, which the output
    gate keeps anyway, so here the conv adds nothing to the activations held between forward and
    backward. Under ``torch.compile`` this is what Inductor fuses into its own kernels.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, positions: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, bias, positions)
        return F.silu(causal_conv_packed(x, weight, bias, positions))

    @staticmethod
    def backward(ctx, grad_c: Tensor):
        x, weight, bias, positions = ctx.saved_tensors
        k = weight.shape[-1]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # bf16 inputs: fp32 sums
        pre = causal_conv_packed(x, weight, bias, positions).to(acc)
        gate = torch.sigmoid(pre)
        grad_pre = grad_c.to(acc) * gate * (1.0 + pre * (1.0 - gate))  # d SiLU(p) / dp
        del pre, gate
        xs, w = x.to(acc), weight[:, 0].to(acc)
        grad_x = grad_pre * w[:, k - 1]
        grad_w = torch.empty(weight.shape[0], k, dtype=acc, device=x.device)
        grad_w[:, k - 1] = (grad_pre * xs).sum(0)
        for j in range(1, k):
            reaches = (positions >= j).unsqueeze(-1)  # rows whose tap j reads a row of their own sequence
            grad_w[:, k - 1 - j] = (grad_pre * _shift(xs, j) * reaches).sum(0)
            grad_x += F.pad((grad_pre * reaches * w[:, k - 1 - j])[j:], (0, 0, 0, j))[: x.shape[0]]
        grad_bias = grad_pre.sum(0)
        return grad_x.to(x.dtype), grad_w.view_as(weight).to(weight.dtype), grad_bias.to(bias.dtype), None
