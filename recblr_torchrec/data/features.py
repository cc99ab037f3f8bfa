"""The features a batch carries to the TorchRec collections: their keys, and the pooled
user-bucket feature (the user id hashed into buckets)."""

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

ITEM_HISTORY = "item_history"
ITEM_CANDIDATES = "item_candidates"  # the loss's candidate ids, looked up through the item table
USER_BUCKET = "user_bucket"  # pooled context feature: the user id hashed into buckets


def user_bucket_features(users: np.ndarray, buckets: int) -> KeyedJaggedTensor:
    """Key ``user_bucket``: each user id hashed (multiplicatively) into ``buckets``, one per bag."""
    hashed = (np.maximum(users, 0).astype(np.uint64) * np.uint64(2654435761)) % np.uint64(buckets)
    return KeyedJaggedTensor(
        keys=[USER_BUCKET],
        values=torch.from_numpy(hashed.astype(np.int64)),
        lengths=torch.ones(len(users), dtype=torch.int64),
        length_per_key=[len(users)],
    )
