"""Interactions -> per-user item sequences in CSR form, k-core filtered, ids dense from 1.

The CSR arrays are cached as .npy, keyed by the source file and the filtering settings, so a
second start costs milliseconds.
"""

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from .readers import DataFormatError, Interactions, check_data_file, read_interactions

CACHE_VERSION = 1
MIN_SPLIT_LENGTH = 3  # leave-one-out needs a training item, a validation and a test target


@dataclass
class SequenceData:
    """User sequences in CSR form: user u's items, oldest first, are items[offsets[u]:offsets[u+1]].

    Item ids run densely from 1 to ``num_items``; 0 is padding, so item tables have
    ``num_items + 1`` rows. Row u is the (u+1)-th user after remapping.
    """

    offsets: np.ndarray  # [U+1] int64
    items: np.ndarray  # [n] int64
    num_items: int
    item_tokens: np.ndarray  # [num_items + 1] raw item id of each dense id ("" for padding)
    user_tokens: np.ndarray  # [U] raw user id of each row

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def head(self, num_users: int) -> "SequenceData":
        """The first ``num_users`` users, items remapped densely again (for quick runs)."""
        if num_users <= 0 or num_users >= self.num_users:
            return self
        end = self.offsets[num_users]
        used, dense = np.unique(self.items[:end], return_inverse=True)
        return SequenceData(
            offsets=self.offsets[: num_users + 1].copy(),
            items=(dense + 1).astype(np.int64),
            num_items=len(used),
            item_tokens=np.concatenate([[""], self.item_tokens[used]]),
            user_tokens=self.user_tokens[:num_users].copy(),
        )


def _encode(tokens: np.ndarray) -> tuple:
    """(vocabulary, codes): tokens sorted numerically when all are integers, else as strings."""
    unique, inverse = np.unique(tokens, return_inverse=True)
    if all(t.isdigit() for t in unique):
        order = np.argsort(unique.astype(np.int64), kind="stable")
    else:
        order = np.arange(len(unique))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return unique[order], rank[inverse]


def k_core(
    users: np.ndarray, items: np.ndarray, min_user: int, min_item: int, passes: Optional[List[str]] = None
) -> np.ndarray:
    """Boolean mask of interactions kept by iterative k-core filtering on integer codes; ``passes``,
    when given, receives each pass's 'users / items / interactions' before and after it."""
    keep = np.ones(len(users), dtype=bool)
    before = ""
    while True:
        user_counts = np.bincount(users[keep], minlength=users.max() + 1)
        item_counts = np.bincount(items[keep], minlength=items.max() + 1)
        now = f"{np.count_nonzero(user_counts)} / {np.count_nonzero(item_counts)} / {int(keep.sum())}"
        if passes is not None and before:
            passes.append(f"pass {len(passes) + 1}: {before} -> {now}")
        new_keep = keep & (user_counts[users] >= min_user) & (item_counts[items] >= min_item)
        if new_keep.sum() == keep.sum():
            return new_keep
        keep, before = new_keep, now


TIE_ORDERS = ("file", "item", "shuffled_runs")
RUN_SHUFFLE_SEED = 0  # fixed: the same file always gives the same sequences (bump CACHE_VERSION if changed)


def shuffle_ascending_runs(user_code: np.ndarray, item_code: np.ndarray, seed: int = RUN_SHUFFLE_SEED) -> np.ndarray:
    """The order that permutes the items within each of a user's maximal runs of strictly ascending
    item codes (the runs keep their places).

    ``user_code`` and ``item_code`` are already in sequence order (users contiguous). A copy whose
    same-timestamp groups were sorted by item id and whose timestamps were then dropped (LRURec's
    ML-1M) shows each group as part of an ascending run; shuffling the runs (seeded) emulates an
    arbitrary order within each group, as RecBole's file order is. Runs also take in neighbours
    that merely happen to ascend, so it is an emulation, not a recovery of the original order.
    """
    n = len(item_code)
    starts = np.ones(n, dtype=bool)
    if n > 1:
        starts[1:] = (user_code[1:] != user_code[:-1]) | (item_code[1:] <= item_code[:-1])
    run_id = np.cumsum(starts)
    keys = np.random.default_rng(seed).random(n)
    return np.lexsort((keys, run_id))


def build_sequences(interactions: Interactions, min_user: int, min_item: int, tie_order: str = "file") -> SequenceData:
    """k-core filters, orders each user's items by time, remaps ids.

    ``tie_order`` breaks ties between interactions with the same timestamp: ``file`` keeps the
    file's order (RecBole's stable sort), ``item`` sorts them by item id (numerically when ids are
    integers; LRURec's preprocessing of ML-1M). It decides which item of a same-second group is the
    held-out target, so it moves the metrics (docs/data.md). ``shuffled_runs`` is for
    copies that were sorted by item id within a timestamp and lost their timestamps (our ML-1M):
    the ``item`` order (the file's own order for a file without timestamps), then each ascending
    run of item ids shuffled (:func:`shuffle_ascending_runs`), emulating RecBole's order of the
    same-second groups. On a timestamped file it shows how close the emulation comes to ``file``.
    """
    if tie_order not in TIE_ORDERS:
        raise ValueError(f"data.tie_order={tie_order!r}; choose one of {', '.join(TIE_ORDERS)}")
    user_vocab, user_code = _encode(interactions.users)
    item_vocab, item_code = _encode(interactions.items)
    passes: List[str] = []
    keep = k_core(user_code, item_code, min_user, min_item, passes)
    if not keep.any():
        raise DataFormatError(
            f"{interactions.source} is empty after {min_user}-core users / {min_item}-core items filtering "
            f"(users / items / interactions: {'; '.join(passes)}); lower data.min_user_interactions or "
            "data.min_item_interactions"
        )
    file_order = np.arange(len(keep))[keep]
    user_code, item_code, times = user_code[keep], item_code[keep], interactions.times[keep]
    by_item = tie_order in ("item", "shuffled_runs")
    ties = (file_order, item_code) if by_item else (file_order,)  # lexsort: last key first
    order = np.lexsort((*ties, times, user_code))
    user_code, item_code = user_code[order], item_code[order]
    if tie_order == "shuffled_runs":
        order = shuffle_ascending_runs(user_code, item_code)
        user_code, item_code = user_code[order], item_code[order]
    kept_items, item_dense = np.unique(item_code, return_inverse=True)
    kept_users, user_dense = np.unique(user_code, return_inverse=True)
    counts = np.bincount(user_dense, minlength=len(kept_users))
    offsets = np.zeros(len(kept_users) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return SequenceData(
        offsets=offsets,
        items=(item_dense + 1).astype(np.int64),
        num_items=len(kept_items),
        item_tokens=np.concatenate([[""], item_vocab[kept_items]]).astype(str),
        user_tokens=user_vocab[kept_users].astype(str),
    )


def _cache_key(path: str, fmt: str, min_user: int, min_item: int, tie_order: str) -> str:
    stat = os.stat(path)
    fields = [CACHE_VERSION, os.path.abspath(path), stat.st_size, stat.st_mtime_ns, fmt, min_user, min_item]
    text = json.dumps(fields + ([tie_order] if tie_order != "file" else []))  # old caches stay valid
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "recblr-torchrec")


_ARRAYS = ("offsets", "items", "item_tokens", "user_tokens")


def load_sequences(
    path: str,
    fmt: str = "auto",
    min_user: int = 5,
    min_item: int = 5,
    cache_dir: Optional[str] = None,
    tie_order: str = "file",
) -> SequenceData:
    """Reads, filters and caches a dataset; later calls with the same file and settings hit the cache."""
    if min_user < MIN_SPLIT_LENGTH:
        raise ValueError(
            f"data.min_user_interactions={min_user} must be >= {MIN_SPLIT_LENGTH}: leave-one-out "
            "needs a training item, a validation target and a test target per user"
        )
    check_data_file(path)
    cache_root = cache_dir or default_cache_dir()
    stem = os.path.basename(path).split(".")[0]
    folder = os.path.join(cache_root, f"{stem}-{_cache_key(path, fmt, min_user, min_item, tie_order)}")
    meta_path = os.path.join(folder, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        arrays = {name: np.load(os.path.join(folder, f"{name}.npy")) for name in _ARRAYS}
        return SequenceData(num_items=meta["num_items"], **arrays)
    data = build_sequences(read_interactions(path, fmt), min_user, min_item, tie_order)
    os.makedirs(cache_root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_root, prefix=".tmp-")
    try:
        for name in _ARRAYS:
            np.save(os.path.join(tmp, f"{name}.npy"), getattr(data, name))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"num_items": data.num_items, "source": os.path.abspath(path)}, f)
        os.replace(tmp, folder)  # atomic: a concurrent or crashed writer never leaves half a cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(meta_path):
            raise
    return data
