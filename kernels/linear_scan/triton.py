"""Triton kernels for the linear scan h_t = a_t * h_{t-1} + b_t, forward and backward.

Design (the op is memory-bound: 12 bytes per fp32 element forward, 20 backward):

* Channels-last tiles. A tile is ``[CHUNK, BLOCK_D]``: CHUNK consecutive steps of one sequence and
  BLOCK_D channels, loaded once, coalesced along D. Inside the tile the pair operator
  ``(a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2)`` is scanned with ``tl.associative_scan``.
* One tile per program, chained in time. The tiles of one (sequence, channel block) form a chain;
  a program scans its tile with a zero state, then waits for the state its predecessor publishes,
  applies it (``h = A_cum * carry + B_cum``), publishes its own last state and writes h. Every
  element is read once and written once, whatever the split of time into tiles, so a few long
  sequences (32 x 8192) fill the GPU as well as many short ones, with no second pass.
* Progress without co-residency. A tile waits only on tiles with smaller numbers, and tile
  numbers follow the program id, which GPUs dispatch in increasing order (the property CUB's
  single-pass scan relies on); ``ScanConfig.dynamic_order`` takes them from an atomic counter
  instead (start order, slower on the H200).
* Self-validating carries. A published state is one int32 word per channel: the fp32 bits with
  the sign flipped (after -0.0 -> +0.0), so the zeroed scratch word means "not yet". A reader
  spins on its own words only, so no fence or flag protocol across threads is needed. The scratch
  is zeroed per call, which keeps the op correct under CUDA graphs and torch.compile. Optionally
  (``ScanConfig.lookback``) a tile also publishes its local aggregate and a reader combines the
  last few aggregates with an older state, so a long chain advances several tiles per hop.
* Jagged input. Packed [N, D] rows with TorchRec offsets are read in place: a device-side table
  maps each chunk number to its sequence (``torch.searchsorted``), so nothing is padded and the
  host never synchronises. Rows past a sequence's end act as the identity pair (a=1, b=0).
* Backward is the same machine run backwards in time: delta_t = g_t + a_{t+1} delta_{t+1}, scanned
  over tiles loaded in reverse row order, then dlog_a_t = delta_t a_t h_{t-1}, db_t = delta_t,
  dh0 = a_1 delta_1. It reads the saved h (shifted one step) rather than recomputing it, which
  moves the same bytes as recomputation without a second pass.

Both kernels are registered as one torch custom op with a fake implementation and an autograd
formula, so ``torch.compile`` sees a single opaque node (no graph break); eager calls go through
an equivalent ``torch.autograd.Function``, which costs less host time. Under
``TRITON_INTERPRET=1`` they run on CPU tensors, at tiny shapes (tests).

Shape letters: B batch, T time, D channels, N packed rows, S sequences.
"""

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["ScanConfig", "default_config", "linear_scan_triton", "scan_backward", "scan_forward"]

# Published states are int32 words: the fp32 bits with the sign bit flipped, after -0.0 is made +0.0,
# so no published value is the all-zero word that marks "not yet written" in the zeroed scratch.
_SIGN_BIT: tl.constexpr = tl.constexpr(-(2**31))


@triton.jit
def _pair_combine(a_left, b_left, a_right, b_right):
    # (a_left, b_left) followed by (a_right, b_right): h -> a_right * (a_left * h + b_left) + b_right.
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _last_row(x, rows, CHUNK: tl.constexpr):
    # Row CHUNK-1 of a [CHUNK, BLOCK_D] tile as a [BLOCK_D] vector (where, not a product: inf-safe).
    return tl.sum(tl.where(rows[:, None] == CHUNK - 1, x, 0.0), axis=0)


@triton.jit
def _publish(ptr, slot, value, BLOCK_D: tl.constexpr):
    bits = tl.where(value == 0.0, 0.0, value).to(tl.int32, bitcast=True) ^ _SIGN_BIT
    tl.store(ptr + slot.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D), bits)


@triton.jit
def _wait_for(ptrs, mask):
    """Spins until every word under ``mask`` is published; returns them as fp32.

    Each 32-bit word is written once, whole. ``ptrs`` must have at least 4 elements per thread:
    a smaller tensor is replicated across threads, and a reduction reads one replica only, so
    another replica could still hold a word loaded before it was written.
    """
    word = tl.load(ptrs, mask=mask, other=_SIGN_BIT, volatile=True)
    while tl.min(tl.min((word != 0).to(tl.int32), axis=1), axis=0) == 0:
        word = tl.load(ptrs, mask=mask, other=_SIGN_BIT, volatile=True)
    return (word ^ _SIGN_BIT).to(tl.float32, bitcast=True)


@triton.jit
def _carry_in(
    agg_ptr,
    incl_ptr,
    num_slots,
    slot0,
    order,
    init,
    BLOCK_D: tl.constexpr,
    LOOKBACK: tl.constexpr,
    REPLICAS: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
):
    """The state entering tile ``order`` of the chain whose tile 0 has scratch slot ``slot0``.

    It is the inclusive state published by tile ``order - LOOKBACK`` (``init`` if there is none)
    carried through the aggregates (A, H) that tiles ``order - LOOKBACK + 1 .. order - 1``
    publish as soon as their own local scan is done: the chain advances LOOKBACK tiles per hop.
    """
    lanes = tl.arange(0, BLOCK_D)
    if order >= LOOKBACK:
        # REPLICAS identical rows of pointers: enough elements that no thread holds a replica.
        replica = tl.arange(0, REPLICAS)
        base_offs = (slot0 + order - LOOKBACK).to(tl.int64) * BLOCK_D + lanes + 0 * replica[:, None]
        words = _wait_for(incl_ptr + base_offs, (replica < REPLICAS)[:, None] & (lanes < BLOCK_D)[None, :])
        base = tl.sum(tl.where(replica[:, None] == 0, words, 0.0), axis=0)
    else:
        base = init
    if LOOKBACK > 1:
        # Row i of the window block reads tile order - LOOKBACK + (i % LOOKBACK); rows past
        # LOOKBACK only replicate (see _wait_for) and enter the scan as the identity pair.
        row = tl.arange(0, WINDOW_ROWS)
        back = order - LOOKBACK + row % LOOKBACK
        wanted = (back >= 0) & (back > order - LOOKBACK)
        mask = wanted[:, None] & (lanes < BLOCK_D)[None, :]
        offs = (slot0 + back).to(tl.int64)[:, None] * BLOCK_D + lanes[None, :]
        used = mask & (row < LOOKBACK)[:, None]
        a_window = tl.where(used, _wait_for(agg_ptr + offs, mask), 1.0)
        h_window = tl.where(used, _wait_for(agg_ptr + num_slots.to(tl.int64) * BLOCK_D + offs, mask), 0.0)
        a_cum, h_cum = tl.associative_scan((a_window, h_window), axis=0, combine_fn=_pair_combine)
        carry = _last_row(a_cum, row, WINDOW_ROWS) * base + _last_row(h_cum, row, WINDOW_ROWS)
    else:
        carry = base
    return carry


@triton.jit
def _locate_tile(
    tile,
    offsets_ptr,
    chunk_offsets_ptr,
    chunk_seq_ptr,
    T,
    num_seq,
    num_d_blocks,
    max_chunks,
    IS_PACKED: tl.constexpr,
    REVERSE: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Maps a tile number to (sequence, channel block, first row, end row, chunk, order in its
    chain, scratch slot of the chain's order-0 tile)."""
    if IS_PACKED:
        # Packed: tiles ordered (sequence, chunk, channel block).
        global_chunk = tile // num_d_blocks
        d_block = tile % num_d_blocks
        seq = tl.load(chunk_seq_ptr + global_chunk).to(tl.int32)
        first_chunk = tl.load(chunk_offsets_ptr + seq).to(tl.int32)
        order = global_chunk - first_chunk
        start = tl.load(offsets_ptr + seq).to(tl.int64)
        end = tl.load(offsets_ptr + seq + 1).to(tl.int64)
        num_chunks = tl.cdiv(end - start, CHUNK).to(tl.int32)
        slot0 = d_block * max_chunks + first_chunk
    else:
        # Dense: tiles ordered (chunk, sequence, channel block), so every chain advances together
        # and a long sequence's tiles are spread over the whole launch.
        num_chains = num_seq * num_d_blocks
        order = tile // num_chains
        chain = tile % num_chains
        seq = chain // num_d_blocks
        d_block = chain % num_d_blocks
        start = seq.to(tl.int64) * T
        end = start + T
        num_chunks = tl.cdiv(T, CHUNK)
        slot0 = chain * num_chunks
    if REVERSE:
        chunk = num_chunks - 1 - order
    else:
        chunk = order
    return seq, d_block, start + chunk.to(tl.int64) * CHUNK, end, chunk, order, slot0


@triton.jit
def _tile_number(counter_ptr, DYNAMIC_ORDER: tl.constexpr):
    # Tiles wait only on tiles with smaller numbers. Launch order (program id) suffices on GPUs,
    # which dispatch the blocks of a 1-D grid in increasing order (CUB's single-pass scan relies
    # on the same); DYNAMIC_ORDER takes numbers from an atomic counter instead, in start order.
    if DYNAMIC_ORDER:
        tile = tl.atomic_add(counter_ptr, 1).to(tl.int32)
    else:
        tile = tl.program_id(0)
    return tile


@triton.jit
def _num_tiles(chunk_offsets_ptr, T, num_seq, num_d_blocks, IS_PACKED: tl.constexpr, CHUNK: tl.constexpr):
    """Tiles in the launch: packed chunks (counted on the device) or dense chunks, times channel blocks."""
    if IS_PACKED:
        num_chunks = tl.load(chunk_offsets_ptr + num_seq).to(tl.int32)
    else:
        num_chunks = num_seq * tl.cdiv(T, CHUNK)
    return num_chunks * num_d_blocks


@triton.jit
def _scan_forward_kernel(
    log_a_ptr,
    b_ptr,
    h_ptr,
    h0_ptr,
    final_ptr,
    offsets_ptr,
    chunk_offsets_ptr,
    chunk_seq_ptr,
    counter_ptr,
    agg_ptr,
    incl_ptr,
    T,
    D,
    num_seq,
    num_d_blocks,
    max_chunks,
    num_slots,
    IS_PACKED: tl.constexpr,
    HAS_H0: tl.constexpr,
    DYNAMIC_ORDER: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LOOKBACK: tl.constexpr,
    REPLICAS: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
):
    tile = _tile_number(counter_ptr, DYNAMIC_ORDER)
    if tile < _num_tiles(chunk_offsets_ptr, T, num_seq, num_d_blocks, IS_PACKED, CHUNK):
        seq, d_block, row0, end, chunk, order, slot0 = _locate_tile(
            tile,
            offsets_ptr,
            chunk_offsets_ptr,
            chunk_seq_ptr,
            T,
            num_seq,
            num_d_blocks,
            max_chunks,
            IS_PACKED,
            False,
            CHUNK,
        )
        steps = tl.arange(0, CHUNK)
        rows = row0 + steps
        cols = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        mask = (rows < end)[:, None] & col_ok[None, :]
        offs = rows[:, None] * D + cols[None, :]
        # Rows past the sequence end load (log_a, b) = (0, 0): the identity step.
        a = tl.exp(tl.load(log_a_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        x = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a_cum, h_local = tl.associative_scan((a, x), axis=0, combine_fn=_pair_combine)
        a_total = _last_row(a_cum, steps, CHUNK)
        h_total = _last_row(h_local, steps, CHUNK)
        has_next = row0 + CHUNK < end
        if has_next and LOOKBACK > 1:
            _publish(agg_ptr, slot0 + order, a_total, BLOCK_D)
            _publish(agg_ptr + num_slots.to(tl.int64) * BLOCK_D, slot0 + order, h_total, BLOCK_D)
        if HAS_H0:
            init = tl.load(h0_ptr + seq * D + cols, mask=col_ok, other=0.0)
        else:
            init = tl.zeros([BLOCK_D], dtype=tl.float32)
        if order == 0:
            carry = init
        else:
            carry = _carry_in(
                agg_ptr, incl_ptr, num_slots, slot0, order, init, BLOCK_D, LOOKBACK, REPLICAS, WINDOW_ROWS
            )
        state = a_total * carry + h_total
        if has_next:
            _publish(incl_ptr, slot0 + order, state, BLOCK_D)
        else:
            tl.store(final_ptr + seq * D + cols, state, mask=col_ok)
        h = a_cum * carry[None, :] + h_local
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scan_backward_kernel(
    grad_h_ptr,
    grad_final_ptr,
    log_a_ptr,
    h_ptr,
    h0_ptr,
    grad_log_a_ptr,
    grad_b_ptr,
    grad_h0_ptr,
    offsets_ptr,
    chunk_offsets_ptr,
    chunk_seq_ptr,
    counter_ptr,
    agg_ptr,
    incl_ptr,
    T,
    D,
    num_seq,
    num_d_blocks,
    max_chunks,
    num_slots,
    IS_PACKED: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_GRAD_FINAL: tl.constexpr,
    DYNAMIC_ORDER: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LOOKBACK: tl.constexpr,
    REPLICAS: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
):
    tile = _tile_number(counter_ptr, DYNAMIC_ORDER)
    if tile < _num_tiles(chunk_offsets_ptr, T, num_seq, num_d_blocks, IS_PACKED, CHUNK):
        seq, d_block, row0, end, chunk, order, slot0 = _locate_tile(
            tile,
            offsets_ptr,
            chunk_offsets_ptr,
            chunk_seq_ptr,
            T,
            num_seq,
            num_d_blocks,
            max_chunks,
            IS_PACKED,
            True,
            CHUNK,
        )
        start = row0 - chunk.to(tl.int64) * CHUNK
        steps = tl.arange(0, CHUNK)
        rows = row0 + (CHUNK - 1 - steps)  # tile row 0 is the latest step: a forward scan runs back in time
        cols = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        mask = (rows < end)[:, None] & col_ok[None, :]
        offs = rows[:, None] * D + cols[None, :]
        g = tl.load(grad_h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # delta_t = g_t + a_{t+1} delta_{t+1}: the decay of step t+1, identity past the end.
        next_mask = (rows + 1 < end)[:, None] & col_ok[None, :]
        a_next = tl.exp(tl.load(log_a_ptr + offs + D, mask=next_mask, other=0.0).to(tl.float32))
        a_cum, delta_local = tl.associative_scan((a_next, g), axis=0, combine_fn=_pair_combine)
        a_total = _last_row(a_cum, steps, CHUNK)
        delta_total = _last_row(delta_local, steps, CHUNK)
        has_next = chunk > 0
        if has_next and LOOKBACK > 1:
            _publish(agg_ptr, slot0 + order, a_total, BLOCK_D)
            _publish(agg_ptr + num_slots.to(tl.int64) * BLOCK_D, slot0 + order, delta_total, BLOCK_D)
        if HAS_GRAD_FINAL:
            init = tl.load(grad_final_ptr + seq * D + cols, mask=col_ok, other=0.0)
        else:
            init = tl.zeros([BLOCK_D], dtype=tl.float32)
        if order == 0:
            carry = init
        else:
            carry = _carry_in(
                agg_ptr, incl_ptr, num_slots, slot0, order, init, BLOCK_D, LOOKBACK, REPLICAS, WINDOW_ROWS
            )
        delta_first = a_total * carry + delta_total  # delta at the chunk's first step
        if has_next:
            _publish(incl_ptr, slot0 + order, delta_first, BLOCK_D)
        elif HAS_H0:
            a_first = tl.exp(tl.load(log_a_ptr + start * D + cols, mask=col_ok, other=0.0).to(tl.float32))
            tl.store(grad_h0_ptr + seq * D + cols, a_first * delta_first, mask=col_ok)
        delta = a_cum * carry[None, :] + delta_local
        a = tl.exp(tl.load(log_a_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        prev_mask = (rows > start)[:, None] & mask
        h_prev = tl.load(h_ptr + offs - D, mask=prev_mask, other=0.0).to(tl.float32)
        if HAS_H0:
            h0 = tl.load(h0_ptr + seq * D + cols, mask=col_ok, other=0.0)
            h_prev = tl.where((rows == start)[:, None], h0[None, :], h_prev)
        tl.store(grad_b_ptr + offs, delta.to(grad_b_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_log_a_ptr + offs, (delta * a * h_prev).to(grad_log_a_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class ScanConfig:
    """Tile shape and schedule of one kernel launch.

    A tile is [chunk, block_d] (steps x channels); ``lookback`` is how many tiles back a tile
    reads published states from (1: a plain chain); ``dynamic_order`` numbers tiles by an
    atomic counter instead of the program id.
    """

    chunk: int
    block_d: int
    num_warps: int
    lookback: int = 1
    dynamic_order: bool = False

    def __post_init__(self) -> None:
        for name in ("chunk", "block_d", "lookback", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"ScanConfig.{name}={value} must be a power of two")

    @property
    def replicas(self) -> int:
        """Rows of the block through which a published state is read: 4 words a thread (_wait_for)."""
        return max(1, 4 * 32 * self.num_warps // self.block_d)

    @property
    def window_rows(self) -> int:
        """Rows of the block through which the look-back window is read (at least ``replicas``)."""
        return max(self.lookback, self.replicas)


def _interpreting() -> bool:
    return triton.knobs.runtime.interpret if hasattr(triton, "knobs") else False


def default_config(channels: int, backward: bool, steps: Optional[int] = None, element_size: int = 4) -> ScanConfig:
    """The tile shape and schedule :func:`linear_scan_triton` uses.

    Args:
        channels: D.
        backward: for the backward kernel.
        steps: T of dense input (None for packed): long sequences take longer tiles, which
            shortens the chain of carried states.
        element_size: bytes per input element; a tile row is 128 bytes (one cache line).

    The best of the H200 sweep of ``benchmarks/bench_linear_scan.py`` (docs/linear_scan.md); a
    look-back > 1 was slower there at every shape, so it stays a tuning option. Under the
    interpreter the chunk is 16 steps and the look-back 2 tiles, so test-sized sequences cross
    several chained tiles and both ways of receiving a state.
    """
    block_d = min(128 // element_size, triton.next_power_of_2(max(channels, 1)))
    if _interpreting():
        return ScanConfig(chunk=16, block_d=block_d, num_warps=1, lookback=2)
    if element_size < 4:
        return ScanConfig(chunk=64, block_d=block_d, num_warps=4)
    long_sequences = steps is not None and steps >= (4096 if backward else 2048)
    if long_sequences:
        return ScanConfig(chunk=64, block_d=block_d, num_warps=4 if backward else 2)
    return ScanConfig(chunk=32, block_d=block_d, num_warps=2)


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
        t.offsets,
        t.chunk_offsets,
        t.chunk_seq,
        t.counter,
        t.aggregates,
        t.inclusive,
        t.steps,
        channels,
        t.num_seq,
        t.num_d_blocks,
        t.max_chunks,
        t.num_tiles,
        IS_PACKED=offsets is not None,
        HAS_H0=h0 is not None,
        DYNAMIC_ORDER=config.dynamic_order,
        CHUNK=config.chunk,
        BLOCK_D=config.block_d,
        LOOKBACK=config.lookback,
        REPLICAS=config.replicas,
        WINDOW_ROWS=config.window_rows,
        num_warps=config.num_warps,
    )
    return h, final


def scan_backward(
    grad_h: Tensor,
    grad_final: Optional[Tensor],
    log_a: Tensor,
    h: Tensor,
    offsets: Optional[Tensor],
    initial_state: Optional[Tensor],
    config: Optional[ScanConfig] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
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
            t.offsets,
            t.chunk_offsets,
            t.chunk_seq,
            t.counter,
            t.aggregates,
            t.inclusive,
            t.steps,
            channels,
            t.num_seq,
            t.num_d_blocks,
            t.max_chunks,
            t.num_tiles,
            IS_PACKED=offsets is not None,
            HAS_H0=h0 is not None,
            HAS_GRAD_FINAL=gf is not None,
            DYNAMIC_ORDER=config.dynamic_order,
            CHUNK=config.chunk,
            BLOCK_D=config.block_d,
            LOOKBACK=config.lookback,
            REPLICAS=config.replicas,
            WINDOW_ROWS=config.window_rows,
            num_warps=config.num_warps,
        )
    if initial_state is None:
        return grad_log_a, grad_b, None
    return grad_log_a, grad_b, grad_h0.to(initial_state.dtype)


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
