"""Triton kernels for the fused BD-LRU, forward and backward (dense or packed, fp32 or bf16).

One program per (sequence, block of BLOCK_D channels) walks its sequence in [CHUNK, BLOCK_D]
tiles, coalesced along channels. Forward, per tile: load c, r, i, z once; form alpha and beta in
registers; scan the pair operator inside the tile (``tl.associative_scan``) and apply the state
carried from the previous tile; write SiLU(z) * h and h (fp32, for backward). Backward walks the
tiles in reverse: it recomputes alpha and beta from the same inputs, scans
delta_t = g_t + alpha_{t+1} delta_{t+1} with g = dout * SiLU(z), and writes dc, d[r; i] and dz;
dLambda is reduced per program into a [S, D] partial that the host sums in a fixed order
(deterministic, no atomics).

Bytes per element and channel (fp32): forward reads c, r, i, z and writes out and h (24 bytes
against the 20 of its inputs and output); backward reads c, r, i, z, h and dout and writes dc,
dr, di and dz (40 bytes, against 36). The shifted reads of h and r for the neighbouring step hit
the cache.

softplus(Lambda) and the final sigmoid(Lambda) factor are [D] vectors computed by the host in
float32 with torch's own functions (accurate where softplus is tiny).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..linear_scan.triton import _last_row, _pair_combine
from .pytorch import MIN_BETA_SQUARE

__all__ = ["bdlru_triton"]

_SERIES_BELOW: tl.constexpr = tl.constexpr(0.1)
_MIN_BETA_SQUARE: tl.constexpr = tl.constexpr(MIN_BETA_SQUARE)


@triton.jit
def _one_minus_exp(x):
    # -expm1(x) for x <= 0 without cancellation: a Taylor series where |x| is small
    # (relative error < 2e-8 at |x| = 0.1), 1 - exp(x) elsewhere (relative error < 1e-6).
    series = -x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x / 120.0))))
    return tl.where(x > -_SERIES_BELOW, series, 1.0 - tl.exp(x))


@triton.jit
def _gates(r, i, rate):
    """alpha, beta and the pieces backward needs, all fp32 [CHUNK, BLOCK_D]."""
    sig_r = tl.sigmoid(r)
    alpha = tl.exp(-rate[None, :] * sig_r)
    one_minus_sq = _one_minus_exp(-2.0 * rate[None, :] * sig_r)
    clamped = one_minus_sq < _MIN_BETA_SQUARE
    q = tl.sqrt(tl.maximum(one_minus_sq, _MIN_BETA_SQUARE))
    sig_i = tl.sigmoid(i)
    return sig_r, alpha, q, clamped, sig_i, q * sig_i


@triton.jit
def _load_tile(c_ptr, g_ptr, z_ptr, rows, cols, mask, D, z_stride):
    """Offsets of a [CHUNK, BLOCK_D] tile in c (and the outputs) and in the gate logits, and c, r,
    i, z as fp32; z's rows are ``z_stride`` apart (z is a view of the input projection)."""
    at = rows[:, None] * D + cols[None, :]
    at_gate = rows[:, None] * (2 * D) + cols[None, :]
    c = tl.load(c_ptr + at, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(g_ptr + at_gate, mask=mask, other=0.0).to(tl.float32)
    i = tl.load(g_ptr + at_gate + D, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows[:, None] * z_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return at, at_gate, c, r, i, z


@triton.jit
def _program_setup(offsets_ptr, rate_ptr, T, D, IS_PACKED: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's sequence bounds, channel indices and softplus(Lambda) for its channels."""
    seq = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    start, end = _bounds(seq, offsets_ptr, T, IS_PACKED)
    rate = tl.load(rate_ptr + cols, mask=col_ok, other=0.0)
    return seq, cols, col_ok, start, end, rate


@triton.jit
def _bounds(seq, offsets_ptr, T, IS_PACKED: tl.constexpr):
    if IS_PACKED:
        start = tl.load(offsets_ptr + seq).to(tl.int64)
        end = tl.load(offsets_ptr + seq + 1).to(tl.int64)
    else:
        start = seq.to(tl.int64) * T
        end = start + T
    return start, end


@triton.jit
def _bdlru_forward_kernel(
    c_ptr,
    g_ptr,
    z_ptr,
    rate_ptr,
    out_ptr,
    h_ptr,
    offsets_ptr,
    T,
    D,
    z_stride,
    IS_PACKED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq, cols, col_ok, start, end, rate = _program_setup(offsets_ptr, rate_ptr, T, D, IS_PACKED, BLOCK_D)
    steps = tl.arange(0, CHUNK)
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(0, tl.cdiv(end - start, CHUNK)):
        rows = start + k * CHUNK + steps
        mask = (rows < end)[:, None] & col_ok[None, :]
        at, at_gate, c, r, i, z = _load_tile(c_ptr, g_ptr, z_ptr, rows, cols, mask, D, z_stride)
        sig_r, alpha, q, clamped, sig_i, beta = _gates(r, i, rate)
        a = tl.where(mask, alpha, 1.0)  # rows past the end carry the state unchanged
        b = tl.where(mask, beta * c, 0.0)
        a_cum, h_local = tl.associative_scan((a, b), axis=0, combine_fn=_pair_combine)
        h = a_cum * carry[None, :] + h_local
        out = z * tl.sigmoid(z) * h
        tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptr + at, h, mask=mask)
        carry = _last_row(h, steps, CHUNK)


@triton.jit
def _bdlru_backward_kernel(
    c_ptr,
    g_ptr,
    z_ptr,
    rate_ptr,
    h_ptr,
    dout_ptr,
    dc_ptr,
    dg_ptr,
    dz_ptr,
    drate_ptr,
    offsets_ptr,
    T,
    D,
    z_stride,
    IS_PACKED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq, cols, col_ok, start, end, rate = _program_setup(offsets_ptr, rate_ptr, T, D, IS_PACKED, BLOCK_D)
    steps = tl.arange(0, CHUNK)
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)  # delta of the first row of the later tile
    drate = tl.zeros([BLOCK_D], dtype=tl.float32)
    num_chunks = tl.cdiv(end - start, CHUNK)
    for k in range(0, num_chunks):
        # Tile row 0 is the latest step, so a forward scan over the tile runs back in time.
        rows = start + (num_chunks - 1 - k) * CHUNK + (CHUNK - 1 - steps)
        row_ok = rows < end
        mask = row_ok[:, None] & col_ok[None, :]
        at, at_gate, c, r, i, z = _load_tile(c_ptr, g_ptr, z_ptr, rows, cols, mask, D, z_stride)
        h = tl.load(h_ptr + at, mask=mask, other=0.0)
        dout = tl.load(dout_ptr + at, mask=mask, other=0.0).to(tl.float32)
        has_prev = mask & (rows > start)[:, None]
        h_prev = tl.load(h_ptr + at - D, mask=has_prev, other=0.0)
        has_next = (rows + 1 < end)[:, None] & col_ok[None, :]
        r_next = tl.load(g_ptr + at_gate + 2 * D, mask=has_next, other=0.0).to(tl.float32)
        alpha_next = tl.where(has_next, tl.exp(-rate[None, :] * tl.sigmoid(r_next)), 0.0)

        sig_r, alpha, q, clamped, sig_i, beta = _gates(r, i, rate)
        sig_z = tl.sigmoid(z)
        g = tl.where(mask, dout * z * sig_z, 0.0)
        a_cum, delta_local = tl.associative_scan((alpha_next, g), axis=0, combine_fn=_pair_combine)
        delta = a_cum * carry[None, :] + delta_local
        carry = _last_row(delta, steps, CHUNK)

        d_beta = delta * c
        d_q = d_beta * sig_i
        d_alpha = delta * h_prev + tl.where(clamped, 0.0, -d_q * alpha / q)
        d_r = d_alpha * (-rate[None, :] * alpha) * sig_r * (1.0 - sig_r)
        d_i = d_q * q * (1.0 - sig_i)
        d_z = dout * h * sig_z * (1.0 + z * (1.0 - sig_z))
        drate += tl.sum(tl.where(mask, -d_alpha * alpha * sig_r, 0.0), axis=0)
        tl.store(dc_ptr + at, (delta * beta).to(dc_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + at_gate, d_r.to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + at_gate + D, d_i.to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptr + at, d_z.to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(drate_ptr + seq.to(tl.int64) * D + cols, drate, mask=col_ok)


def _allocate(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Output buffers (every element is written; tests poison them with NaN to prove it)."""
    return torch.empty(shape, dtype=dtype, device=device)


class _Launch:
    """What the forward and the backward kernel launch share: one program per (sequence, channel
    block), softplus(Lambda) as fp32, the tile (``_tile``, by direction) and the layout flags."""

    def __init__(self, c: Tensor, decay_param: Tensor, offsets: Optional[Tensor], backward: bool = False):
        if offsets is None:
            self.num_seq, self.steps, self.channels = c.shape[0], c.shape[1], c.shape[2]
        else:
            self.num_seq, self.steps, self.channels = offsets.numel() - 1, 0, c.shape[1]
        self.rate = F.softplus(decay_param.float()).contiguous()
        chunk, block_d, warps = _tile(self.channels, backward)
        self.grid = (self.num_seq, triton.cdiv(self.channels, block_d))
        self.meta = {"IS_PACKED": offsets is not None, "CHUNK": chunk, "BLOCK_D": block_d, "num_warps": warps}
        self.work = self.num_seq > 0 and c.numel() > 0

    def shape_args(self, offsets: Optional[Tensor]) -> Tuple:
        """(offsets, T, D); dense launches pass ``rate`` as an unread placeholder for offsets."""
        return (offsets if offsets is not None else self.rate, self.steps, self.channels)


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


def _tile(channels: int, backward: bool) -> Tuple[int, int, int]:
    """(CHUNK, BLOCK_D, num_warps). Narrow channel blocks give more programs (more sequences in
    flight) and short chunks keep the scan's registers low: on the H200, [16, 32] tiles ran
    forward+backward 1.6x (2048 x 200 x 128) and 1.7x (256 x 2048 x 128) faster than [32, 64], the
    best of a {16, 32, 64} x {16, 32, 64, 128} sweep at both shapes. A second sweep, each direction
    apart ({8, 16} steps x {16, 32} channels x {1, 2, 4} warps, packed, D = 128, one timing a cell,
    ``benchmarks/results/bdlru_tiles_warps_h200.json``): backward, [8, 32] with 2 warps was the
    fastest in fp32 (0.86x / 0.87x the [16, 32] x 4 time at 2048 x 200 / 256 x 2048) and level with
    it in bf16 (1.00x / 1.01x; the best bf16 cell differs by shape, within 7%); forward, [16, 32]
    x 4 stays, within 0-4% of each shape's best cell (the best differs by shape and dtype)."""
    block_d = min(32, triton.next_power_of_2(channels))
    return (8, block_d, 2) if backward else (16, block_d, 4)


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
        _bdlru_forward_kernel[launch.grid](
            c, gate_logits, z, launch.rate, out, h, *launch.shape_args(offsets), z_stride, **launch.meta,
        )  # fmt: skip
    return out, h


def bdlru_backward(
    dout: Tensor,
    c: Tensor,
    gate_logits: Tensor,
    z: Tensor,
    decay_param: Tensor,
    h: Tensor,
    offsets: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dc, d[r; i], dz, dLambda) from the forward's inputs and its saved h."""
    c, gate_logits, dout = c.contiguous(), gate_logits.contiguous(), dout.contiguous()
    z, z_stride = _strided_rows(z)
    launch = _Launch(c, decay_param, offsets, backward=True)
    dc = _allocate(c.shape, c.dtype, c.device)
    dg = _allocate(gate_logits.shape, gate_logits.dtype, c.device)
    dz = _allocate(z.shape, z.dtype, c.device)
    drate_parts = _allocate((launch.num_seq, launch.channels), torch.float32, c.device)
    if launch.work:
        _bdlru_backward_kernel[launch.grid](
            c, gate_logits, z, launch.rate, h, dout, dc, dg, dz, drate_parts,
            *launch.shape_args(offsets), z_stride, **launch.meta,
        )  # fmt: skip
    else:
        drate_parts.zero_()
    d_decay = drate_parts.sum(dim=0) * torch.sigmoid(decay_param.float())
    return dc, dg, dz, d_decay.to(decay_param.dtype)


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
    dout: Tensor,
    c: Tensor,
    gate_logits: Tensor,
    z: Tensor,
    decay_param: Tensor,
    h: Tensor,
    offsets: Optional[Tensor],
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
    """The fused kernel behind ``bdlru(..., backend=ScanBackend.TRITON)``."""
    if c.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the Triton BD-LRU takes float32, bfloat16 or float16, got {c.dtype}; use the PyTorch backend")
    if torch.compiler.is_compiling():
        return torch.ops.recblr_torchrec.bdlru(c, gate_logits, z, decay_param, offsets)[0]  # one graph node
    return _FusedBDLRU.apply(c, gate_logits, z, decay_param, offsets)
