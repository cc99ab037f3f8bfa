"""The training objective as a module, ``forward(batch) -> (loss, targets)``: what
DistributedModelParallel wraps and TrainPipelineSparseDist drives."""

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedTensor

from ..data.batches import Batch
from ..modules import RecBLR
from .losses import full_softmax_loss, sampled_softmax_loss


def candidate_loss(
    model: RecBLR, batch: Batch, check_targets: bool = True, label_smoothing: float = 0.0
) -> Tuple[Tensor, int]:
    """(mean loss over this batch's targets, their count), histories and candidates in one lookup.

    The batch's candidates are either every item 1..V-1 (full softmax, the same math as the
    local path) or a sampled set with its log-Q (``batch.candidate_log_q``). A batch without
    targets (a filler row) gives a zero loss that still touches every parameter, so all ranks
    run the same collectives. ``check_targets``: as in :func:`full_softmax_loss` (the sampled
    loss's check that every target is among the candidates); ``label_smoothing``: as there (full
    softmax only).
    """
    rows = target_rows(batch)
    hidden, candidates = model.embed(batch.item_history, batch.context, encoder_rows(batch, rows))
    return loss_on_lookups(model, batch, hidden, candidates, rows, check_targets, label_smoothing)


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


def loss_on_lookups(
    model: RecBLR,
    batch: Batch,
    hidden: Tensor,
    candidates: Tensor,
    rows: Tensor,
    check_targets: bool = True,
    label_smoothing: float = 0.0,
) -> Tuple[Tensor, int]:
    """``candidate_loss`` after the lookups and the encoder; ``hidden`` [M, d] holds the rows
    ``target_rows(batch)`` only (every position, in order, when those are all of them)."""
    if rows.numel() == 0:
        return hidden.sum() * 0.0 + candidates.sum() * 0.0, 0
    targets = batch.targets[rows]
    if batch.candidate_log_q is None:
        if candidates.shape[0] != model.num_embeddings - 1:
            raise ValueError(
                f"full-softmax batches carry items 1..{model.num_embeddings - 1}, got {candidates.shape[0]} candidates"
            )
        catalog = torch.cat([candidates.new_zeros(1, candidates.shape[1]), candidates])  # row 0: padding, masked
        loss = full_softmax_loss(hidden, targets, catalog, check_targets=check_targets, label_smoothing=label_smoothing)
        return loss, rows.numel()
    if label_smoothing:
        raise ValueError(
            f"label_smoothing={label_smoothing} needs the full softmax, but this batch carries sampled candidates: "
            "set train.loss=full or train.label_smoothing=0"
        )
    ids, log_q = batch.candidates(), batch.candidate_log_q
    loss = sampled_softmax_loss(hidden, targets, ids, candidates, log_q, check_targets=check_targets)
    return loss, rows.numel()


class _AfterLookup(nn.Module):
    """Everything after the lookups (context join, encoder, loss) as one module.

    TrainPipelineSparseDist fx-traces the model to find the sharded modules' inputs; modules
    without sharded children are leaves, so this keeps the data-dependent loss code out of the
    trace. It refers to the RecBLR without registering it (its parameters stay where they are).
    """

    def __init__(self, model: RecBLR, world_size: int, check_targets: bool = True, label_smoothing: float = 0.0):
        super().__init__()
        self.__dict__["recblr"] = model
        self.world_size = world_size
        self.check_targets = check_targets
        self.label_smoothing = label_smoothing

    def forward(self, batch: Batch, embedded: Dict[str, JaggedTensor], pooled: Optional[KeyedTensor]):
        model: RecBLR = self.__dict__["recblr"]
        rows = target_rows(batch)
        hidden, candidates = model.after_lookup(embedded, pooled, encoder_rows(batch, rows))
        loss, count = loss_on_lookups(model, batch, hidden, candidates, rows, self.check_targets, self.label_smoothing)
        scaled = loss * (count * self.world_size / batch.num_targets)
        count_t = torch.full((), float(count), dtype=torch.float32, device=scaled.device)  # no host copy
        return scaled, torch.stack([scaled.detach().float(), count_t])


class NextItemTask(nn.Module):
    """RecBLR plus its loss, as ``forward(batch) -> (loss, [loss (detached), number of targets])``
    (TrainPipelineSparseDist's ``progress`` returns the second element).

    This batch's share of the global batch's mean loss is (sum over its targets) / (targets in
    the global batch); the returned loss is ``world_size`` times that, because data-parallel
    gradients are averaged over ranks (DDP for the dense part, TorchRec's all-to-all backward
    for the tables): the average of the ranks' gradients is then the global batch's gradient.
    Divide by ``world_size`` to report it (``loss / world_size`` summed over ranks is the mean).
    The forward is only the lookups and a call, so TrainPipelineSparseDist can trace it.
    ``check_targets``, ``label_smoothing``: as in :func:`candidate_loss` (False skips the loss's
    host sync).
    """

    def __init__(self, model: RecBLR, world_size: int = 1, check_targets: bool = True, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.world_size = world_size
        self.dense = _AfterLookup(model, world_size, check_targets, label_smoothing)

    def forward(self, batch: Batch) -> Tuple[Tensor, Tensor]:
        embedded = self.model.item_embeddings(batch.item_history)
        pooled = None
        if self.model.context_embeddings is not None:
            pooled = self.model.context_embeddings(batch.context)
        return self.dense(batch, embedded, pooled)
