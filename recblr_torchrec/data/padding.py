"""Filler sequences that pad a batch to a few fixed position counts, so that a captured CUDA
graph replays for every batch of a run (``train.cuda_graphs``)."""

import numpy as np


def filler_count(quantum: int, longest: int) -> int:
    """How many filler sequences ``filler_lengths`` adds to every batch (see there)."""
    if longest < 2:
        raise ValueError(f"longest={longest}: fillers of at most one position cannot absorb a varying remainder")
    return max(1, -(-(quantum - 1) // (longest - 1)))


def filler_lengths(num_values: int, quantum: int, longest: int) -> np.ndarray:
    """Lengths of the filler sequences that pad ``num_values`` positions up to a multiple of ``quantum``.

    Always ``ceil((quantum - 1) / (longest - 1))`` of them (at least one), each 1 to ``longest``
    long (``longest`` >= 2), together ``count`` to ``quantum + count - 1`` positions, so every full
    batch of a run has the same number of sequences and one of few position counts: the shapes a
    captured CUDA graph replays (``train.cuda_graphs``). The bound: ``count`` pieces of at most
    ``longest`` hold ``quantum + count - 1`` when ``count * (longest - 1) >= quantum - 1``.
    """
    count = filler_count(quantum, longest)
    total = -(-(num_values + count) // quantum) * quantum - num_values
    return (total // count + (np.arange(count) < total % count)).astype(np.int64)
