"""Synthetic sequences over a large Zipf catalog with learnable structure (the 10M-item workload).

Items belong to topics (item id - 1 = topic + T * rank). A user stays in a topic and switches to
another (drawn by topic popularity) with probability ``topic_switch`` at each step; within a
topic, items are drawn by a Zipf law over their rank. So popularity over the whole catalog is
Zipf-like (a handful of items per topic take most interactions, most of the V items are rare or
never seen), and the next item is predictable from the history: a model that recognises the
current topic ranks its popular items first, while a popularity ranking cannot.
"""

from dataclasses import dataclass

import numpy as np

from ..fields import require, typed_fields
from .sequences import SequenceData


@dataclass
class SyntheticConfig:
    """Size and shape of the synthetic workload (``data.format: synthetic``)."""

    num_items: int = 10_000_000
    num_users: int = 20_000
    mean_length: int = 30
    min_length: int = 5
    zipf_exponent: float = 1.1
    num_topics: int = 1000
    topic_switch: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        typed_fields(self, "data.synthetic")
        require(
            self.num_topics >= 1 and self.num_items % self.num_topics == 0,
            f"data.synthetic.num_items={self.num_items} must be a multiple of num_topics={self.num_topics}",
        )
        require(
            3 <= self.min_length <= self.mean_length,
            f"data.synthetic lengths: need 3 <= min_length ({self.min_length}) <= mean_length ({self.mean_length})",
        )
        require(self.num_users >= 1, f"data.synthetic.num_users={self.num_users} must be >= 1")
        require(0.0 <= self.topic_switch <= 1.0, f"data.synthetic.topic_switch={self.topic_switch} must be in [0, 1]")


def _zipf_cdf(size: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, size + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def synthetic_sequences(config: SyntheticConfig) -> SequenceData:
    """CSR sequences (ids 1..num_items, all of them in the catalog whether seen or not)."""
    c = config
    rng = np.random.default_rng(c.seed)
    lengths = c.min_length + rng.poisson(c.mean_length - c.min_length, c.num_users)
    offsets = np.zeros(c.num_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    per_topic = c.num_items // c.num_topics
    ranks = np.searchsorted(_zipf_cdf(per_topic, c.zipf_exponent), rng.random(total))
    topics = np.searchsorted(_zipf_cdf(c.num_topics, c.zipf_exponent), rng.random(total))
    switch = rng.random(total) < c.topic_switch
    switch[offsets[:-1]] = True  # every user starts in a fresh topic
    last_switch = np.maximum.accumulate(np.where(switch, np.arange(total), 0))
    items = 1 + topics[last_switch] + c.num_topics * np.minimum(ranks, per_topic - 1)
    return SequenceData(
        offsets=offsets,
        items=items.astype(np.int64),
        num_items=c.num_items,
        item_tokens=np.arange(c.num_items + 1, dtype=np.int32),
        user_tokens=np.arange(c.num_users, dtype=np.int32),
    )
