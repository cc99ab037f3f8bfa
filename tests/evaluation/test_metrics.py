import math

import pytest
import torch

from recblr_torchrec.evaluation import metrics_from_ranks, target_ranks


def brute_force_ranks(scores, targets):
    """Pessimistic ranks by sorting: position of the target after every non-padding item that ties or beats it."""
    ranks = []
    for row, target in zip(scores.tolist(), targets.tolist()):
        others = [s for j, s in enumerate(row) if j not in (0, target)]
        ranks.append(sum(1 for s in others if s >= row[target]))
    return torch.tensor(ranks)


@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
def test_ranks_match_brute_force_with_ties_at_every_chunk_size(chunk):
    torch.manual_seed(chunk)
    users, items, dim = 40, 23, 1
    # integer scores from a rank-1 product make many exact ties
    user_vectors = torch.randint(-2, 3, (users, dim)).float()
    table = torch.randint(-3, 4, (items, dim)).float()
    targets = torch.randint(1, items, (users,))
    ranks = target_ranks(user_vectors, targets, lambda s, e: table[s:e], items, chunk)
    assert torch.equal(ranks, brute_force_ranks(user_vectors @ table.T, targets))


def test_metrics_match_their_definitions():
    ranks = torch.tensor([0, 3, 9, 10, 19, 25])
    m = metrics_from_ranks(ranks, ks=(10, 20))
    hits10, hits20 = [0, 3, 9], [0, 3, 9, 10, 19]
    assert math.isclose(m["HR@10"], 3 / 6) and math.isclose(m["HR@20"], 5 / 6)
    assert math.isclose(m["NDCG@10"], sum(1 / math.log2(r + 2) for r in hits10) / 6)
    assert math.isclose(m["MRR@20"], sum(1 / (r + 1) for r in hits20) / 6)


def test_padding_is_never_a_candidate_and_constant_scores_rank_last():
    table = torch.zeros(6, 2)
    table[0] = 100.0  # a huge padding score must not push the target down
    user = torch.ones(1, 2)
    table[3] = 1.0
    assert target_ranks(user, torch.tensor([3]), lambda s, e: table[s:e], 6, 4).item() == 0
    constant = torch.zeros(6, 2)
    assert target_ranks(user, torch.tensor([3]), lambda s, e: constant[s:e], 6, 4).item() == 4


def test_nan_scores_and_bad_targets_raise():
    table = torch.randn(5, 2)
    with pytest.raises(FloatingPointError, match="NaN"):
        target_ranks(torch.full((1, 2), float("nan")), torch.tensor([1]), lambda s, e: table[s:e], 5, 5)
    with pytest.raises(ValueError, match=r"targets must be in \[1, 5\)"):
        target_ranks(torch.randn(1, 2), torch.tensor([0]), lambda s, e: table[s:e], 5, 5)
