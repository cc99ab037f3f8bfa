"""The next-item objective, the one place every training path computes its loss.

:class:`NextItemTask` wraps a :class:`SequenceRecommender` as ``forward(batch) -> (loss, stats)``:
what a one-process trainer calls, what DistributedModelParallel wraps and what
TrainPipelineSparseDist drives. The candidate set decides the loss:

- the batch carries none (one process, full softmax): the whole catalog read from the table,
  chunked, with label smoothing (``losses.full_softmax_loss``);
- the batch carries every item (sharded, full softmax): the same loss on the catalog looked up
  with the histories, through the (sharded) table;
- the batch carries a sampled set with its log-Q (one process or sharded): sampled softmax with
  accidental hits masked (``losses.sampled_softmax_loss``).
"""

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from ..data.batch import Batch
from ..modules import SequenceRecommender
from .losses import full_softmax_loss, sampled_softmax_loss


def target_rows(batch: Batch) -> Tensor:
    """[M] the packed positions that carry a loss target (one per sequence in the paper's protocol):
    the batch's own ``target_rows`` when it carries them, else a ``nonzero`` (a host sync on GPU)."""
    if batch.target_rows is not None:
        return batch.target_rows
    return torch.nonzero(batch.targets, as_tuple=True)[0]


def encoder_rows(batch: Batch, rows: Tensor) -> Optional[Tensor]:
    """``rows`` for the encoder's ``rows=`` argument, None when they are every position (the
    all-positions protocol; ``rows`` is sorted, so it is then 0..N-1): a gather of all N rows
    would only cost time."""
    return None if rows.numel() == batch.targets.numel() else rows


def encoded_loss(
    model: SequenceRecommender,
    batch: Batch,
    hidden: Tensor,
    candidates: Optional[Tensor],
    rows: Tensor,
    check_targets: bool = True,
    label_smoothing: float = 0.0,
) -> Tensor:
    """The mean loss over ``batch``'s targets from the encoder's output ``hidden`` [M, d] (the rows
    ``rows`` only; every position, in order, when those are all of them) and the looked-up
    candidates [C, d] (None: the whole catalog, read from the table here).

    ``check_targets``: check the targets (a host sync on GPU): their bounds, or, sampled, their
    presence among the candidates; a trainer whose table was sized from its data and whose
    sampler adds every target may skip it. ``label_smoothing``: full softmax only.
    """
    every = encoder_rows(batch, rows) is None  # all positions: the fillers of a graphed batch carry target 0
    hidden = model.user_vectors(hidden)
    if candidates is None or batch.candidate_log_q is None:  # the full softmax
        if candidates is None:  # one process: the catalog straight from the table
            catalog = model.item_table()
        elif candidates.shape[0] != model.num_embeddings - 1:
            raise ValueError(
                f"full-softmax batches carry items 1..{model.num_embeddings - 1}, got {candidates.shape[0]} candidates"
            )
        else:  # looked up with the histories (sharded); row 0: padding, masked
            catalog = torch.cat([candidates.new_zeros(1, candidates.shape[1]), candidates])
        return full_softmax_loss(
            hidden,
            batch.targets if every else batch.targets[rows],
            model.item_vectors(catalog),
            check_targets=check_targets,
            ignore_padding=every,
            label_smoothing=label_smoothing,
        )
    targets = batch.targets if every else batch.targets[rows]
    if label_smoothing:
        raise ValueError(
            f"label_smoothing={label_smoothing} needs the full softmax, but this batch carries sampled candidates: "
            "set train.loss=full or train.label_smoothing=0"
        )
    ids, log_q = batch.candidates(), batch.candidate_log_q
    candidates = model.item_vectors(candidates)
    return sampled_softmax_loss(hidden, targets, ids, candidates, log_q, check_targets, ignore_padding=every)


def dense_loss(
    task: "NextItemTask",
    batch: Batch,
    history: Tensor,
    offsets: Tensor,
    candidates: Optional[Tensor] = None,
    pooled: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Everything after the lookups, from their tensors (``SequenceRecommender.dense_forward``):
    the task's ``(loss, stats)`` (see :class:`NextItemTask`)."""
    model = task.model
    rows = target_rows(batch)
    selected = encoder_rows(batch, rows)  # None: every position
    hidden, candidates = model.dense_forward(history, offsets, candidates, pooled, selected)
    # real targets (a graphed batch lists its fillers' positions too); host ints, so a replayed
    # graph reports its capture's count in the stats (the trainer reads only the loss)
    count = rows.numel() - batch.filler_rows
    if count == 0:  # a filler row: zero loss that still touches every parameter (same collectives)
        loss = hidden.sum() * 0.0 + (0.0 if candidates is None else candidates.sum() * 0.0)
    else:
        loss = encoded_loss(model, batch, hidden, candidates, rows, task.check_targets, task.label_smoothing)
    if batch.target_total is None:
        scaled = loss * (count * task.world_size / batch.num_targets)
    else:  # a rank's share: its real targets counted on the device (a replay reads this batch's, not its capture's)
        real = (batch.targets if selected is None else batch.targets[rows]).count_nonzero()
        scaled = loss * (real * task.world_size / batch.target_total)
    count_t = torch.full((), float(count), dtype=torch.float32, device=scaled.device)  # no host copy
    return scaled, torch.stack([scaled.detach().float(), count_t])


class _AfterLookup(nn.Module):
    """Everything after the lookups (context join, encoder, loss) as one module.

    TrainPipelineSparseDist fx-traces the model to find the sharded modules' inputs; modules
    without sharded children are leaves, so this keeps the data-dependent loss code out of the
    trace. It refers to its task without registering it (the parameters stay the recommender's).
    When the task has a ``dense_step`` (the sharded step with its dense part graphed), that runs
    the part instead.
    """

    def __init__(self, task: "NextItemTask"):
        super().__init__()
        self.__dict__["task"] = task

    def forward(self, batch: Batch, embedded: Dict[str, JaggedTensor], pooled: Optional[KeyedTensor]):
        task: NextItemTask = self.__dict__["task"]
        tensors = task.model.lookup_tensors(embedded, pooled)
        if task.dense_step is not None:
            return task.dense_step(batch, *tensors)
        return dense_loss(task, batch, *tensors)


class NextItemTask(nn.Module):
    """A recommender and its loss: ``forward(batch) -> (loss, [loss (detached), number of targets])``
    (TrainPipelineSparseDist's ``progress`` returns the second element).

    This batch's share of the global batch's mean loss is (sum over its targets) / (targets in
    the global batch, ``batch.num_targets``); the returned loss is ``world_size`` times that,
    because data-parallel gradients are averaged over ranks (DDP for the dense part, TorchRec's
    all-to-all backward for the tables): the average of the ranks' gradients is then the global
    batch's gradient. Divide by ``world_size`` to report it (summed over ranks it is the mean).
    The micro-batches of one process (``Batch.split``) are shares in the same way, with world size 1.
    The forward is only the lookups and a call, so TrainPipelineSparseDist can trace it.

    Args:
        model: the recommender (its collections sharded or not).
        world_size: ranks the global batch is split over.
        check_targets, label_smoothing: as in :func:`encoded_loss`.
    """

    def __init__(
        self, model: SequenceRecommender, world_size: int = 1, check_targets: bool = True, label_smoothing: float = 0.0
    ):
        super().__init__()
        self.model = model
        self.world_size = world_size
        self.check_targets = check_targets
        self.label_smoothing = label_smoothing
        self.dense = _AfterLookup(self)
        self.dense_step: Optional[Callable[..., Tuple[Tensor, Tensor]]] = None  # distributed/dense_step.py

    def forward(self, batch: Batch) -> Tuple[Tensor, Tensor]:
        embedded = self.model.item_embeddings(batch.item_history)
        pooled = None
        if self.model.context_embeddings is not None:
            pooled = self.model.context_embeddings(batch.context)
        return self.dense(batch, embedded, pooled)
