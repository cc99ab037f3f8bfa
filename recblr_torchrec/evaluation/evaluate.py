"""Evaluates a model over a split with full ranking, in bounded memory."""

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..data.batch import Batch
from ..modules.recommender import ITEM_TABLE, SequenceRecommender, scoring_items
from .metrics import RankingMetrics, target_ranks

CACHE_LIMIT = 1 << 26  # floats of catalog embeddings kept across batches (256 MB in fp32)


@torch.no_grad()
def evaluate(
    model: SequenceRecommender,
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
    When every shard of the item table holds whole rows (table-wise, row-wise), each rank scores
    all ranks' users against its own rows and the counts are summed (``sharded_target_ranks``),
    so the catalog never travels; column-wise tables are looked up through the collection.
    """
    was_training = model.training
    model.eval()
    try:
        # The catalog's embeddings are looked up once per evaluation, chunk by chunk, unless the
        # table is too large to hold twice (then each batch looks its chunks up again).
        chunks = {}
        cache = model.num_embeddings * model.embedding_dim <= CACHE_LIMIT

        def item_chunk(start: int, end: int) -> torch.Tensor:
            if not cache:
                return model.item_vectors(model.item_table(start, end))
            if (start, end) not in chunks:
                chunks[(start, end)] = model.item_vectors(model.item_table(start, end))
            return chunks[(start, end)]

        metrics = RankingMetrics(ks)
        shards = local_rows(model, process_group) if process_group is not None else None
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            last = batch.offsets[1:] - 1
            users = model.user_vectors(model(batch.item_history, batch.context, rows=last))  # at the last positions
            targets = batch.last_targets()
            real = batch.user_ids >= 0
            if shards is not None:  # rank against the rows this rank holds; no catalog lookups
                ranks = sharded_target_ranks(
                    users, targets, shards, item_chunk_size, process_group, model.config.score_temperature
                )
                if bool(real.any()):
                    metrics.update(ranks[real])
                continue
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


def local_rows(model: SequenceRecommender, group: dist.ProcessGroup) -> Optional[List[Tuple[int, Tensor]]]:
    """(first row, rows [R, d]) of the item table on this rank, when every rank's shards hold whole
    rows (table-wise, row-wise); None otherwise (unsharded, column-wise), agreed over the ranks."""
    weight = model.item_embeddings.state_dict().get(f"embeddings.{ITEM_TABLE}.weight")
    shards: Optional[List[Tuple[int, Tensor]]] = None
    if weight is not None and hasattr(weight, "local_shards"):
        width = model.embedding_dim
        local = weight.local_shards()
        if all(shard.metadata.shard_sizes[1] == width for shard in local):
            shards = [(int(shard.metadata.shard_offsets[0]), shard.tensor) for shard in local]
    device = model.encoder.input_norm.weight.device
    usable = torch.tensor([1 if shards is not None else 0], device=device)
    dist.all_reduce(usable, op=dist.ReduceOp.MIN, group=group)
    return shards if int(usable) == 1 else None


def sharded_target_ranks(
    users: Tensor,
    targets: Tensor,
    shards: List[Tuple[int, Tensor]],
    chunk: int,
    group: dist.ProcessGroup,
    temperature: float = 0.0,
) -> Tensor:
    """Pessimistic ranks of this rank's users (as ``target_ranks``) from row shards spread over ranks.

    Every rank gathers all ranks' users [B_r, d] and targets, scores them against its own rows
    in chunks, fills in the target scores of the targets it holds (all-reduced: each target row
    lives on one rank), counts the rows scoring at least as high, and the counts are summed.
    """
    world = dist.get_world_size(group)
    size = torch.tensor([users.shape[0]], device=users.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded_users = users.new_zeros(longest, users.shape[1])
    padded_users[: users.shape[0]] = users
    padded_targets = targets.new_zeros(longest)
    padded_targets[: targets.shape[0]] = targets
    all_users = [torch.empty_like(padded_users) for _ in range(world)]
    all_targets = [torch.empty_like(padded_targets) for _ in range(world)]
    dist.all_gather(all_users, padded_users, group=group)
    dist.all_gather(all_targets, padded_targets, group=group)
    every_user = torch.cat([u[:n] for u, n in zip(all_users, sizes)])
    every_target = torch.cat([t[:n] for t, n in zip(all_targets, sizes)])

    def blocks():
        for first, rows in shards:
            for start in range(0, rows.shape[0], chunk):
                block = scoring_items(rows[start : start + chunk], temperature).to(every_user.dtype)
                yield first + start, (every_user @ block.T).float()

    target_scores = torch.zeros(every_user.shape[0], dtype=torch.float32, device=users.device)
    for low, scores in blocks():
        inside = torch.nonzero((every_target >= low) & (every_target < low + scores.shape[1]), as_tuple=True)[0]
        target_scores[inside] = scores[inside, every_target[inside] - low]
    dist.all_reduce(target_scores, group=group)
    if bool(torch.isnan(target_scores).any()):
        raise FloatingPointError("the model produced NaN scores; check the learning rate and the inputs")
    counts = torch.zeros(every_user.shape[0], dtype=torch.long, device=users.device)
    for low, scores in blocks():
        ahead = scores >= target_scores[:, None]
        if low == 0:
            ahead[:, 0] = False  # padding is not a candidate
        counts += ahead.sum(dim=1)
    dist.all_reduce(counts, group=group)
    mine = sum(sizes[: dist.get_rank(group)])
    return counts[mine : mine + users.shape[0]] - 1
