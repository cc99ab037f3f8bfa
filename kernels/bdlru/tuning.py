"""Tile shape of the BD-LRU kernels: ``_tile`` picks (CHUNK, BLOCK_D, num_warps) per direction,
from the H200 sweeps it cites."""

from typing import Tuple

import triton


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


# Software-pipeline stages of the kernels' loops over tiles (``tl.range(num_stages=...)``): 1 loads
# each tile when its turn comes; 2 or more issue the next tiles' loads while a tile is scanned
# (where Triton's pipeliner takes the loop). ``bench_bdlru.py --stages`` times the choices.
LOOP_STAGES = 2

# Programs that keep a GPU's SMs busy: below this many (sequence, channel block) programs, the
# sequences are cut into segments (a few long sequences: 32 x 8,192 x 128 has 128 programs).
BUSY_PROGRAMS = 1024
MIN_SEGMENT = 256  # rows: shorter segments spend more on their summaries than they gain


def _segment(programs: int, longest: int, mean: int) -> int:
    """Rows per segment (``triton.py``'s docstring): ``longest`` (one segment per sequence) when
    ``programs`` fill the GPU, else the mean length cut into as many parts as fill it, at least
    MIN_SEGMENT rows. ``longest`` bounds every sequence (T dense, the row count packed), ``mean``
    is the rows per sequence."""
    if programs >= BUSY_PROGRAMS or mean <= MIN_SEGMENT:
        return max(longest, 1)
    parts = -(-BUSY_PROGRAMS // max(programs, 1))
    return max(MIN_SEGMENT, -(-mean // parts))
