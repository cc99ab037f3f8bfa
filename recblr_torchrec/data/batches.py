"""Training and evaluation samples over CSR sequences, and the ``Batch`` they are served in.

A sample is a contiguous slice ``items[start:start+length]`` of one user's sequence; the target
of every position is the item right after it in the same user's sequence. Training samples come
from the training part (all but the last two items), evaluation samples end just before the
validation or the test item (leave-one-out, SPEC.md section 3).
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from .sequences import SequenceData

ITEM_HISTORY = "item_history"
ITEM_CANDIDATES = "item_candidates"  # the loss's candidate ids, looked up through the item table
USER_BUCKET = "user_bucket"  # pooled context feature: the user id hashed into buckets
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


@dataclass
class Batch(Pipelineable):
    """One batch of user histories as TorchRec consumes them.

    Attributes:
        item_history: KeyedJaggedTensor with key ``item_history``: values [N] item ids,
            lengths [B] (one sequence per sample).
            Optionally key ``item_candidates``: the loss's candidate item ids [C], all in the
            first sample's bag (the other samples' bags are empty), so one lookup through the
            (sharded) table serves both the histories and the candidate set.
        targets: [N] the next item at each position, 0 (padding id) where no loss is taken.
        user_ids: [B] the user row of each sequence; -1 marks a filler row (a rank whose slice
            of the last global batch is empty gets one, without targets, so that every rank
            joins each collective).
        candidate_log_q: [C] log of the expected count of each candidate in the sampled set
            (sampled softmax's log-Q correction); None for the full catalog.
        global_targets: targets in the whole global batch (over all ranks); 0 = this batch's.
        context: optional pooled context features for an EmbeddingBagCollection, one bag per
            sequence (key ``user_bucket``: the user id hashed into buckets).
        target_rows: [M] the packed positions that carry a target (``targets > 0``), found where
            the batch is built so that a step on the GPU needs no ``nonzero`` (a host sync);
            None: found from ``targets`` when needed. An all-positions batch padded for CUDA
            graphs lists every position, fillers included (their targets are 0).
        filler_rows: how many entries of ``target_rows`` are such filler positions (host side,
            so that ``num_targets`` needs no device read; not part of a graph's signature).
    """

    item_history: KeyedJaggedTensor
    targets: Tensor
    user_ids: Tensor
    candidate_log_q: Optional[Tensor] = None
    global_targets: int = 0
    context: Optional[KeyedJaggedTensor] = None
    target_rows: Optional[Tensor] = None
    filler_rows: int = 0

    @property
    def offsets(self) -> Tensor:
        """[B+1] offsets of the histories (key ``item_history``)."""
        if len(self.item_history.keys()) == 1:
            return self.item_history.offsets()
        return self.item_history[ITEM_HISTORY].offsets()

    def last_targets(self) -> Tensor:
        """[B] the target after each sequence's last position."""
        return self.targets[self.offsets[1:] - 1]

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        log_q, context, rows = self.candidate_log_q, self.context, self.target_rows
        return Batch(
            item_history=self.item_history.to(device=device, non_blocking=non_blocking),
            targets=self.targets.to(device=device, non_blocking=non_blocking),
            user_ids=self.user_ids.to(device=device, non_blocking=non_blocking),
            candidate_log_q=None if log_q is None else log_q.to(device=device, non_blocking=non_blocking),
            global_targets=self.global_targets,
            context=None if context is None else context.to(device=device, non_blocking=non_blocking),
            target_rows=None if rows is None else rows.to(device=device, non_blocking=non_blocking),
            filler_rows=self.filler_rows,
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.item_history.record_stream(stream)
        self.targets.record_stream(stream)
        self.user_ids.record_stream(stream)
        for optional in (self.candidate_log_q, self.context, self.target_rows):
            if optional is not None:
                optional.record_stream(stream)

    def pin_memory(self) -> "Batch":
        log_q = None if self.candidate_log_q is None else self.candidate_log_q.pin_memory()
        context = None if self.context is None else self.context.pin_memory()
        rows = None if self.target_rows is None else self.target_rows.pin_memory()
        return Batch(
            self.item_history.pin_memory(),
            self.targets.pin_memory(),
            self.user_ids.pin_memory(),
            log_q,
            self.global_targets,
            context,
            rows,
            self.filler_rows,
        )

    @property
    def num_targets(self) -> int:
        """Targets of the whole global batch (the loss's denominator on every rank)."""
        if self.global_targets:
            return self.global_targets
        if self.target_rows is not None:
            return self.target_rows.numel() - self.filler_rows
        return int(torch.count_nonzero(self.targets))

    def candidates(self) -> Optional[Tensor]:
        """[C] candidate item ids carried by the batch, or None."""
        if ITEM_CANDIDATES not in self.item_history.keys():
            return None
        return self.item_history[ITEM_CANDIDATES].values()

    def __len__(self) -> int:
        return self.user_ids.numel()

    def split(self, max_sequences: int) -> List["Batch"]:
        """Consecutive sub-batches of at most ``max_sequences`` sequences (for gradient accumulation)."""
        if max_sequences <= 0 or max_sequences >= len(self):
            return [self]
        if self.candidates() is not None:
            raise ValueError("a batch carrying a candidate set cannot be split; set train.micro_batch_size=0")
        offsets, lengths, values = self.offsets, self.item_history.lengths(), self.item_history.values()
        parts = []
        for first in range(0, len(self), max_sequences):
            last = min(first + max_sequences, len(self))
            lo, hi = int(offsets[first]), int(offsets[last])
            history = KeyedJaggedTensor(
                keys=[ITEM_HISTORY], values=values[lo:hi], lengths=lengths[first:last], length_per_key=[hi - lo]
            )
            context = None if self.context is None else _slice_bags(self.context, first, last)
            parts.append(Batch(history, self.targets[lo:hi], self.user_ids[first:last], context=context))
        return parts


def _slice_bags(features: KeyedJaggedTensor, first: int, last: int) -> KeyedJaggedTensor:
    """Bags ``first:last`` of a one-key KeyedJaggedTensor."""
    offsets = features.offsets()
    lo, hi = int(offsets[first]), int(offsets[last])
    return KeyedJaggedTensor(
        keys=features.keys(),
        values=features.values()[lo:hi],
        lengths=features.lengths()[first:last],
        length_per_key=[hi - lo],
    )


def user_bucket_features(users: np.ndarray, buckets: int) -> KeyedJaggedTensor:
    """Key ``user_bucket``: each user id hashed (multiplicatively) into ``buckets``, one per bag."""
    hashed = (np.maximum(users, 0).astype(np.uint64) * np.uint64(2654435761)) % np.uint64(buckets)
    return KeyedJaggedTensor(
        keys=[USER_BUCKET],
        values=torch.from_numpy(hashed.astype(np.int64)),
        lengths=torch.ones(len(users), dtype=torch.int64),
        length_per_key=[len(users)],
    )


CandidateFn = Callable[[np.ndarray, int], Tuple[np.ndarray, Optional[np.ndarray]]]


def filler_count(quantum: int, longest: int) -> int:
    """How many filler sequences ``filler_lengths`` adds to every batch (see there)."""
    if longest < 2:
        raise ValueError(f"longest={longest}: fillers of at most one position cannot absorb a varying remainder")
    return max(1, -(-(quantum - 1) // (longest - 1)))


def filler_lengths(num_values: int, quantum: int, longest: int) -> np.ndarray:
    """Lengths of the filler sequences that pad ``num_values`` positions up to a multiple of ``quantum``.

    Always ``ceil((quantum - 1) / (longest - 1))`` of them (at least one), each 1 to ``longest``
    long (``longest`` >= 2), together ``count`` to ``quantum + count - 1`` positions, so every full
    batch of a run has the same number of sequences and one of few position counts: the shapes a
    captured CUDA graph replays (``train.cuda_graphs``). The bound: ``count`` pieces of at most
    ``longest`` hold ``quantum + count - 1`` when ``count * (longest - 1) >= quantum - 1``.
    """
    count = filler_count(quantum, longest)
    total = -(-(num_values + count) // quantum) * quantum - num_values
    return (total // count + (np.arange(count) < total % count)).astype(np.int64)


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
    a multiple of ``quantum``. The model's sequences are independent, so the loss and its gradients
    are the unpadded batch's. Padded all-positions batches list every position in ``target_rows``
    (the fillers' targets are 0, which the loss ignores), so their row count is fixed by the shape.
    """
    starts, lengths = samples.starts[index], samples.lengths[index]
    offsets = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    positions = np.arange(offsets[-1]) + np.repeat(starts - offsets[:-1], lengths)
    values = items[positions]
    nexts = items[positions + 1]
    if samples.all_targets:
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
    filler_rows = 0
    if samples.all_targets and pad[0] and candidates is None:  # every position: a fixed count per shape
        rows = torch.arange(len(targets), dtype=torch.int64)
        filler_rows = padding
    else:  # (the candidate losses take no padding targets)
        rows = torch.from_numpy(np.flatnonzero(targets).astype(np.int64))
    if candidates is None:
        history = KeyedJaggedTensor(
            keys=[ITEM_HISTORY],
            values=torch.from_numpy(values),
            lengths=torch.from_numpy(lengths.astype(np.int64)),
            offsets=torch.from_numpy(offsets),
            length_per_key=[len(values)],  # known here; TorchRec would sum the lengths on the device
        )
        return Batch(
            history,
            torch.from_numpy(targets),
            torch.from_numpy(users),
            context=context,
            target_rows=rows,
            filler_rows=filler_rows,
        )
    ids, log_q = candidates(targets[targets > 0], batch_number)
    bags = np.zeros(len(index), dtype=np.int64)
    bags[0] = len(ids)
    history = KeyedJaggedTensor(
        keys=[ITEM_HISTORY, ITEM_CANDIDATES],
        values=torch.from_numpy(np.concatenate([values, ids.astype(np.int64)])),
        lengths=torch.from_numpy(np.concatenate([lengths.astype(np.int64), bags])),
        length_per_key=[len(values), len(ids)],
    )
    log_q = None if log_q is None else torch.from_numpy(log_q.astype(np.float32))
    return Batch(history, torch.from_numpy(targets), torch.from_numpy(users), log_q, context=context, target_rows=rows)


class SampleBatches(Dataset):
    """Map-style dataset whose i-th element is the i-th whole ``Batch`` of an epoch.

    Each DataLoader worker builds whole batches; ``set_epoch`` fixes the epoch's order from
    (seed, epoch), so a resumed run sees the same batches, and ``start_batch`` skips those a
    checkpoint already covered.

    Distributed runs: ``batch_size`` is the global batch; rank ``rank`` of ``world_size`` gets
    its contiguous share of each global batch (np.array_split), so the ranks together see
    exactly the single-process batches. A rank whose share is empty gets one filler row, so that
    every rank runs the same number of steps (each step is a collective). ``candidates`` adds
    the loss's candidate set to every batch and ``user_buckets`` the pooled context feature
    (see ``make_batch``). ``pad_quantum`` pads single-process batches with filler sequences
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
        self.order = np.arange(len(samples))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if self.shuffle:
            self.order = np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))
        self.epoch = epoch
        self.start_batch = start_batch

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def global_batch_size(self, number: int) -> int:
        """Sequences in global batch ``number`` of the epoch (all ranks together)."""
        return max(0, min(self.batch_size, len(self.samples) - number * self.batch_size))

    def __len__(self) -> int:
        return max(0, -(-len(self.samples) // self.batch_size) - self.start_batch)

    @property
    def fillers_per_batch(self) -> int:
        """Filler sequences ``pad_quantum`` adds to every batch (0 without padding)."""
        return filler_count(*self.pad) if self.pad[0] else 0

    def __getitem__(self, i: int) -> Batch:
        number = i + self.start_batch
        first = number * self.batch_size
        index = self.order[first : first + self.batch_size]
        if self.world_size == 1:
            key, buckets = self._key(number), self.user_buckets
            return make_batch(self.items, self.samples, index, self.candidates, key, 0, buckets, self.pad)
        share = np.array_split(index, self.world_size)[self.rank]
        fillers = 0 if len(share) else 1
        share = share if len(share) else index[:1]
        key = self._key(number)
        batch = make_batch(self.items, self.samples, share, self.candidates, key, fillers, self.user_buckets)
        lengths = self.samples.lengths[index]
        batch.global_targets = int(lengths.sum() if self.samples.all_targets else len(index))
        return batch

    def _key(self, number: int) -> int:
        # Seeds a batch's negatives: a function of (epoch, batch, rank), so a resumed run redraws them.
        return (self.epoch * 1_000_003 + number) * self.world_size + self.rank

    @property
    def num_positions(self) -> int:
        return int(self.samples.lengths.sum())


def make_loader(batches: SampleBatches, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over whole batches; workers build them in parallel with training.

    The loader gets its own generator: by default each new iterator draws a seed from the global
    torch RNG, which would shift the dropout stream of a run resumed mid-epoch.
    """
    return DataLoader(
        batches,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(batches.seed),
    )
