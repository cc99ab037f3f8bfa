"""Evaluates a model over a split with full ranking, in bounded memory."""

from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from ..data.batches import Batch
from ..modules.recblr import RecBLR, last_positions
from .metrics import RankingMetrics, target_ranks

CACHE_LIMIT = 1 << 26  # floats of catalog embeddings kept across batches (256 MB in fp32)


@torch.no_grad()
def evaluate(
    model: RecBLR,
    batches: Iterable[Batch],
    device: torch.device,
    ks: Sequence[int] = (10, 20),
    item_chunk_size: int = 65536,
    process_group: Optional[dist.ProcessGroup] = None,
) -> Dict[str, float]:
    """HR/NDCG/MRR at each K over every batch (one sequence per user, target after its end).

    Distributed: each rank passes its share of the users and the process group; the metric
    sums and user counts are summed over the ranks, so the result equals the single-process
    evaluation. Every rank must see the same number of batches (lookups through sharded tables
    are collectives): ``SampleBatches`` pads with filler rows (user -1), which are skipped.
    """
    was_training = model.training
    model.eval()
    try:
        # The catalog's embeddings are looked up once per evaluation, chunk by chunk, unless the
        # table is too large to hold twice (then each batch looks its chunks up again).
        chunks = {}
        cache = model.num_embeddings * model.config.embedding_dim <= CACHE_LIMIT

        def item_chunk(start: int, end: int) -> torch.Tensor:
            if not cache:
                return model.item_table(start, end)
            if (start, end) not in chunks:
                chunks[(start, end)] = model.item_table(start, end)
            return chunks[(start, end)]

        metrics = RankingMetrics(ks)
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            users = last_positions(model(batch.item_history, batch.context), batch.offsets)
            targets = batch.last_targets()
            real = batch.user_ids >= 0
            if not bool(real.any()):  # a filler-only batch still takes part in the lookups
                target_ranks(users[:1], torch.ones_like(targets[:1]), item_chunk, model.num_embeddings, item_chunk_size)
                continue
            ranks = target_ranks(users[real], targets[real], item_chunk, model.num_embeddings, item_chunk_size)
            metrics.update(ranks)
        if process_group is not None:
            merged = torch.cat([metrics.sums, torch.tensor([float(metrics.count)], dtype=torch.float64)])
            merged = merged.to(device)  # NCCL reduces GPU tensors only
            dist.all_reduce(merged, group=process_group)
            merged = merged.cpu()
            metrics.sums, metrics.count = merged[:-1], int(merged[-1])
        return metrics.compute()
    finally:
        model.train(was_training)
