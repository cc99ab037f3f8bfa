"""The training objective as a module, ``forward(batch) -> (loss, targets)``: what
DistributedModelParallel wraps and TrainPipelineSparseDist drives."""

from typing import Tuple

import torch
from torch import Tensor, nn

from ..data.batches import Batch
from ..modules import RecBLR
from .losses import full_softmax_loss, sampled_softmax_loss


def candidate_loss(model: RecBLR, batch: Batch) -> Tuple[Tensor, int]:
    """(mean loss over this batch's targets, their count), histories and candidates in one lookup.

    The batch's candidates are either every item 1..V-1 (full softmax, the same math as the
    local path) or a sampled set with its log-Q (``batch.candidate_log_q``). A batch without
    targets (a filler row) gives a zero loss that still touches every parameter, so all ranks
    run the same collectives.
    """
    hidden, candidates = model.embed(batch.item_history, batch.context)
    rows = torch.nonzero(batch.targets, as_tuple=True)[0]
    if rows.numel() == 0:
        return hidden.sum() * 0.0 + candidates.sum() * 0.0, 0
    targets = batch.targets[rows]
    if batch.candidate_log_q is None:
        if candidates.shape[0] != model.num_embeddings - 1:
            raise ValueError(
                f"full-softmax batches carry items 1..{model.num_embeddings - 1}, got {candidates.shape[0]} candidates"
            )
        catalog = torch.cat([candidates.new_zeros(1, candidates.shape[1]), candidates])  # row 0: padding, masked
        return full_softmax_loss(hidden[rows], targets, catalog), rows.numel()
    loss = sampled_softmax_loss(hidden[rows], targets, batch.candidates(), candidates, batch.candidate_log_q)
    return loss, rows.numel()


class NextItemTask(nn.Module):
    """RecBLR plus its loss, as ``forward(batch) -> (loss, number of targets)``.

    This batch's share of the global batch's mean loss is (sum over its targets) / (targets in
    the global batch); the returned loss is ``world_size`` times that, because data-parallel
    gradients are averaged over ranks (DDP for the dense part, TorchRec's all-to-all backward
    for the tables): the average of the ranks' gradients is then the global batch's gradient.
    Divide by ``world_size`` to report it (``loss / world_size`` summed over ranks is the mean).
    """

    def __init__(self, model: RecBLR, world_size: int = 1):
        super().__init__()
        self.model = model
        self.world_size = world_size

    def forward(self, batch: Batch) -> Tuple[Tensor, Tensor]:
        loss, count = candidate_loss(self.model, batch)
        scaled = loss * (count * self.world_size / batch.num_targets)
        return scaled, torch.tensor(count, device=scaled.device)
