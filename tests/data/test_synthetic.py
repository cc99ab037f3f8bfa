"""The synthetic large-catalog workload: shape, determinism and the structure a model can learn."""

import os

import numpy as np

from recblr_torchrec.config import load_config
from recblr_torchrec.data.synthetic import SyntheticConfig, synthetic_sequences

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sequences_cover_the_catalog_ids_and_repeat_for_a_seed():
    config = SyntheticConfig(num_items=50_000, num_users=300, mean_length=12, num_topics=50, seed=3)
    data = synthetic_sequences(config)
    assert data.num_items == 50_000 and data.num_users == 300
    assert data.items.min() >= 1 and data.items.max() <= 50_000
    assert data.lengths.min() >= config.min_length
    assert np.array_equal(data.items, synthetic_sequences(config).items)


def test_users_stay_in_a_topic_and_popularity_is_skewed():
    config = SyntheticConfig(num_items=100_000, num_users=500, mean_length=30, num_topics=100, topic_switch=0.1)
    data = synthetic_sequences(config)
    topics = (data.items - 1) % config.num_topics
    same = topics[1:] == topics[:-1]
    same[data.offsets[1:-1] - 1] = False  # pairs across users
    within = len(topics) - data.num_users
    assert 0.85 < same.sum() / within < 0.95  # ~ 1 - topic_switch (+ switches back to the same topic)
    counts = np.sort(np.bincount(data.items))[::-1]
    assert counts[:100].sum() > 0.3 * counts.sum()  # a few items take a large share (Zipf)


def test_the_10m_config_row_wise_shards_its_item_table():
    config = load_config(os.path.join(ROOT, "configs", "synthetic-10m.yaml"))
    assert config.data.format == "synthetic" and config.data.synthetic.num_items == 10_000_000
    assert config.distributed.sharding_types == {"item": "row_wise"} and config.train.loss == "sampled"
