"""Softmax cross-entropy over the whole item catalog, computed in chunks of positions.

The logits [M, V] of an all-positions batch (M ~ 3e5 positions, V ~ 3.4e3 items) would take
gigabytes; here forward keeps only the log-sum-exp per position and backward recomputes each
chunk's logits, so memory is O(chunk * V) whatever M is. The padding row 0 is excluded from the
softmax: it is never a target, and the RecBole code's extra logit for it only adds noise.

Label smoothing (epsilon > 0, beyond the paper) spreads epsilon of each target's probability mass
uniformly over the V - 1 real items: loss = lse - (1 - epsilon) * logit_target - epsilon * mean of
the real items' logits (taken from each chunk's logits, like the log-sum-exp). The loss value then
includes the smoothing term, so losses logged with different epsilons do not compare.
"""

import torch
from torch import Tensor


def _chunk_logits(hidden: Tensor, catalog: Tensor) -> Tensor:
    logits = hidden @ catalog.T
    logits[:, 0] = float("-inf")  # padding is never a candidate
    return logits


class _ChunkedSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: Tensor, catalog: Tensor, targets: Tensor, chunk: int, ignore_padding: bool, smoothing: float
    ) -> Tensor:
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # bf16 inputs: fp32 sums
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        target_logit = torch.empty_like(lse)
        for start in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[start : start + chunk], catalog).to(acc)
            lse[start : start + chunk] = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, targets[start : start + chunk, None])[:, 0]
            if smoothing:  # a padding target's -inf stays -inf: that row is dropped below
                target = (1.0 - smoothing) * target + smoothing * logits[:, 1:].mean(dim=-1)
            target_logit[start : start + chunk] = target
        ctx.chunk, ctx.smoothing = chunk, smoothing
        if not ignore_padding:
            ctx.save_for_backward(hidden, catalog, targets, lse, None)
            return (lse - target_logit).mean()
        # a padding target's logit is -inf: its row is selected away, and the mean is over the
        # other rows, counted on the device (no host sync, so a CUDA graph can capture it)
        weight = (targets > 0).to(acc)
        weight = weight / weight.sum().clamp(min=1.0)
        ctx.save_for_backward(hidden, catalog, targets, lse, weight)
        return torch.where(weight > 0, lse - target_logit, 0.0).mul(weight).sum()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        hidden, catalog, targets, lse, weight = ctx.saved_tensors
        scale = grad_loss / hidden.shape[0] if weight is None else grad_loss * weight[:, None]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_catalog = torch.zeros_like(catalog) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[start : start + ctx.chunk]
            probs = torch.exp(_chunk_logits(h, catalog).to(lse.dtype) - lse[start : start + ctx.chunk, None])
            probs[torch.arange(h.shape[0], device=h.device), targets[start : start + ctx.chunk]] -= 1.0 - ctx.smoothing
            if ctx.smoothing:
                probs[:, 1:] -= ctx.smoothing / (catalog.shape[0] - 1)
            row_scale = scale if weight is None else scale[start : start + ctx.chunk]
            probs = (probs * row_scale).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + ctx.chunk] = probs @ catalog
            if grad_catalog is not None:
                grad_catalog.addmm_(probs.T, h)
        return grad_hidden, grad_catalog, None, None, None, None


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
    return _ChunkedSoftmaxCE.apply(hidden, catalog, targets, chunk, ignore_padding, float(label_smoothing))


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
    logits = (hidden @ candidates.T).float() - log_q[None, :].float()
    positive = logits.gather(1, order[:, None])
    if valid is not None:  # a padding row's "positive" is a padding candidate at -inf: keep its row finite
        positive = positive.masked_fill(~valid[:, None], 0.0)
    negatives = logits.masked_fill(candidate_ids[None, :] == targets[:, None], float("-inf"))
    per_row = torch.logsumexp(torch.cat([positive, negatives], dim=1), dim=1) - positive[:, 0]
    if valid is None:
        return per_row.mean()
    return (per_row * valid).sum() / valid.sum().clamp(min=1)
