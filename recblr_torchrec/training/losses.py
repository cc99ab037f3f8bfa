"""The next-item losses: softmax cross-entropy over the whole item catalog, or over a sampled
candidate set with log-Q correction.

Both are ``kernels/softmax_ce``'s cross-entropy over candidate vectors with a bias per column
(the Triton kernel on GPU, its chunked reference elsewhere), which never holds the [M, V] logits
of an all-positions batch (M ~ 3e5 positions, V ~ 3.4e3 items would take gigabytes). The padding
row 0 is excluded from the full softmax (bias -inf): it is never a target, and the RecBole code's
extra logit for it only adds noise.

Label smoothing (epsilon > 0, beyond the paper) spreads epsilon of each target's probability mass
uniformly over the V - 1 real items: loss = lse - (1 - epsilon) * logit_target - epsilon * mean of
the real items' logits. The loss value then includes the smoothing term, so losses logged with
different epsilons do not compare.
"""

import torch
from torch import Tensor

from ..kernels.softmax_ce import softmax_cross_entropy


def _row_mean(per_row: Tensor, valid: "Tensor | None") -> Tensor:
    """The mean over rows, or over the ``valid`` rows only (0 when none; counted on the device, no
    host sync, so a CUDA graph can capture it; an invalid row's value, finite or not, is dropped)."""
    if valid is None:
        return per_row.mean()
    return torch.where(valid, per_row, 0.0).sum() / valid.sum().clamp(min=1)


def full_softmax_loss(
    hidden: Tensor,
    targets: Tensor,
    catalog: Tensor,
    chunk: int = 8192,
    check_targets: bool = True,
    ignore_padding: bool = False,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Mean cross-entropy of ``targets`` [M] under softmax(hidden [M, d] @ catalog [V, d]^T).

    Equal to ``F.cross_entropy(logits, targets)`` with the padding column masked to -inf.
    ``ignore_padding``: rows whose target is the padding id 0 carry no loss and the mean is over
    the others (``F.cross_entropy(..., ignore_index=0)``; 0 when every row is padding): the
    all-positions loss of a batch padded with filler sequences for CUDA graphs, whose row count is
    fixed while its target count is not.
    ``check_targets``: raise a ValueError for a target outside [1, V) ([0, V) with
    ``ignore_padding``; one host sync on GPU); a caller whose targets are item ids of the data the
    table was built for may skip it.
    ``label_smoothing``: epsilon in [0, 1), spread over the V - 1 real items (the padding column
    stays out), as ``F.cross_entropy(logits[:, 1:], targets - 1, label_smoothing=epsilon)``.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1) (0 = none, the paper's)")
    if hidden.shape[0] == 0:
        raise ValueError("no positions carry a target in this batch")
    low = 0 if ignore_padding else 1
    if check_targets and bool(((targets < low) | (targets >= catalog.shape[0])).any()):  # one sync, both bounds
        raise ValueError(f"targets must be item ids in [{low}, {catalog.shape[0]}), got min {int(targets.min())}")
    bias = torch.zeros(catalog.shape[0], dtype=torch.float32, device=catalog.device)
    bias[:1].fill_(float("-inf"))  # padding is never a candidate (a device fill: no host copy under capture)
    valid = targets > 0 if ignore_padding else None
    columns = targets if valid is None else torch.where(valid, targets, -1)
    per_row = softmax_cross_entropy(hidden, catalog, bias, columns, float(label_smoothing), chunk)
    return _row_mean(per_row, valid)


def sampled_softmax_loss(
    hidden: Tensor,
    targets: Tensor,
    candidate_ids: Tensor,
    candidates: Tensor,
    log_q: Tensor,
    check_targets: bool = True,
    ignore_padding: bool = False,
) -> Tensor:
    """Mean sampled-softmax cross-entropy with log-Q correction and accidental hits masked.

    Each position's logits are its target's and every candidate's, all corrected by ``- log_q``;
    a candidate equal to the position's own target (an accidental hit: the target drawn again,
    or another position's identical target) is masked, so the target counts once.

    Args:
        hidden: [M, d] user vectors at positions with a target.
        targets: [M] item ids, each present in ``candidate_ids``.
        candidate_ids: [C] item ids, ascending, distinct except for leading padding ids 0 whose
            ``log_q`` is +inf (they take no part: a batch padded to a fixed candidate count for
            CUDA graphs, ``data.loader.make_batch``); candidates [C, d] their embeddings.
        log_q: [C] log expected count of each candidate in the sampled set.
        check_targets: raise a ValueError when a target is not in ``candidate_ids`` (one host
            sync on GPU); a caller whose sampler adds every target may skip it.
        ignore_padding: rows whose target is the padding id 0 carry no loss and the mean is
            over the others (0 when every row is padding), as in :func:`full_softmax_loss`.
    """
    if hidden.shape[0] == 0:
        raise ValueError("no positions carry a target in this batch")
    order = torch.searchsorted(candidate_ids, targets, right=True) - 1  # the last match: past the padding ids
    order = order.clamp(min=0)
    valid = targets > 0 if ignore_padding else None
    if check_targets:
        found = candidate_ids[order] == targets
        if not bool(found.all() if valid is None else (found | ~valid).all()):
            raise ValueError("every target must be in the candidate set (the sampler adds the batch's targets)")
    columns = order if valid is None else torch.where(valid, order, -1)
    # candidate ids are distinct: the only accidental hit of a row is its target's own column, so
    # the logsumexp over [target, masked negatives] is the one over all candidates
    return _row_mean(softmax_cross_entropy(hidden, candidates, -log_q, columns), valid)
