"""Host side of the linear-scan kernels: output buffers, the grid, chunk tables and zeroed
scratch of one launch, and the forward and backward launches (``scan_forward``, ``scan_backward``)."""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from .triton import _scan_backward_kernel, _scan_forward_kernel
from .tuning import ScanConfig, default_config

__all__ = ["scan_backward", "scan_forward"]


def _allocate(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the kernels must fill completely (tests replace this to poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass
class _Tiling:
    """Grid, chunk tables and zeroed scratch of one launch."""

    num_seq: int
    steps: int  # T for dense input, 0 for packed
    num_tiles: int  # exact (dense) or an upper bound (packed): the grid, also the scratch slots
    num_d_blocks: int
    max_chunks: int  # packed: the bound on sum(ceil(L / chunk)); dense: unused
    offsets: Tensor
    chunk_offsets: Tensor
    chunk_seq: Tensor
    counter: Tensor
    aggregates: Tensor  # [2, num_tiles, block_d] int32: (A, H) of each tile's local scan
    inclusive: Tensor  # [num_tiles, block_d] int32: the state after each tile

    def arguments(self, channels: int) -> Tuple:
        """The kernels' arguments that locate tiles and carry states, in their order."""
        tables = (self.offsets, self.chunk_offsets, self.chunk_seq, self.counter, self.aggregates, self.inclusive)
        return (*tables, self.steps, channels, self.num_seq, self.num_d_blocks, self.max_chunks, self.num_tiles)


def _tiling(rows: Tensor, offsets: Optional[Tensor], config: ScanConfig) -> _Tiling:
    """Grid, chunk tables and scratch for [B, T, D] or packed [N, D] ``rows``; no host sync."""
    channels, device = rows.shape[-1], rows.device
    num_d_blocks = triton.cdiv(channels, config.block_d)
    if offsets is None:
        num_seq, steps = rows.shape[0], rows.shape[1]
        chunks_per_seq = triton.cdiv(steps, config.chunk)
        num_tiles, max_chunks = num_seq * chunks_per_seq * num_d_blocks, 0
        chunk_offsets = chunk_seq = offsets = rows
        chained = chunks_per_seq > 1
    else:
        num_seq, steps = offsets.numel() - 1, 0
        lengths = offsets[1:] - offsets[:-1]
        chunk_offsets = torch.zeros(num_seq + 1, dtype=torch.int64, device=device)
        chunk_offsets[1:] = torch.cumsum(torch.div(lengths + config.chunk - 1, config.chunk, rounding_mode="floor"), 0)
        # sum(ceil(L / chunk)) <= (N + S (chunk - 1)) / chunk: the grid, known without reading offsets.
        max_chunks = (rows.shape[0] + num_seq * (config.chunk - 1)) // config.chunk
        chunk_ids = torch.arange(max_chunks, dtype=torch.int64, device=device)
        chunk_seq = (torch.searchsorted(chunk_offsets, chunk_ids, right=True) - 1).to(torch.int32)
        num_tiles = max_chunks * num_d_blocks
        chained = True
    counter = torch.zeros(1 if config.dynamic_order else 0, dtype=torch.int32, device=device)
    slots = num_tiles * config.block_d if chained else 0
    scratch = torch.zeros((3 if config.lookback > 1 else 1) * slots, dtype=torch.int32, device=device)
    aggregates = scratch[slots:] if config.lookback > 1 else scratch
    return _Tiling(
        num_seq,
        steps,
        num_tiles,
        num_d_blocks,
        max_chunks,
        offsets,
        chunk_offsets,
        chunk_seq,
        counter,
        aggregates,
        scratch[:slots],
    )


def scan_forward(
    log_a: Tensor,
    b: Tensor,
    offsets: Optional[Tensor],
    initial_state: Optional[Tensor],
    config: Optional[ScanConfig] = None,
) -> Tuple[Tensor, Tensor]:
    """Forward scan: h [B, T, D] or [N, D] in b's dtype, and the final state [B or S, D] in fp32.

    Inputs are assumed validated (:func:`recblr_torchrec.kernels.linear_scan.check_scan_inputs`).
    """
    log_a, b = log_a.contiguous(), b.contiguous()
    channels = b.shape[-1]
    config = config or default_config(channels, False, None if offsets is not None else b.shape[1], b.element_size())
    num_seq = b.shape[0] if offsets is None else offsets.numel() - 1
    h = _allocate(tuple(b.shape), b.dtype, b.device)
    if initial_state is None:
        h0, final = None, torch.zeros(num_seq, channels, dtype=torch.float32, device=b.device)
    else:
        h0 = initial_state.to(torch.float32).contiguous()
        final = h0.clone()  # kept only by empty sequences; every other row is written below
    if b.numel() == 0:
        return h, final
    t = _tiling(b, offsets, config)
    _scan_forward_kernel[(t.num_tiles,)](
        log_a,
        b,
        h,
        h if h0 is None else h0,
        final,
        *t.arguments(channels),
        IS_PACKED=offsets is not None,
        HAS_H0=h0 is not None,
        **config.launch_options(),
    )
    return h, final


def scan_backward(
    grad_h: Tensor, grad_final: Optional[Tensor], log_a: Tensor, h: Tensor,  # dL/dh, dL/d(final), the forward's
    offsets: Optional[Tensor], initial_state: Optional[Tensor], config: Optional[ScanConfig] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:  # fmt: skip
    """Gradients (d log_a, d b, d initial_state or None) from dL/dh and dL/d(final state).

    ``h`` is the forward output; shapes as in :func:`scan_forward`.
    """
    grad_h, log_a, h = grad_h.contiguous(), log_a.contiguous(), h.contiguous()
    channels = h.shape[-1]
    config = config or default_config(channels, True, None if offsets is not None else h.shape[1], h.element_size())
    num_seq = h.shape[0] if offsets is None else offsets.numel() - 1
    grad_log_a = _allocate(tuple(log_a.shape), log_a.dtype, log_a.device)
    grad_b = _allocate(tuple(h.shape), h.dtype, h.device)
    h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    gf = None if grad_final is None else grad_final.to(torch.float32).contiguous()
    # An empty sequence passes its final-state gradient straight to its initial state.
    grad_h0 = gf.clone() if gf is not None else torch.zeros(num_seq, channels, dtype=torch.float32, device=h.device)
    if h.numel() > 0:
        t = _tiling(h, offsets, config)
        _scan_backward_kernel[(t.num_tiles,)](
            grad_h,
            h if gf is None else gf,
            log_a,
            h,
            h if h0 is None else h0,
            grad_log_a,
            grad_b,
            grad_h0,
            *t.arguments(channels),
            IS_PACKED=offsets is not None,
            HAS_H0=h0 is not None,
            HAS_GRAD_FINAL=gf is not None,
            **config.launch_options(),
        )
    if initial_state is None:
        return grad_log_a, grad_b, None
    return grad_log_a, grad_b, grad_h0.to(initial_state.dtype)
