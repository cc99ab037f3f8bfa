"""PyTorch reference for the BD-LRU: the gates, then the reference scan, then the output gate."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..linear_scan.pytorch import linear_scan_pytorch

MIN_BETA_SQUARE = 1e-12  # keeps sqrt differentiable where alpha rounds to 1


def bdlru_gates(
    gate_logits: Tensor, decay_param: Tensor, min_beta_square: float = MIN_BETA_SQUARE
) -> Tuple[Tensor, Tensor]:
    """(log alpha, beta), each [..., D], from the gate logits [..., 2D] and Lambda [D]. TorchScript-compatible."""
    r, i = gate_logits.chunk(2, dim=-1)
    log_alpha = -F.softplus(decay_param) * torch.sigmoid(r)
    beta = torch.sqrt(torch.clamp_min(-torch.expm1(2.0 * log_alpha), min_beta_square)) * torch.sigmoid(i)
    return log_alpha, beta


def bdlru_pytorch(c: Tensor, gate_logits: Tensor, z: Tensor, decay_param: Tensor, offsets: Optional[Tensor]) -> Tensor:
    log_alpha, beta = bdlru_gates(gate_logits, decay_param)
    h, _ = linear_scan_pytorch(log_alpha, beta * c, offsets, None)
    return F.silu(z) * h
