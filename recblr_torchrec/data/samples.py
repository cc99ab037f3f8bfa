"""Training protocols and evaluation splits: which slices of the user sequences are samples.

A sample is a contiguous slice ``items[start:start+length]`` of one user's sequence; the target
of every position is the item right after it in the same user's sequence. Training samples come
from the training part (all but the last two items), evaluation samples end just before the
validation or the test item (leave-one-out, docs/data.md).
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .sequences import SequenceData

HELD_OUT = {"valid": 2, "test": 1}  # items after the input: valid ends before the second-to-last


@dataclass
class Samples:
    """Slices of the flat item array: sample j is items[starts[j]:starts[j]+lengths[j]] of user users[j].

    ``all_targets``: every position has a loss target (the next item); otherwise only the last.
    ``context``: with ``all_targets``, how many leading positions of each sample are input only,
    with no target (None: none).
    """

    starts: np.ndarray
    lengths: np.ndarray
    users: np.ndarray
    all_targets: bool
    context: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.starts)

    def target_count(self, index: np.ndarray) -> int:
        """Loss targets of the samples at ``index``."""
        if not self.all_targets:
            return len(index)
        count = int(self.lengths[index].sum())
        return count if self.context is None else count - int(self.context[index].sum())


def training_samples(data: SequenceData, max_len: int, protocol: str, window_context: int = 0) -> Samples:
    """Samples from every user's training part (all items but the last two).

    - ``all_positions``: the training part cut from its end into chunks of T - C positions, each
      position predicting the next item, so every training target is used once. Each chunk's
      window is the T inputs that end with it: the up to C positions before the chunk (where the
      user's history has them) are its context, read by the encoder but without a target, so a
      chunk's first positions predict from history as evaluation's do. C = ``window_context``; 0
      gives disjoint windows of T, every position a target.
    - ``prefixes``: one sample per prefix (the paper's protocol), the last T items of it kept,
      predicting the item after it.
    """
    train_len = data.lengths - 2
    users = np.arange(data.num_users)
    if protocol == "all_positions":
        if not 0 <= window_context < max_len:
            raise ValueError(f"window_context={window_context} must be in [0, max_len={max_len})")
        chunk = max_len - window_context
        inputs = train_len - 1  # the last training item is a target only
        # a history of at most T inputs is one window; a longer one, chunks from its end down to an
        # earliest window that starts at its first item and is all targets
        windows = np.where(inputs > 0, 1 + -(-np.maximum(0, inputs - max_len) // chunk), 0)
        user = np.repeat(users, windows)
        first = np.cumsum(windows) - windows
        j = np.arange(windows.sum()) - np.repeat(first, windows)  # 0 = the window at the end
        end = inputs[user] - j * chunk
        earliest = j == windows[user] - 1
        start = np.where(earliest, 0, end - max_len)
        context = np.where(earliest, 0, window_context) if window_context else None
        return Samples(data.offsets[user] + start, end - start, user, all_targets=True, context=context)
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
