"""Triton kernels for the fused BD-LRU, forward and backward (dense or packed, fp32 or bf16).

One program per (sequence, block of BLOCK_D channels, segment) walks its segment of the sequence
in [CHUNK, BLOCK_D] tiles, coalesced along channels. Forward, per tile: load c, r, i, z once; form
alpha and beta in registers; scan the pair operator inside the tile (``tl.associative_scan``) and
apply the state carried from the previous tile; write SiLU(z) * h and h (fp32, for backward).
Backward walks the tiles in reverse: it recomputes alpha and beta from the same inputs, scans
delta_t = g_t + alpha_{t+1} delta_{t+1} with g = dout * SiLU(z), and writes dc, d[r; i] and dz;
dLambda is reduced per program into a [S * P, D] partial that the host sums in a fixed order
(deterministic, no atomics).

Segments: a whole sequence is one segment unless there are too few (sequence, channel block)
programs to fill the GPU (a few long sequences, ``tuning._segment``). Then each sequence is cut
into P segments and a summary kernel first reduces each segment to its pair: forward, the product
of alpha over it and its end state from h = 0; backward, the product of alpha_{t+1} and its first
delta from delta = 0. Each main program then composes the pairs before (forward) or after
(backward) its segment into its entering state, and runs as above from it: one more read of c, r
and i (forward) or r, z and dout (backward) for P times the programs.

Bytes per element and channel (fp32): forward reads c, r, i, z and writes out and h (24 bytes
against the 20 of its inputs and output); backward reads c, r, i, z, h and dout and writes dc,
dr, di and dz (40 bytes, against 36). The shifted reads of h and r for the neighbouring step hit
the cache.

softplus(Lambda) and the final sigmoid(Lambda) factor are [D] vectors computed by the host in
float32 with torch's own functions (accurate where softplus is tiny).

Launching them is in the sibling modules: ``tuning.py`` picks the tile (``_tile``), ``launch.py``
prepares the inputs and runs the kernels, and ``op.py`` registers them as one torch custom op
(one opaque node for ``torch.compile``) with an equivalent ``torch.autograd.Function`` for eager calls.
"""

import triton
import triton.language as tl

from ..linear_scan.triton import _last_row, _pair_combine
from .pytorch import MIN_BETA_SQUARE

_SERIES_BELOW: tl.constexpr = tl.constexpr(0.1)
_MIN_BETA_SQUARE: tl.constexpr = tl.constexpr(MIN_BETA_SQUARE)


@triton.jit
def _one_minus_square(x, alpha):
    # 1 - alpha^2 for alpha = exp(-x), x >= 0, without cancellation: where 2x is small, a Taylor
    # series of -expm1(-2x) (relative error < 2e-8 at 2x = 0.1); elsewhere 1 - alpha^2, from the
    # alpha at hand (no second exp: the special-function unit bounds these kernels).
    y = -2.0 * x
    series = -y * (1.0 + y * (0.5 + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0)))))
    return tl.where(y > -_SERIES_BELOW, series, 1.0 - alpha * alpha)


@triton.jit
def _gates(r, i, rate):
    """alpha, beta and the pieces backward needs (q = sqrt(1 - alpha^2) and alpha / q), all fp32
    [CHUNK, BLOCK_D]."""
    sig_r = tl.sigmoid(r)
    x = rate[None, :] * sig_r
    alpha = tl.exp(-x)
    one_minus_sq = _one_minus_square(x, alpha)
    clamped = one_minus_sq < _MIN_BETA_SQUARE
    held = tl.maximum(one_minus_sq, _MIN_BETA_SQUARE)
    inv_q = tl.math.rsqrt(held)  # one special-function op gives q and alpha / q
    q = held * inv_q
    sig_i = tl.sigmoid(i)
    return sig_r, alpha, q, alpha * inv_q, clamped, sig_i, q * sig_i


@triton.jit
def _load_gate_inputs(c_ptr, g_ptr, rows, cols, mask, D):
    """Offsets of a [CHUNK, BLOCK_D] tile in c (and the outputs) and in the gate logits, and c, r,
    i as fp32."""
    at = rows[:, None] * D + cols[None, :]
    at_gate = rows[:, None] * (2 * D) + cols[None, :]
    c = tl.load(c_ptr + at, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(g_ptr + at_gate, mask=mask, other=0.0).to(tl.float32)
    i = tl.load(g_ptr + at_gate + D, mask=mask, other=0.0).to(tl.float32)
    return at, at_gate, c, r, i


@triton.jit
def _load_tile(c_ptr, g_ptr, z_ptr, rows, cols, mask, D, z_stride):
    """``_load_gate_inputs`` and z as fp32; z's rows are ``z_stride`` apart (z is a view of the
    input projection)."""
    at, at_gate, c, r, i = _load_gate_inputs(c_ptr, g_ptr, rows, cols, mask, D)
    z = tl.load(z_ptr + rows[:, None] * z_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return at, at_gate, c, r, i, z


@triton.jit
def _program_setup(offsets_ptr, rate_ptr, T, D, segment, IS_PACKED: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's sequence, channel indices and softplus(Lambda) for its channels, the
    sequence's bounds, and its segment's: rows [first, last) of segment ``program_id(2)``
    (``segment`` rows each, empty past the sequence's end), and the sequence's segment count."""
    seq = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    start, end = _bounds(seq, offsets_ptr, T, IS_PACKED)
    part = tl.program_id(2)
    first = start + part.to(tl.int64) * segment
    last = tl.minimum(end, first + segment)
    parts = tl.cdiv(end - start, segment)
    rate = tl.load(rate_ptr + cols, mask=col_ok, other=0.0)
    return seq, cols, col_ok, start, end, first, last, part, parts, rate


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
def _pair_at(seq, part, num_parts, D, cols):
    """Offsets of segment ``part``'s channels in the [S, P, D] per-segment buffers."""
    return (seq.to(tl.int64) * num_parts + part) * D + cols


@triton.jit
def _apply_pair(decay_ptr, value_ptr, at, col_ok, carry):
    """The carried value after a segment with pair (decay, value): decay * carry + value."""
    decay = tl.load(decay_ptr + at, mask=col_ok, other=1.0)
    return decay * carry + tl.load(value_ptr + at, mask=col_ok, other=0.0)


@triton.jit
def _store_pair(decay_ptr, value_ptr, at, col_ok, decay, value):
    tl.store(decay_ptr + at, decay, mask=col_ok)
    tl.store(value_ptr + at, value, mask=col_ok)


@triton.jit
def _forward_tile(c, r, i, mask, rate, carry):
    """(h, a_cum): a tile's states from the state ``carry`` before it, and the running product of alpha."""
    _, alpha, _, _, _, _, beta = _gates(r, i, rate)
    a = tl.where(mask, alpha, 1.0)  # rows past the end carry the state unchanged
    b = tl.where(mask, beta * c, 0.0)
    a_cum, h_local = tl.associative_scan((a, b), axis=0, combine_fn=_pair_combine)
    return a_cum * carry[None, :] + h_local, a_cum


@triton.jit
def _bdlru_forward_kernel(
    c_ptr, g_ptr, z_ptr, rate_ptr,  # inputs
    out_ptr, h_ptr,  # outputs
    decay_ptr, state_ptr,  # per segment: the decay over it and its end state from 0 (_forward_summary_kernel)
    offsets_ptr, T, D, z_stride, segment, num_parts,
    IS_PACKED: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    seq, cols, col_ok, start, end, first, last, part, parts, rate = _program_setup(
        offsets_ptr, rate_ptr, T, D, segment, IS_PACKED, BLOCK_D
    )
    steps = tl.arange(0, CHUNK)
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    for earlier in range(0, tl.where(part < parts, part, 0)):  # the state entering this segment
        carry = _apply_pair(decay_ptr, state_ptr, _pair_at(seq, earlier, num_parts, D, cols), col_ok, carry)
    for k in tl.range(0, tl.cdiv(tl.maximum(last - first, 0), CHUNK), num_stages=STAGES):
        rows = first + k * CHUNK + steps
        mask = (rows < last)[:, None] & col_ok[None, :]
        at, _, c, r, i, z = _load_tile(c_ptr, g_ptr, z_ptr, rows, cols, mask, D, z_stride)
        h, _ = _forward_tile(c, r, i, mask, rate, carry)
        out = z * tl.sigmoid(z) * h
        tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptr + at, h, mask=mask)
        carry = _last_row(h, steps, CHUNK)


@triton.jit
def _forward_summary_kernel(
    c_ptr, g_ptr, rate_ptr,  # inputs
    decay_ptr, state_ptr,  # outputs [S, P, D]: prod alpha over the segment, its end state from 0
    offsets_ptr, T, D, segment, num_parts,
    IS_PACKED: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    seq, cols, col_ok, start, end, first, last, part, parts, rate = _program_setup(
        offsets_ptr, rate_ptr, T, D, segment, IS_PACKED, BLOCK_D
    )
    steps = tl.arange(0, CHUNK)
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    decay = tl.full([BLOCK_D], 1.0, dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(tl.maximum(last - first, 0), CHUNK), num_stages=STAGES):
        rows = first + k * CHUNK + steps
        mask = (rows < last)[:, None] & col_ok[None, :]
        _, _, c, r, i = _load_gate_inputs(c_ptr, g_ptr, rows, cols, mask, D)
        h, a_cum = _forward_tile(c, r, i, mask, rate, carry)
        carry = _last_row(h, steps, CHUNK)
        decay *= _last_row(a_cum, steps, CHUNK)
    _store_pair(decay_ptr, state_ptr, _pair_at(seq, part, num_parts, D, cols), col_ok, decay, carry)


@triton.jit
def _backward_tile_rows(first, last, k, num_chunks, steps, CHUNK: tl.constexpr):
    """Rows of backward tile ``k`` of a segment: tile row 0 is the latest step, so a forward scan
    over the tile runs back in time."""
    rows = first + (num_chunks - 1 - k) * CHUNK + (CHUNK - 1 - steps)
    return rows, rows < last


@triton.jit
def _delta_inputs(g_ptr, z_ptr, dout_ptr, at, at_gate, rows, row_ok, cols, col_ok, end, D, z_stride, rate):
    """(alpha_{t+1}, dout * SiLU'(...) pieces) of a backward tile: alpha of the next step (0 past
    the sequence's end; 1 on rows past the segment, which pass the carried delta through), z, dout
    and g = dout * SiLU(z), the delta recurrence's input."""
    mask = row_ok[:, None] & col_ok[None, :]
    has_next = mask & (rows + 1 < end)[:, None]
    r_next = tl.load(g_ptr + at_gate + 2 * D, mask=has_next, other=0.0).to(tl.float32)
    alpha_next = tl.where(has_next, tl.exp(-rate[None, :] * tl.sigmoid(r_next)), 0.0)
    alpha_next = tl.where(row_ok[:, None], alpha_next, 1.0)
    z = tl.load(z_ptr + rows[:, None] * z_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + at, mask=mask, other=0.0).to(tl.float32)
    sig_z = tl.sigmoid(z)
    g = tl.where(mask, dout * z * sig_z, 0.0)
    return alpha_next, z, sig_z, dout, g


@triton.jit
def _bdlru_backward_kernel(
    c_ptr, g_ptr, z_ptr, rate_ptr, h_ptr, dout_ptr,  # inputs
    dc_ptr, dg_ptr, dz_ptr, drate_ptr,  # outputs
    decay_ptr, delta_ptr,  # per segment: prod alpha_{t+1} over it and its first delta from 0 (_backward_summary_kernel)
    offsets_ptr, T, D, z_stride, segment, num_parts,
    IS_PACKED: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    seq, cols, col_ok, start, end, first, last, part, parts, rate = _program_setup(
        offsets_ptr, rate_ptr, T, D, segment, IS_PACKED, BLOCK_D
    )
    steps = tl.arange(0, CHUNK)
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)  # delta of the first row of the later tile
    for later in range(0, parts - 1 - part):  # delta at the first row of the next segment
        at = _pair_at(seq, parts - 1 - later, num_parts, D, cols)
        carry = _apply_pair(decay_ptr, delta_ptr, at, col_ok, carry)
    drate = tl.zeros([BLOCK_D], dtype=tl.float32)
    num_chunks = tl.cdiv(tl.maximum(last - first, 0), CHUNK)
    for k in tl.range(0, num_chunks, num_stages=STAGES):
        rows, row_ok = _backward_tile_rows(first, last, k, num_chunks, steps, CHUNK)
        mask = row_ok[:, None] & col_ok[None, :]
        at, at_gate, c, r, i = _load_gate_inputs(c_ptr, g_ptr, rows, cols, mask, D)
        alpha_next, z, sig_z, dout, g = _delta_inputs(
            g_ptr, z_ptr, dout_ptr, at, at_gate, rows, row_ok, cols, col_ok, end, D, z_stride, rate
        )
        h = tl.load(h_ptr + at, mask=mask, other=0.0)
        has_prev = mask & (rows > start)[:, None]
        h_prev = tl.load(h_ptr + at - D, mask=has_prev, other=0.0)

        sig_r, alpha, q, alpha_over_q, clamped, sig_i, beta = _gates(r, i, rate)
        a_cum, delta_local = tl.associative_scan((alpha_next, g), axis=0, combine_fn=_pair_combine)
        delta = a_cum * carry[None, :] + delta_local
        carry = _last_row(delta, steps, CHUNK)

        d_beta = delta * c
        d_q = d_beta * sig_i
        d_alpha = delta * h_prev + tl.where(clamped, 0.0, -d_q * alpha_over_q)
        d_r = d_alpha * (-rate[None, :] * alpha) * sig_r * (1.0 - sig_r)
        d_i = d_q * q * (1.0 - sig_i)
        d_z = dout * h * sig_z * (1.0 + z * (1.0 - sig_z))
        drate += tl.sum(tl.where(mask, -d_alpha * alpha * sig_r, 0.0), axis=0)
        tl.store(dc_ptr + at, (delta * beta).to(dc_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + at_gate, d_r.to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + at_gate + D, d_i.to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptr + at, d_z.to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(drate_ptr + _pair_at(seq, part, num_parts, D, cols), drate, mask=col_ok)


@triton.jit
def _backward_summary_kernel(
    g_ptr, z_ptr, rate_ptr, dout_ptr,  # inputs
    decay_ptr, delta_ptr,  # outputs [S, P, D]: prod alpha_{t+1} over the segment, its first delta from 0
    offsets_ptr, T, D, z_stride, segment, num_parts,
    IS_PACKED: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    seq, cols, col_ok, start, end, first, last, part, parts, rate = _program_setup(
        offsets_ptr, rate_ptr, T, D, segment, IS_PACKED, BLOCK_D
    )
    steps = tl.arange(0, CHUNK)
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    decay = tl.full([BLOCK_D], 1.0, dtype=tl.float32)
    num_chunks = tl.cdiv(tl.maximum(last - first, 0), CHUNK)
    for k in tl.range(0, num_chunks, num_stages=STAGES):
        rows, row_ok = _backward_tile_rows(first, last, k, num_chunks, steps, CHUNK)
        at = rows[:, None] * D + cols[None, :]
        at_gate = rows[:, None] * (2 * D) + cols[None, :]
        alpha_next, _, _, _, g = _delta_inputs(
            g_ptr, z_ptr, dout_ptr, at, at_gate, rows, row_ok, cols, col_ok, end, D, z_stride, rate
        )
        a_cum, delta_local = tl.associative_scan((alpha_next, g), axis=0, combine_fn=_pair_combine)
        carry = _last_row(a_cum * carry[None, :] + delta_local, steps, CHUNK)
        decay *= _last_row(a_cum, steps, CHUNK)
    _store_pair(decay_ptr, delta_ptr, _pair_at(seq, part, num_parts, D, cols), col_ok, decay, carry)
