"""The ``Batch`` a training or evaluation step consumes: jagged histories as TorchRec takes them."""

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from .features import ITEM_CANDIDATES, ITEM_HISTORY


@dataclass
class Batch(Pipelineable):
    """One batch of user histories as TorchRec consumes them.

    Attributes:
        item_history: KeyedJaggedTensor with key ``item_history``: values [N] item ids,
            lengths [B] (one sequence per sample).
            Optionally key ``item_candidates``: the loss's candidate item ids [C], in order,
            spread evenly over the samples' bags (C // B or one more each), so one lookup
            through the (sharded) table serves both the histories and the candidate set.
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
            graphs lists every position, fillers and a window's context positions included
            (their targets are 0).
        filler_rows: how many entries of ``target_rows`` are such positions without a target (host side,
            so that ``num_targets`` needs no device read; not part of a graph's signature).
        target_total: ``global_targets`` as a 0-dim float32 tensor, set for a rank's share of a
            distributed batch: the loss scales by it on the device, so a step replayed from a
            CUDA graph scales by this batch's count, not its capture's.
    """

    item_history: KeyedJaggedTensor
    targets: Tensor
    user_ids: Tensor
    candidate_log_q: Optional[Tensor] = None
    global_targets: int = 0
    context: Optional[KeyedJaggedTensor] = None
    target_rows: Optional[Tensor] = None
    filler_rows: int = 0
    target_total: Optional[Tensor] = None

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
        def move(value):
            return None if value is None else value.to(device=device, non_blocking=non_blocking)

        return Batch(
            item_history=self.item_history.to(device=device, non_blocking=non_blocking),
            targets=self.targets.to(device=device, non_blocking=non_blocking),
            user_ids=self.user_ids.to(device=device, non_blocking=non_blocking),
            candidate_log_q=move(self.candidate_log_q),
            global_targets=self.global_targets,
            context=move(self.context),
            target_rows=move(self.target_rows),
            filler_rows=self.filler_rows,
            target_total=move(self.target_total),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.item_history.record_stream(stream)
        self.targets.record_stream(stream)
        self.user_ids.record_stream(stream)
        for optional in (self.candidate_log_q, self.context, self.target_rows, self.target_total):
            if optional is not None:
                optional.record_stream(stream)

    def pin_memory(self) -> "Batch":
        def pin(value):
            return None if value is None else value.pin_memory()

        return Batch(
            self.item_history.pin_memory(),
            self.targets.pin_memory(),
            self.user_ids.pin_memory(),
            pin(self.candidate_log_q),
            self.global_targets,
            pin(self.context),
            pin(self.target_rows),
            self.filler_rows,
            pin(self.target_total),
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
        """Consecutive sub-batches of at most ``max_sequences`` sequences (for gradient accumulation);
        each counts the whole batch's targets (``global_targets``), so its loss is its share of the
        whole batch's mean."""
        if max_sequences <= 0 or max_sequences >= len(self):
            return [self]
        if self.candidates() is not None:
            raise ValueError("a batch carrying a candidate set cannot be split; set train.micro_batch_size=0")
        offsets, lengths, values = self.offsets, self.item_history.lengths(), self.item_history.values()
        total = self.num_targets
        parts = []
        for first in range(0, len(self), max_sequences):
            last = min(first + max_sequences, len(self))
            lo, hi = int(offsets[first]), int(offsets[last])
            history = KeyedJaggedTensor(
                keys=[ITEM_HISTORY], values=values[lo:hi], lengths=lengths[first:last], length_per_key=[hi - lo]
            )
            context = None if self.context is None else _slice_bags(self.context, first, last)
            part = Batch(history, self.targets[lo:hi], self.user_ids[first:last], global_targets=total, context=context)
            parts.append(part)
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
