"""The behaviour-dependent linear recurrent unit (BD-LRU) block of RecBLR (docs/model.md)."""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..kernels import Kernel, KernelBackend, linear_scan
from ..kernels.backend import Recording, implementation, recording
from ..kernels.bdlru import bdlru, bdlru_gates
from ..kernels.causal_conv import causal_conv_dense, causal_conv_packed, causal_conv_silu
from ..kernels.linear_scan.pytorch import packed_positions, pad_packed, scan_sequential

# Base decays exp(-softplus(Lambda)) run from 0.9 to 0.999 across channels at initialisation.
DECAY_RANGE = (0.9, 0.999)


def inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


def scan_scripted(log_a: Tensor, b: Tensor, offsets: Optional[Tensor]) -> Tensor:
    """h_t = exp(log_a_t) h_{t-1} + b_t from h = 0, forward only: the PyTorch scan backend under TorchScript.

    Same arithmetic as ``linear_scan(..., backend=KernelBackend.PYTORCH)`` (whose autograd function
    TorchScript cannot compile): time-major :func:`scan_sequential` in float32 (float64 for
    float64 input); packed [N, D] input is scattered into a right-padded block whose padding
    steps carry the state (a = 1, b = 0).
    """
    acc = torch.float64 if b.dtype == torch.float64 else torch.float32
    if offsets is None:
        return _scan_dense_scripted(log_a.to(acc), b.to(acc)).to(b.dtype)
    seq_index, pos_index = packed_positions(offsets, b.shape[0])
    log_a_pad = pad_packed(log_a.to(acc), offsets, seq_index, pos_index)
    b_pad = pad_packed(b.to(acc), offsets, seq_index, pos_index)
    return _scan_dense_scripted(log_a_pad, b_pad)[seq_index, pos_index].to(b.dtype)


def _scan_dense_scripted(log_a: Tensor, b: Tensor) -> Tensor:
    h0 = torch.zeros(b.shape[0], b.shape[2], dtype=b.dtype, device=b.device)
    a_tm = log_a.transpose(0, 1).exp().contiguous()
    return scan_sequential(a_tm, b.transpose(0, 1).contiguous(), h0).transpose(0, 1)


def _scan_combine(h: Tensor, step: Tuple[Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
    a, b = step
    h = torch.addcmul(b, a, h)
    return h, h.clone()


def scan_exported(log_a: Tensor, b: Tensor) -> Tensor:
    """The dense scan of :func:`scan_scripted` through torch's scan operator, forward only.

    What ``torch.export`` captures: the operator keeps the time loop as one node, so the exported
    program takes any T (a Python loop would be unrolled at the example's length).
    """
    from torch._higher_order_ops.scan import scan

    acc = torch.float64 if b.dtype == torch.float64 else torch.float32
    h0 = torch.zeros(b.shape[0], b.shape[2], dtype=acc, device=b.device)
    a_tm = log_a.to(acc).transpose(0, 1).exp()
    _, h = scan(_scan_combine, h0, (a_tm, b.to(acc).transpose(0, 1)))
    return h.transpose(0, 1).to(b.dtype)


class GatedRecurrent(nn.Module):
    """GatedRecurrent(H) of RecBLR: input projection, causal conv, behaviour-dependent gates, scan.

    Per step t: [x; z] = W_in H_t; c = SiLU(conv(x)); [r; i] = W_g c + b_g;
    alpha = exp(-softplus(Lambda) * sigma(r)); beta = sqrt(1 - alpha^2) * sigma(i);
    h_t = alpha * h_{t-1} + beta * c; Y_t = W_out(SiLU(z) * h_t).

    Args:
        embedding_dim: d, the width of H and Y.
        expand: E; the recurrence has D = E * d channels.
        conv_width: k, taps of the causal depthwise convolution.
        kernels: the implementation of the scan, the fused BD-LRU and the causal conv; ``AUTO``
            (the default) runs the Triton kernels on CUDA and the PyTorch reference elsewhere.
        recompute: in training, keep only c and z for backward and recompute the gate logits and
            the recurrence there (``torch.utils.checkpoint``): one more gate projection and
            recurrence forward for 1.5 KB less saved per position at D = 128 (fused path).

    Input is [B, T, d] (padded, ``offsets`` None) or [N, d] packed with ``offsets`` [S+1] and
    ``positions`` [N] (index of each row inside its sequence); the output has the input's shape.

    :meth:`step` advances one event from a carried state (conv tail [B, k-1, D], h [B, D]) at a
    cost independent of the history's length; :meth:`sequence` also returns the x and h that the
    state is cut from. While torch records a graph the kernels fall back as ``kernels/backend.py``
    declares; the reference scan is then :func:`scan_scripted` under TorchScript and
    :func:`scan_exported` under ``torch.export`` (dense input).
    """

    def __init__(
        self,
        embedding_dim: int,
        expand: int,
        conv_width: int,
        kernels: "KernelBackend | str" = KernelBackend.AUTO,
        recompute: bool = False,
    ):
        super().__init__()
        self.recompute = recompute
        channels = expand * embedding_dim
        self.channels = channels
        self.input_proj = nn.Linear(embedding_dim, 2 * channels, bias=False)
        self.conv = nn.Conv1d(channels, channels, conv_width, groups=channels, bias=True)
        self.gate_proj = nn.Linear(channels, 2 * channels, bias=True)
        self.decay_param = nn.Parameter(torch.empty(channels))  # Lambda
        self.output_proj = nn.Linear(channels, embedding_dim, bias=False)
        self.kernels = KernelBackend.parse(kernels)
        self.reset_decay()

    def reset_decay(self) -> None:
        low, high = (inverse_softplus(-math.log(p)) for p in DECAY_RANGE)
        with torch.no_grad():
            self.decay_param.copy_(torch.linspace(low, high, self.channels))

    def gates(self, c: Tensor) -> Tuple[Tensor, Tensor]:
        """(log alpha, beta) from the conv output c [..., D]."""
        return bdlru_gates(self.gate_proj(c), self.decay_param)

    def conv_branch(
        self, hidden: Tensor, offsets: Optional[Tensor] = None, positions: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """(x, z, c): the conv input, the output-gate input and c = SiLU(causal conv(x)), each [..., D]."""
        x, z = self.input_proj(hidden).chunk(2, dim=-1)
        bias = self.conv.bias
        assert bias is not None  # always built with a bias; refines Optional for TorchScript
        if offsets is None:
            c = F.silu(causal_conv_dense(x, self.conv.weight, bias))
        else:
            if positions is None:
                raise ValueError("packed input needs positions (index of each row inside its sequence)")
            if not torch.jit.is_scripting():
                c = causal_conv_silu(x, self.conv.weight, bias, positions, backend=self.kernels)
            else:
                c = F.silu(causal_conv_packed(x, self.conv.weight, bias, positions))
        return x, z, c

    def forward(
        self,
        hidden: Tensor,
        offsets: Optional[Tensor] = None,
        positions: Optional[Tensor] = None,
        rows: Optional[Tensor] = None,
    ) -> Tensor:
        """Y at every position, or only at packed ``rows`` [M] (the output projection then runs on M rows)."""
        if not torch.jit.is_scripting():
            if recording() is not Recording.EXPORT:
                _, z, c = self.conv_branch(hidden, offsets, positions)
                if self.recompute and self.training and torch.is_grad_enabled():
                    gated = checkpoint(self.recurrence, c, z, offsets, use_reentrant=False)
                else:
                    gated = self.recurrence(c, z, offsets)
                return self.output_proj(gated if rows is None else gated[rows])
        out = self.sequence(hidden, offsets, positions)[0]
        return out if rows is None else out[rows]

    def recurrence(self, c: Tensor, z: Tensor, offsets: Optional[Tensor] = None) -> Tensor:
        """SiLU(z) * h from the conv output c: one fused kernel for gates, scan and output gate
        (kernels/bdlru) where the BD-LRU runs as Triton, else the gates, the scan and the output
        gate as separate ops."""
        if implementation(Kernel.BDLRU, self.kernels, c.device) is KernelBackend.TRITON:
            return bdlru(c, self.gate_proj(c), z, self.decay_param, offsets, backend=KernelBackend.TRITON)
        log_alpha, beta = self.gates(c)
        h, _ = linear_scan(log_alpha, beta * c, offsets=offsets, backend=self.kernels)
        return F.silu(z) * h

    def sequence(
        self, hidden: Tensor, offsets: Optional[Tensor] = None, positions: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """(Y, x, h): the output, the conv input x and the recurrent state h at every position [..., D]."""
        x, z, c = self.conv_branch(hidden, offsets, positions)
        log_alpha, beta = self.gates(c)
        if torch.jit.is_scripting():
            h = scan_scripted(log_alpha, beta * c, offsets)
        elif offsets is None and recording() is Recording.EXPORT:
            h = scan_exported(log_alpha, beta * c)
        else:
            h, _ = linear_scan(log_alpha, beta * c, offsets=offsets, backend=self.kernels)
        return self.output_proj(F.silu(z) * h), x, h

    def step(self, hidden: Tensor, conv_tail: Tensor, state: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """One event per sequence: hidden [B, d], conv_tail [B, k-1, D] (the last k-1 conv inputs x,
        oldest first), state h [B, D] -> (Y [B, d], new conv_tail, new h). O(k * D) per sequence."""
        x, z = self.input_proj(hidden).chunk(2, dim=-1)
        bias = self.conv.bias
        assert bias is not None
        window = torch.cat([conv_tail.to(x.dtype), x.unsqueeze(1)], dim=1)  # [B, k, D]
        c = F.silu(causal_conv_dense(window[:, -1:], self.conv.weight, bias, history=window[:, :-1])[:, 0])
        log_alpha, beta = self.gates(c)
        h = scan_sequential(
            log_alpha.to(state.dtype).exp().unsqueeze(0), (beta * c).to(state.dtype).unsqueeze(0), state
        )
        return self.output_proj(F.silu(z) * h[0].to(x.dtype)), window[:, 1:], h[0]
