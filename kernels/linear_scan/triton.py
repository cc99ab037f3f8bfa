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

Launching them is in the sibling modules: ``tuning.py`` picks the tile shape and schedule
(``ScanConfig``), ``launch.py`` builds the grid, chunk tables and zeroed scratch and runs the
kernels, and ``op.py`` registers both as one torch custom op with a fake implementation and an
autograd formula, so ``torch.compile`` sees a single opaque node (no graph break); eager calls go
through an equivalent ``torch.autograd.Function``, which costs less host time. Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors, at tiny shapes (tests).

Shape letters: B batch, T time, D channels, N packed rows, S sequences.
"""

import triton
import triton.language as tl

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
def _enter_chain(
    agg_ptr, incl_ptr, num_slots, slot0, order, has_next, a_total, local_total, init,
    BLOCK_D: tl.constexpr, LOOKBACK: tl.constexpr, REPLICAS: tl.constexpr, WINDOW_ROWS: tl.constexpr,
):  # fmt: skip
    """The state entering tile ``order`` of its chain (``init`` for the first tile). Before waiting
    for it, a tile with successors publishes its local aggregate (``a_total``, ``local_total``) for
    their look-back, so the chain never waits on a tile that is itself waiting."""
    if has_next and LOOKBACK > 1:
        _publish(agg_ptr, slot0 + order, a_total, BLOCK_D)
        _publish(agg_ptr + num_slots.to(tl.int64) * BLOCK_D, slot0 + order, local_total, BLOCK_D)
    if order == 0:
        carry = init
    else:
        carry = _carry_in(agg_ptr, incl_ptr, num_slots, slot0, order, init, BLOCK_D, LOOKBACK, REPLICAS, WINDOW_ROWS)
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
    log_a_ptr, b_ptr, h_ptr, h0_ptr, final_ptr,
    offsets_ptr, chunk_offsets_ptr, chunk_seq_ptr, counter_ptr, agg_ptr, incl_ptr,  # tiles and carried states
    T, D, num_seq, num_d_blocks, max_chunks, num_slots,
    IS_PACKED: tl.constexpr, HAS_H0: tl.constexpr, DYNAMIC_ORDER: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, LOOKBACK: tl.constexpr, REPLICAS: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
):  # fmt: skip
    tile = _tile_number(counter_ptr, DYNAMIC_ORDER)
    if tile < _num_tiles(chunk_offsets_ptr, T, num_seq, num_d_blocks, IS_PACKED, CHUNK):
        seq, d_block, row0, end, chunk, order, slot0 = _locate_tile(
            tile, offsets_ptr, chunk_offsets_ptr, chunk_seq_ptr, T, num_seq, num_d_blocks, max_chunks,
            IS_PACKED, False, CHUNK,
        )  # fmt: skip
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
        if HAS_H0:
            init = tl.load(h0_ptr + seq * D + cols, mask=col_ok, other=0.0)
        else:
            init = tl.zeros([BLOCK_D], dtype=tl.float32)
        carry = _enter_chain(
            agg_ptr, incl_ptr, num_slots, slot0, order, has_next, a_total, h_total, init,
            BLOCK_D, LOOKBACK, REPLICAS, WINDOW_ROWS,
        )  # fmt: skip
        state = a_total * carry + h_total
        if has_next:
            _publish(incl_ptr, slot0 + order, state, BLOCK_D)
        else:
            tl.store(final_ptr + seq * D + cols, state, mask=col_ok)
        h = a_cum * carry[None, :] + h_local
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scan_backward_kernel(
    grad_h_ptr, grad_final_ptr, log_a_ptr, h_ptr, h0_ptr, grad_log_a_ptr, grad_b_ptr, grad_h0_ptr,
    offsets_ptr, chunk_offsets_ptr, chunk_seq_ptr, counter_ptr, agg_ptr, incl_ptr,  # tiles and carried states
    T, D, num_seq, num_d_blocks, max_chunks, num_slots,
    IS_PACKED: tl.constexpr, HAS_H0: tl.constexpr, HAS_GRAD_FINAL: tl.constexpr, DYNAMIC_ORDER: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, LOOKBACK: tl.constexpr, REPLICAS: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
):  # fmt: skip
    tile = _tile_number(counter_ptr, DYNAMIC_ORDER)
    if tile < _num_tiles(chunk_offsets_ptr, T, num_seq, num_d_blocks, IS_PACKED, CHUNK):
        seq, d_block, row0, end, chunk, order, slot0 = _locate_tile(
            tile, offsets_ptr, chunk_offsets_ptr, chunk_seq_ptr, T, num_seq, num_d_blocks, max_chunks,
            IS_PACKED, True, CHUNK,
        )  # fmt: skip
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
        if HAS_GRAD_FINAL:
            init = tl.load(grad_final_ptr + seq * D + cols, mask=col_ok, other=0.0)
        else:
            init = tl.zeros([BLOCK_D], dtype=tl.float32)
        carry = _enter_chain(
            agg_ptr, incl_ptr, num_slots, slot0, order, has_next, a_total, delta_total, init,
            BLOCK_D, LOOKBACK, REPLICAS, WINDOW_ROWS,
        )  # fmt: skip
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
