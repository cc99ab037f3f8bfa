"""Evaluates a model over a split with full ranking, in bounded memory."""

from typing import Dict, Iterable, Sequence

import torch

from ..data.batches import Batch
from ..modules.recblr import RecBLR, last_positions
from .metrics import RankingMetrics, target_ranks


@torch.no_grad()
def evaluate(
    model: RecBLR,
    batches: Iterable[Batch],
    device: torch.device,
    ks: Sequence[int] = (10, 20),
    item_chunk_size: int = 65536,
) -> Dict[str, float]:
    """HR/NDCG/MRR at each K over every batch (one sequence per user, target after its end)."""
    was_training = model.training
    model.eval()
    try:
        # The catalog's embeddings are looked up once per evaluation, chunk by chunk.
        chunks = {}

        def item_chunk(start: int, end: int) -> torch.Tensor:
            if (start, end) not in chunks:
                chunks[(start, end)] = model.item_table(start, end)
            return chunks[(start, end)]

        metrics = RankingMetrics(ks)
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            users = last_positions(model(batch.item_history), batch.offsets)
            metrics.update(target_ranks(users, batch.last_targets(), item_chunk, model.num_embeddings, item_chunk_size))
        return metrics.compute()
    finally:
        model.train(was_training)
