"""Candidate sets carried by batches, and each rank's share of a global batch."""

import numpy as np
import pytest
import torch

from recblr_torchrec.data import SampleBatches, build_sequences, training_samples
from recblr_torchrec.data.features import ITEM_CANDIDATES, ITEM_HISTORY
from recblr_torchrec.data.negatives import FullCatalog, SampledCandidates, item_frequencies
from recblr_torchrec.data.readers import Interactions


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(40), 12).astype(str)
    items = (rng.zipf(1.5, len(users)) % 30 + 1).astype(str)
    return build_sequences(Interactions(users, items, np.arange(len(users), dtype=np.float64), "synthetic"), 1, 1)


def test_sampled_candidates_hold_every_target_once_and_repeat_for_the_same_key(data):
    sampler = SampledCandidates(item_frequencies(data), 16, "popularity", seed=1)
    targets = np.array([3, 3, 5, 9])
    ids, log_q = sampler(targets, key=7)
    assert np.all(np.diff(ids) > 0) and set(targets) <= set(ids.tolist())
    assert ids.min() >= 1 and ids.max() <= data.num_items and np.isfinite(log_q).all()
    negatives = sampler._draw(np.random.default_rng([1, 7]))  # the set is exactly np.unique of both
    assert np.array_equal(ids, np.unique(np.concatenate([targets, negatives])))
    again, _ = sampler(targets, key=7)
    assert np.array_equal(ids, again)
    uniform_ids, uniform_q = SampledCandidates(item_frequencies(data), 16, "uniform", seed=1)(targets, key=7)
    assert len(uniform_q) == len(uniform_ids)


def test_popularity_negatives_follow_the_target_frequencies(data):
    frequencies = item_frequencies(data)
    sampler = SampledCandidates(frequencies, 20000, "popularity", seed=0)
    draws = np.bincount(sampler._draw(np.random.default_rng(0)), minlength=len(frequencies))
    expected = frequencies / frequencies.sum() * 20000
    assert draws[0] == 0
    assert np.abs(draws - expected).max() < 6 * np.sqrt(expected.max())


def test_rank_shares_reassemble_the_global_batch_with_fillers_where_empty(data):
    samples = training_samples(data, 5, "all_positions")
    catalog = FullCatalog(data.num_items + 1)
    whole = SampleBatches(data, samples, 7, True, seed=3, candidates=catalog)
    shares = [SampleBatches(data, samples, 7, True, 3, rank=r, world_size=3, candidates=catalog) for r in range(3)]
    for batches in [whole, *shares]:
        batches.set_epoch(2)
    assert len(whole) == len(shares[0]) == len(shares[2])
    for i in range(len(whole)):
        parts = [s[i] for s in shares]
        real = torch.cat([p.user_ids for p in parts])
        assert torch.equal(real[real >= 0], whole[i].user_ids)
        assert all(p.num_targets == whole[i].num_targets for p in parts)
        for p in parts:
            assert torch.equal(p.item_history[ITEM_CANDIDATES].values(), torch.arange(1, data.num_items + 1))
            assert p.offsets[-1] == p.item_history[ITEM_HISTORY].values().numel()
            history = p.item_history[ITEM_HISTORY].values().numel()
            assert p.item_history.length_per_key_or_none() == [history, data.num_items]
    last = [s[len(whole) - 1] for s in shares]
    count = len(samples) - (len(whole) - 1) * 7
    assert sum(int((p.user_ids < 0).sum()) for p in last) == max(0, 3 - count)
