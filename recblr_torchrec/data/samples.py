"""Training protocols and evaluation splits: which slices of the user sequences are samples.

A sample is a contiguous slice ``items[start:start+length]`` of one user's sequence; the target
of every position is the item right after it in the same user's sequence. Training samples come
from the training part (all but the last two items), evaluation samples end just before the
validation or the test item (leave-one-out, docs/data.md).
"""

from dataclasses import dataclass

import numpy as np

from .sequences import SequenceData

HELD_OUT = {"valid": 2, "test": 1}  # items after the input: valid ends before the second-to-last


@dataclass
class Samples:
    """Slices of the flat item array: sample j is items[starts[j]:starts[j]+lengths[j]] of user users[j].

    ``all_targets``: every position has a loss target (the next item); otherwise only the last.
    """

    starts: np.ndarray
    lengths: np.ndarray
    users: np.ndarray
    all_targets: bool

    def __len__(self) -> int:
        return len(self.starts)


def training_samples(data: SequenceData, max_len: int, protocol: str) -> Samples:
    """Samples from every user's training part (all items but the last two).

    - ``all_positions``: the training part cut from its end into windows of at most T inputs,
      each position predicting the next item, so every training target is used once.
    - ``prefixes``: one sample per prefix (the paper's protocol), the last T items of it kept,
      predicting the item after it.
    """
    train_len = data.lengths - 2
    users = np.arange(data.num_users)
    if protocol == "all_positions":
        inputs = train_len - 1  # the last training item is a target only
        windows = np.maximum(0, -(-inputs // max_len))
        user = np.repeat(users, windows)
        first = np.cumsum(windows) - windows
        j = np.arange(windows.sum()) - np.repeat(first, windows)  # 0 = the window at the end
        end = inputs[user] - j * max_len
        start = np.maximum(0, end - max_len)
        return Samples(data.offsets[user] + start, end - start, user, all_targets=True)
    if protocol == "prefixes":
        count = np.maximum(0, train_len - 1)
        user = np.repeat(users, count)
        first = np.cumsum(count) - count
        end = np.arange(count.sum()) - np.repeat(first, count) + 1  # prefix ends 1..train_len-1
        start = np.maximum(0, end - max_len)
        return Samples(data.offsets[user] + start, end - start, user, all_targets=False)
    raise ValueError(f"unknown training protocol {protocol!r}; choose all_positions or prefixes")


def evaluation_samples(data: SequenceData, max_len: int, split: str) -> Samples:
    """One sample per user: the last T items before the validation or test target."""
    if split not in HELD_OUT:
        raise ValueError(f"unknown split {split!r}; choose valid or test")
    end = data.lengths - HELD_OUT[split]
    start = np.maximum(0, end - max_len)
    users = np.arange(data.num_users)
    return Samples(data.offsets[:-1] + start, end - start, users, all_targets=False)
