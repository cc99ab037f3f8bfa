"""Full-ranking evaluation: HR@K, NDCG@K and MRR@K with the RecBole protocol (docs/training.md, evaluation).

Every catalog item is scored except the padding id 0; history items are not masked.

Ties: pessimistic, in every code path. The rank of the target (0 = best) is the number of other
non-padding items whose score is >= the target's score, so a target tied with others is ranked
below all of them and a constant scorer earns nothing. Ranks come from counts, never from a
sort, so chunking over users or items cannot change them; the target's own score is read from
the same matrix product as the items it is compared with.
"""

from typing import Callable, Dict, List, Sequence

import torch
from torch import Tensor

METRIC_NAMES = ("HR", "NDCG", "MRR")


def target_ranks(
    user_vectors: Tensor,
    targets: Tensor,
    item_chunk: Callable[[int, int], Tensor],
    num_embeddings: int,
    item_chunk_size: int,
) -> Tensor:
    """Pessimistic 0-based rank of each target among items 1..V-1.

    Args:
        user_vectors: [B, d].
        targets: [B] item ids in [1, V).
        item_chunk: ``(start, end) -> [end - start, d]`` rows of the item table.
        num_embeddings: V, table rows including padding.
        item_chunk_size: items scored at once; bounds memory at [B, item_chunk_size].
    """
    if bool((targets <= 0).any()) or bool((targets >= num_embeddings).any()):
        raise ValueError(f"targets must be in [1, {num_embeddings}); got {targets.tolist()[:8]}...")
    bounds = [(s, min(s + item_chunk_size, num_embeddings)) for s in range(0, num_embeddings, item_chunk_size)]
    target_scores = torch.empty(targets.shape[0], dtype=torch.float32, device=user_vectors.device)
    chunk_scores: List[Tensor] = []
    keep = len(bounds) == 1  # one chunk: score once; several: recompute in the second pass
    for start, end in bounds:
        scores = (user_vectors @ item_chunk(start, end).T).float()
        inside = (targets >= start) & (targets < end)
        rows = torch.nonzero(inside, as_tuple=True)[0]
        target_scores[rows] = scores[rows, targets[rows] - start]
        if keep:
            chunk_scores.append(scores)
    if bool(torch.isnan(target_scores).any()):
        raise FloatingPointError("the model produced NaN scores; check the learning rate and the inputs")
    ranks = torch.zeros(targets.shape[0], dtype=torch.long, device=user_vectors.device)
    for index, (start, end) in enumerate(bounds):
        scores = chunk_scores[index] if keep else (user_vectors @ item_chunk(start, end).T).float()
        ahead = scores >= target_scores[:, None]
        if start == 0:
            ahead[:, 0] = False  # padding is not a candidate
        ranks += ahead.sum(dim=1)
    return ranks - 1  # the target itself satisfies >=


class RankingMetrics:
    """Accumulates sums of HR/NDCG/MRR at each K over batches (and, summed, over ranks)."""

    def __init__(self, ks: Sequence[int] = (10, 20)):
        self.ks = tuple(ks)
        self.sums = torch.zeros(len(METRIC_NAMES) * len(self.ks), dtype=torch.float64)
        self.count = 0

    def update(self, ranks: Tensor) -> None:
        ranks = ranks.detach().to("cpu", torch.float64)
        values = []
        for k in self.ks:
            hit = (ranks < k).to(torch.float64)
            values += [hit.sum(), (hit / torch.log2(ranks + 2.0)).sum(), (hit / (ranks + 1.0)).sum()]
        self.sums += torch.stack(values)
        self.count += ranks.numel()

    def compute(self) -> Dict[str, float]:
        if self.count == 0:
            raise ValueError("no users were evaluated")
        means = (self.sums / self.count).tolist()
        names = [f"{m}@{k}" for k in self.ks for m in METRIC_NAMES]
        return dict(zip(names, means))


def metrics_from_ranks(ranks: Tensor, ks: Sequence[int] = (10, 20)) -> Dict[str, float]:
    acc = RankingMetrics(ks)
    acc.update(ranks)
    return acc.compute()
