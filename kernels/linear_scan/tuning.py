"""Tile shape and schedule of the linear-scan kernels: ``ScanConfig`` and the defaults ``default_config``
picks per shape, dtype and direction (tuned on the H200; tiny tiles under the Triton interpreter)."""

from dataclasses import dataclass
from typing import Any, Dict, Optional

import triton

__all__ = ["ScanConfig", "default_config"]


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

    def launch_options(self) -> Dict[str, Any]:
        """The kernels' schedule constants and launch options for this configuration."""
        return {
            "DYNAMIC_ORDER": self.dynamic_order,
            "CHUNK": self.chunk,
            "BLOCK_D": self.block_d,
            "LOOKBACK": self.lookback,
            "REPLICAS": self.replicas,
            "WINDOW_ROWS": self.window_rows,
            "num_warps": self.num_warps,
        }


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

    The best of the H200 sweep of ``benchmarks/bench_linear_scan.py`` (docs/kernels.md); a
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
