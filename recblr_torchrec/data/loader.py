"""From samples to batches: gathering a batch, and the dataset and loader that serve an epoch's batches."""

from typing import Callable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from .batch import Batch
from .features import ITEM_CANDIDATES, ITEM_HISTORY, user_bucket_features
from .padding import filler_count, filler_lengths
from .samples import Samples
from .sequences import SequenceData

CandidateFn = Callable[[np.ndarray, int], Tuple[np.ndarray, Optional[np.ndarray]]]
# A graphed run's sampled candidate sets are padded to a multiple of this: a few shapes per run,
# without the position quantum's thousands of padding rows (which could outnumber a small catalog).
CANDIDATE_QUANTUM = 1024


def batches_per_epoch(samples: int, batch_size: int) -> int:
    """Batches (updates) of an epoch over ``samples`` training samples, the last one partial."""
    return -(-samples // batch_size)


def make_batch(
    items: np.ndarray,
    samples: Samples,
    index: np.ndarray,
    candidates: Optional[CandidateFn] = None,
    batch_number: int = 0,
    fillers: int = 0,
    user_buckets: int = 0,
    pad: Tuple[int, int] = (0, 0),
) -> Batch:
    """Gathers the samples at ``index`` into one jagged batch (vectorised, no Python loop).

    ``candidates(targets, batch_number) -> (ids, log_q)`` adds the loss's candidate set under
    key ``item_candidates``. The last ``fillers`` samples of ``index`` are filler rows: user -1, no targets.
    ``user_buckets`` > 0 adds the pooled context feature ``user_bucket`` (``batch.context``).
    ``pad = (quantum, longest)`` with quantum > 0 appends filler sequences (padding item 0, user -1,
    no targets; ``filler_lengths``, at most ``longest`` long) that round the position count up to
    a multiple of ``quantum``, and a sampled candidate set with padding ids 0 (log-Q +inf: no
    part in the loss) to a multiple of ``CANDIDATE_QUANTUM``. The model's sequences are independent, so
    the loss and its gradients are the unpadded batch's. Padded all-positions batches list every
    position in ``target_rows`` (the fillers' and the context positions' targets are 0, which the
    loss ignores), so their row count is fixed by the shape.
    """
    starts, lengths = samples.starts[index], samples.lengths[index]
    offsets = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    positions = np.arange(offsets[-1]) + np.repeat(starts - offsets[:-1], lengths)
    values = items[positions]
    nexts = items[positions + 1]
    if samples.all_targets and samples.context is not None:  # a window's context positions: no target
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
        targets = np.where(within < np.repeat(samples.context[index], lengths), 0, nexts)
    elif samples.all_targets:
        targets = nexts
    else:
        targets = np.zeros_like(nexts)
        last = offsets[1:] - 1
        targets[last] = nexts[last]
    users = samples.users[index].astype(np.int64)
    if fillers:
        targets[offsets[len(index) - fillers] :] = 0
        users[len(index) - fillers :] = -1
    if pad[0]:
        extra = filler_lengths(len(values), *pad)
        padding = int(extra.sum())
        lengths = np.concatenate([lengths, extra])
        offsets = np.concatenate([offsets, offsets[-1] + np.cumsum(extra)])
        values = np.concatenate([values, np.zeros(padding, dtype=values.dtype)])
        targets = np.concatenate([targets, np.zeros(padding, dtype=targets.dtype)])
        users = np.concatenate([users, np.full(len(extra), -1, dtype=np.int64)])
    context = user_bucket_features(users, user_buckets) if user_buckets else None
    ids, log_q = (None, None) if candidates is None else candidates(targets[targets > 0], batch_number)
    if pad[0] and log_q is not None:  # a sampled set: padding ids first, a multiple of the quantum in all
        extra = -len(ids) % CANDIDATE_QUANTUM
        ids = np.concatenate([np.zeros(extra, dtype=np.int64), ids])
        log_q = np.concatenate([np.full(extra, np.inf), log_q])
    filler_rows = 0
    if samples.all_targets and pad[0]:  # every position: a fixed count per shape
        rows = np.arange(len(targets), dtype=np.int64)
        filler_rows = len(targets) - int(np.count_nonzero(targets))  # fillers' and context positions
    else:
        rows = np.flatnonzero(targets)
    if ids is None:
        values_t, lengths_t, offsets_t, targets_t, users_t, rows_t = _int64_views(
            [values], [lengths], [offsets], [targets], [users], [rows]
        )
        history = KeyedJaggedTensor(
            keys=[ITEM_HISTORY],
            values=values_t,
            lengths=lengths_t,
            offsets=offsets_t,
            length_per_key=[len(values)],  # known here; TorchRec would sum the lengths on the device
        )
        return Batch(history, targets_t, users_t, context=context, target_rows=rows_t, filler_rows=filler_rows)
    # spread over one bag per sequence (fillers included): TorchRec's bucketing and FBGEMM's
    # sequence lookup give each bag one thread group, so a single bag of all candidates runs serially
    bags = np.full(len(lengths), len(ids) // len(lengths), dtype=np.int64)
    bags[: len(ids) % len(lengths)] += 1
    values_t, lengths_t, targets_t, users_t, rows_t = _int64_views(
        [values, ids], [lengths, bags], [targets], [users], [rows]
    )
    history = KeyedJaggedTensor(
        keys=[ITEM_HISTORY, ITEM_CANDIDATES],
        values=values_t,
        lengths=lengths_t,
        length_per_key=[len(values), len(ids)],
    )
    log_q = None if log_q is None else torch.from_numpy(log_q.astype(np.float32))
    return Batch(history, targets_t, users_t, log_q, context=context, target_rows=rows_t, filler_rows=filler_rows)


def _int64_views(*groups: List[np.ndarray]) -> List[torch.Tensor]:
    """One int64 tensor per group of arrays (concatenated), all views of one buffer: a DataLoader
    worker hands a batch over through one shared-memory segment instead of one per tensor, which
    costs more than building the batch (``benchmarks/bench_loader.py``)."""
    buffer = torch.from_numpy(np.concatenate([array for group in groups for array in group], dtype=np.int64))
    return list(buffer.split([sum(len(array) for array in group) for group in groups]))


class SampleBatches(Dataset):
    """Map-style dataset whose i-th element is the i-th whole ``Batch`` of an epoch.

    Each DataLoader worker builds whole batches; ``set_epoch`` fixes the epoch's order from
    (seed, epoch), so a resumed run sees the same batches, and ``start_batch`` skips those a
    checkpoint already covered. Besides ``i`` (the i-th batch left in the epoch ``set_epoch``
    fixed), an element's index may be the key ``(epoch, batch number)`` that ``BatchKeys`` hands
    out: a worker that outlives an epoch (``make_loader``) builds any epoch's batches from it.

    Distributed runs: ``batch_size`` is the global batch; rank ``rank`` of ``world_size`` gets
    its contiguous share of each global batch (np.array_split), so the ranks together see
    exactly the single-process batches. A rank whose share is empty gets one filler row, so that
    every rank runs the same number of steps (each step is a collective). ``candidates`` adds
    the loss's candidate set to every batch and ``user_buckets`` the pooled context feature
    (see ``make_batch``). ``pad_quantum`` pads each rank's batches with filler sequences
    (``make_batch``), for CUDA graphs.
    """

    def __init__(
        self,
        data: SequenceData,
        samples: Samples,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        candidates: Optional[CandidateFn] = None,
        user_buckets: int = 0,
        pad_quantum: int = 0,
    ):
        if len(samples) == 0:
            raise ValueError("no samples: every user is too short for this split and protocol")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.items = data.items
        self.samples = samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.candidates = candidates
        self.user_buckets = user_buckets
        # fillers as long as the longest sample (at least 2 positions: see filler_lengths)
        self.pad = (pad_quantum, max(2, int(samples.lengths.max()))) if pad_quantum else (0, 0)
        self.epoch = 0
        self.start_batch = 0
        self._order = (None, np.arange(len(samples)))  # (epoch, its order); epoch None: unshuffled

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's order of the samples (kept for the epoch last asked for)."""
        if self.shuffle and self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.samples)))
        return self._order[1]

    @property
    def batches_per_epoch(self) -> int:
        return batches_per_epoch(len(self.samples), self.batch_size)

    def global_batch_size(self, number: int) -> int:
        """Sequences in global batch ``number`` of the epoch (all ranks together)."""
        return max(0, min(self.batch_size, len(self.samples) - number * self.batch_size))

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)

    @property
    def fillers_per_batch(self) -> int:
        """Filler sequences ``pad_quantum`` adds to every batch (0 without padding)."""
        return filler_count(*self.pad) if self.pad[0] else 0

    def __getitem__(self, i: Union[int, Tuple[int, int]]) -> Batch:
        if isinstance(i, tuple):
            epoch, number = i
        elif 0 <= i < len(self):
            epoch, number = self.epoch, i + self.start_batch
        else:  # also ends a plain ``for batch in dataset`` loop
            raise IndexError(f"batch {i} of an epoch of {len(self)}")
        first = number * self.batch_size
        index = self.order(epoch)[first : first + self.batch_size]
        key = self._key(epoch, number)
        if self.world_size == 1:
            return make_batch(self.items, self.samples, index, self.candidates, key, 0, self.user_buckets, self.pad)
        share = np.array_split(index, self.world_size)[self.rank]
        fillers = 0 if len(share) else 1
        share = share if len(share) else index[:1]
        batch = make_batch(self.items, self.samples, share, self.candidates, key, fillers, self.user_buckets, self.pad)
        batch.global_targets = self.samples.target_count(index)
        batch.target_total = torch.tensor(float(batch.global_targets))
        return batch

    def _key(self, epoch: int, number: int) -> int:
        # Seeds a batch's negatives: a function of (epoch, batch, rank), so a resumed run redraws them.
        return (epoch * 1_000_003 + number) * self.world_size + self.rank

    @property
    def num_positions(self) -> int:
        return int(self.samples.lengths.sum())


class BatchKeys(Sampler):
    """The keys ``(epoch, batch number)`` of the batches left in the epoch that ``set_epoch`` last
    fixed, read when an iteration over the loader starts."""

    def __init__(self, batches: SampleBatches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        b = self.batches
        return iter([(b.epoch, number) for number in range(b.start_batch, b.batches_per_epoch)])


def make_loader(batches: SampleBatches, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over whole batches; workers build them in parallel with training.

    Iterate the same loader every epoch (after ``batches.set_epoch``): its workers persist, and
    start once per run, not once per epoch. Starting them (a fork of the training process and
    their first batches) costs more than a short epoch's steps on a GPU
    (``benchmarks/bench_loader.py``, row ``epochs``).

    The loader gets its own generator: by default each new iterator draws a seed from the global
    torch RNG, which would shift the dropout stream of a run resumed mid-epoch.
    """
    return DataLoader(
        batches,
        batch_size=None,
        sampler=BatchKeys(batches),
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(batches.seed),
    )
