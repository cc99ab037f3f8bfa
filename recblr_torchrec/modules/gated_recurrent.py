"""The behaviour-dependent linear recurrent unit (BD-LRU) block of RecBLR (SPEC.md section 1)."""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import ScanBackend, linear_scan

# Base decays exp(-softplus(Lambda)) run from 0.9 to 0.999 across channels at initialisation.
DECAY_RANGE = (0.9, 0.999)
_MIN_BETA_SQUARE = 1e-12  # keeps sqrt differentiable where alpha rounds to 1


def inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


def causal_conv_dense(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Depthwise causal conv over time with zero history. x [B, T, D], weight [D, 1, k] -> [B, T, D]."""
    k = weight.shape[-1]
    out = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), weight, bias, groups=x.shape[-1])
    return out.transpose(1, 2)


def causal_conv_packed(x: Tensor, weight: Tensor, bias: Tensor, positions: Tensor) -> Tensor:
    """The same conv on packed rows. x [N, D]; positions [N] index inside each sequence.

    Tap j reads the row j steps back, masked where that row belongs to an earlier sequence.
    """
    k = weight.shape[-1]
    out = torch.addcmul(bias, x, weight[:, 0, k - 1])
    for j in range(1, min(k, x.shape[0] + 1)):
        shifted = F.pad(x[:-j], (0, 0, j, 0))
        shifted = shifted * (positions >= j).unsqueeze(-1).to(x.dtype)
        out = torch.addcmul(out, shifted, weight[:, 0, k - 1 - j])
    return out


class GatedRecurrent(nn.Module):
    """GatedRecurrent(H) of RecBLR: input projection, causal conv, behaviour-dependent gates, scan.

    Per step t: [x; z] = W_in H_t; c = SiLU(conv(x)); [r; i] = W_g c + b_g;
    alpha = exp(-softplus(Lambda) * sigma(r)); beta = sqrt(1 - alpha^2) * sigma(i);
    h_t = alpha * h_{t-1} + beta * c; Y_t = W_out(SiLU(z) * h_t).

    Args:
        embedding_dim: d, the width of H and Y.
        expand: E; the recurrence has D = E * d channels.
        conv_width: k, taps of the causal depthwise convolution.
        scan_backend: which implementation computes the scan.

    Input is [B, T, d] (padded, ``offsets`` None) or [N, d] packed with ``offsets`` [S+1] and
    ``positions`` [N] (index of each row inside its sequence); the output has the input's shape.
    """

    def __init__(
        self, embedding_dim: int, expand: int, conv_width: int, scan_backend: ScanBackend = ScanBackend.PYTORCH
    ):
        super().__init__()
        channels = expand * embedding_dim
        self.channels = channels
        self.input_proj = nn.Linear(embedding_dim, 2 * channels, bias=False)
        self.conv = nn.Conv1d(channels, channels, conv_width, groups=channels, bias=True)
        self.gate_proj = nn.Linear(channels, 2 * channels, bias=True)
        self.decay_param = nn.Parameter(torch.empty(channels))  # Lambda
        self.output_proj = nn.Linear(channels, embedding_dim, bias=False)
        self.scan_backend = ScanBackend.parse(scan_backend)
        self.reset_decay()

    def reset_decay(self) -> None:
        low, high = (inverse_softplus(-math.log(p)) for p in DECAY_RANGE)
        with torch.no_grad():
            self.decay_param.copy_(torch.linspace(low, high, self.channels))

    def gates(self, c: Tensor) -> tuple:
        """(log alpha, beta) from the conv output c [..., D]."""
        r, i = self.gate_proj(c).chunk(2, dim=-1)
        log_alpha = -F.softplus(self.decay_param) * torch.sigmoid(r)
        beta = torch.sqrt(torch.clamp_min(-torch.expm1(2.0 * log_alpha), _MIN_BETA_SQUARE)) * torch.sigmoid(i)
        return log_alpha, beta

    def forward(self, hidden: Tensor, offsets: Optional[Tensor] = None, positions: Optional[Tensor] = None) -> Tensor:
        x, z = self.input_proj(hidden).chunk(2, dim=-1)
        if offsets is None:
            c = F.silu(causal_conv_dense(x, self.conv.weight, self.conv.bias))
        else:
            if positions is None:
                raise ValueError("packed input needs positions (index of each row inside its sequence)")
            c = F.silu(causal_conv_packed(x, self.conv.weight, self.conv.bias, positions))
        log_alpha, beta = self.gates(c)
        h, _ = linear_scan(log_alpha, beta * c, offsets=offsets, backend=self.scan_backend)
        return self.output_proj(F.silu(z) * h)
