"""Host side of the BD-LRU kernels: output buffers, the launch geometry (``_Launch``), z's row stride,
and the forward and backward launches (``bdlru_forward``, ``bdlru_backward``)."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from . import tuning
from .triton import (
    _backward_summary_kernel,
    _bdlru_backward_kernel,
    _bdlru_forward_kernel,
    _forward_summary_kernel,
)

__all__ = ["bdlru_backward", "bdlru_forward"]


def _allocate(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Output buffers (every element is written; tests poison them with NaN to prove it)."""
    return torch.empty(shape, dtype=dtype, device=device)


class _Launch:
    """What the forward and the backward kernel launch share: one program per (sequence, channel
    block, segment) (``tuning._segment``), softplus(Lambda) as fp32, the tile (``_tile``, by
    direction), the layout flags, and the segments' summaries when there are several."""

    def __init__(self, c: Tensor, decay_param: Tensor, offsets: Optional[Tensor], backward: bool = False):
        if offsets is None:
            self.num_seq, self.steps, self.channels = c.shape[0], c.shape[1], c.shape[2]
            longest = self.steps
        else:
            self.num_seq, self.steps, self.channels = offsets.numel() - 1, 0, c.shape[1]
            longest = c.shape[0]  # no sequence is longer; read from no tensor (no host sync)
        self.rate = F.softplus(decay_param.float()).contiguous()
        chunk, block_d, warps = tuning._tile(self.channels, backward)  # tests and tile_sweep.py patch tuning._tile
        blocks = triton.cdiv(self.channels, block_d)
        rows = c.numel() // max(self.channels, 1)
        self.segment = tuning._segment(self.num_seq * blocks, longest, rows // max(self.num_seq, 1))
        self.parts = triton.cdiv(max(longest, 1), self.segment)
        self.grid = (self.num_seq, blocks, self.parts)
        self.meta = {
            "IS_PACKED": offsets is not None,
            "CHUNK": chunk,
            "BLOCK_D": block_d,
            "STAGES": tuning.LOOP_STAGES,
            "num_warps": warps,
        }
        self.work = self.num_seq > 0 and c.numel() > 0
        if self.parts > 1:  # each segment's (decay, state) pair, from the summary kernel
            shape = (self.num_seq, self.parts, self.channels)
            self.summaries = (torch.empty(shape, device=c.device), torch.empty(shape, device=c.device))
        else:  # unread placeholders
            self.summaries = (self.rate, self.rate)

    def shape_args(self, offsets: Optional[Tensor]) -> Tuple:
        """(offsets, T, D); dense launches pass ``rate`` as an unread placeholder for offsets."""
        return (offsets if offsets is not None else self.rate, self.steps, self.channels)

    def segment_args(self) -> Tuple[int, int]:
        return self.segment, self.parts


def _strided_rows(z: Tensor) -> Tuple[Tensor, int]:
    """(z, the distance between consecutive rows of its flattened [rows, D] layout): z itself when
    those rows are evenly strided (the [N, D] or [B, T, D] half of the input projection's output),
    else a contiguous copy, whose rows are D apart."""
    if z.stride(-1) == 1:
        if z.dim() == 2 or z.shape[1] == 1:
            return z, z.stride(0)  # one row per packed position / per sequence of one step
        if z.shape[0] == 1 or z.stride(0) == z.shape[1] * z.stride(1):
            return z, z.stride(1)
    # contiguous() may return z itself with odd strides on size-1 dimensions: those are never
    # stepped along, so its rows are D apart either way.
    return z.contiguous(), z.shape[-1]


def bdlru_forward(
    c: Tensor, gate_logits: Tensor, z: Tensor, decay_param: Tensor, offsets: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """(SiLU(z) * h in c's dtype, h in float32 for backward); c and the gate logits made contiguous
    here, z read in place when its rows are evenly strided."""
    c, gate_logits = c.contiguous(), gate_logits.contiguous()
    z, z_stride = _strided_rows(z)
    launch = _Launch(c, decay_param, offsets)
    out = _allocate(c.shape, c.dtype, c.device)
    h = _allocate(c.shape, torch.float32, c.device)
    if launch.work:
        shape = launch.shape_args(offsets)
        if launch.parts > 1:
            _forward_summary_kernel[launch.grid](
                c, gate_logits, launch.rate, *launch.summaries, *shape, *launch.segment_args(), **launch.meta
            )
        _bdlru_forward_kernel[launch.grid](
            c, gate_logits, z, launch.rate, out, h, *launch.summaries, *shape, z_stride, *launch.segment_args(),
            **launch.meta,
        )  # fmt: skip
    return out, h


def bdlru_backward(
    dout: Tensor, c: Tensor, gate_logits: Tensor, z: Tensor, decay_param: Tensor, h: Tensor, offsets: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dc, d[r; i], dz, dLambda) from the forward's inputs and its saved h."""
    c, gate_logits, dout = c.contiguous(), gate_logits.contiguous(), dout.contiguous()
    z, z_stride = _strided_rows(z)
    launch = _Launch(c, decay_param, offsets, backward=True)
    dc = _allocate(c.shape, c.dtype, c.device)
    dg = _allocate(gate_logits.shape, gate_logits.dtype, c.device)
    dz = _allocate(z.shape, z.dtype, c.device)
    drate_parts = _allocate((launch.num_seq * launch.parts, launch.channels), torch.float32, c.device)
    if launch.work:
        shape = launch.shape_args(offsets)
        if launch.parts > 1:
            _backward_summary_kernel[launch.grid](
                gate_logits, z, launch.rate, dout, *launch.summaries, *shape, z_stride, *launch.segment_args(),
                **launch.meta,
            )  # fmt: skip
        _bdlru_backward_kernel[launch.grid](
            c, gate_logits, z, launch.rate, h, dout, dc, dg, dz, drate_parts, *launch.summaries,
            *shape, z_stride, *launch.segment_args(), **launch.meta,
        )  # fmt: skip
    else:
        drate_parts.zero_()
    d_decay = drate_parts.sum(dim=0) * torch.sigmoid(decay_param.float())
    return dc, dg, dz, d_decay.to(decay_param.dtype)
