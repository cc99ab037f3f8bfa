"""Softmax cross-entropy of each row's target among candidate vectors: the loss of both softmaxes.

For rows h_i [M, d], candidates c_j [C, d] with a bias b_j [C] (the candidate's log-Q
correction, 0, or -inf for a column that takes no part) and target columns t_i [M] (-1: none),
with logits s_ij = h_i . c_j + b_j::

    loss_i = logsumexp_j s_ij - (1 - eps) s_it - eps * mean of s_ij over the real columns (b_j > -inf)

The full softmax is candidates = the item table, b = (-inf, 0, ..., 0) (the padding row out),
t = the target items; sampled softmax is candidates = the sampled set, b = -log Q, t = each
target's column. A row without a target (t = -1) gets loss = logsumexp, which its caller weighs 0.

``KernelBackend.PYTORCH`` is the reference: the logits in chunks of rows, forward keeping only
the per-row log-sum-exp, backward recomputing each chunk (memory O(chunk * C)); every chunk is
a few passes over its [chunk, C] logits in memory. ``KernelBackend.TRITON`` never writes the
logits (:mod:`.triton`): forward streams the candidates through each block of rows with an
online log-sum-exp; backward recomputes the logits twice, once per block of rows for dh and once
per block of candidates for dc, as flash attention does. At an all-positions batch with
in-batch sampled candidates (M and C both ~3e4) the reference's passes over 1e9 logits are
most of the step; the kernel's work is its matrix products and one exponential per logit and pass.
While torch records a graph the reference runs (``kernels.backend``).

Example::

    >>> hidden, table = torch.randn(4, 8), torch.randn(6, 8)
    >>> bias = torch.tensor([float("-inf"), 0, 0, 0, 0, 0])
    >>> loss = softmax_cross_entropy(hidden, table, bias, torch.tensor([1, 5, 2, 3]), backend=KernelBackend.PYTORCH)
    >>> want = F.cross_entropy((hidden @ table.T)[:, 1:], torch.tensor([0, 4, 1, 2]), reduction="none")
    >>> torch.allclose(loss, want, atol=1e-6)
    True
"""

import torch
import torch.nn.functional as F  # noqa: F401 (the docstring's example)
from torch import Tensor

from ..backend import Kernel, KernelBackend, implementation

__all__ = ["softmax_cross_entropy"]

MAX_WIDTH = 256  # widest rows the kernel holds in registers; wider rows take the reference
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def softmax_cross_entropy(
    hidden: Tensor,
    candidates: Tensor,
    bias: Tensor,
    targets: Tensor,
    smoothing: float = 0.0,
    chunk: int = 8192,
    backend: "KernelBackend | str" = KernelBackend.AUTO,
) -> Tensor:
    """Per-row loss [M] (module docstring): float32, float64 for float64 inputs.

    Args:
        hidden: [M, d] row vectors.
        candidates: [C, d] candidate vectors.
        bias: [C] added to every row's logits; -inf takes a column out of the softmax.
        targets: [M] int64 column of each row's target in [0, C), or -1 for none.
        smoothing: label smoothing epsilon in [0, 1), spread over the real columns.
        chunk: rows per chunk of the reference.
        backend: ``TRITON``, ``PYTORCH`` or ``AUTO`` (the kernel for CUDA tensors, except float32
            products with TF32 off, which the reference's cuBLAS matmuls take faster). Under autocast
            the kernel takes both inputs in autocast's dtype, as the reference's matmul does.

    Gradients flow to ``hidden`` and ``candidates``.
    """
    if hidden.dim() != 2 or candidates.dim() != 2 or hidden.shape[1] != candidates.shape[1]:
        shapes = f"{tuple(hidden.shape)} and {tuple(candidates.shape)}"
        raise ValueError(f"hidden [M, d] and candidates [C, d] must share d; got {shapes}")
    if bias.shape != (candidates.shape[0],) or targets.shape != (hidden.shape[0],):
        want = f"bias must be [C] = [{candidates.shape[0]}] and targets [M] = [{hidden.shape[0]}]"
        raise ValueError(f"{want}; got {tuple(bias.shape)} and {tuple(targets.shape)}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing {smoothing} must be in [0, 1)")
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # eps / (real column count), counted on the device (no host sync: a CUDA graph replays it)
    spread = smoothing / _real(bias).sum().clamp(min=1).to(acc).reshape(1) if smoothing else None
    if _kernel_fits(hidden, candidates, backend):
        from .triton import softmax_cross_entropy_triton  # lazily: the reference needs no Triton

        dtype = _product_dtype(hidden, candidates)
        return softmax_cross_entropy_triton(
            hidden.to(dtype), candidates.to(dtype), bias.float(), targets, float(smoothing), spread
        )
    return _ChunkedReference.apply(hidden, candidates, bias, targets, float(smoothing), spread, chunk)


def _real(bias: Tensor) -> Tensor:
    """The columns that take part in the softmax."""
    return bias > float("-inf")


def _kernel_fits(hidden: Tensor, candidates: Tensor, backend: "KernelBackend | str") -> bool:
    if implementation(Kernel.SOFTMAX_CE, backend, hidden.device) is not KernelBackend.TRITON:
        return False
    full_float32 = _product_dtype(hidden, candidates) == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    if KernelBackend(backend) is KernelBackend.AUTO and full_float32:
        return False  # cuBLAS's SGEMM far outruns the kernel's FMA dots
    return (
        0 < hidden.shape[1] <= MAX_WIDTH
        and hidden.shape[0] > 0
        and candidates.shape[0] > 0
        and hidden.dtype in _FLOATS
        and candidates.dtype in _FLOATS
    )


def _product_dtype(hidden: Tensor, candidates: Tensor) -> torch.dtype:
    """The dtype the logits' products take: autocast's where it is on, as the reference's matmul."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, candidates.dtype)


def _chunk_logits(hidden: Tensor, candidates: Tensor, bias: Tensor, acc: torch.dtype) -> Tensor:
    return (hidden @ candidates.T).to(acc) + bias.to(acc)


class _ChunkedReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, candidates, bias, targets, smoothing, spread, chunk):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # bf16 inputs: fp32 sums
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        loss = torch.empty_like(lse)
        for start in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[start : start + chunk], candidates, bias, acc)
            part = slice(start, start + chunk)
            lse[part] = torch.logsumexp(logits, dim=-1)
            target = targets[part]
            picked = logits.gather(1, target.clamp(min=0)[:, None])[:, 0].masked_fill(target < 0, 0.0)
            loss[part] = lse[part] - (1.0 - smoothing) * picked
            if smoothing:
                loss[part] -= torch.where(_real(bias), logits, 0.0).sum(dim=-1) * spread
        ctx.chunk, ctx.smoothing = chunk, smoothing
        ctx.save_for_backward(hidden, candidates, bias, targets, spread, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        hidden, candidates, bias, targets, spread, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_candidates = torch.zeros_like(candidates) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            h = hidden[part]
            probs = _dlogits(_chunk_logits(h, candidates, bias, lse.dtype), lse[part], targets[part], ctx.smoothing)
            if ctx.smoothing:
                probs -= torch.where(_real(bias), spread, 0.0)
            probs = (probs * grad_loss[part, None].to(probs.dtype)).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[part] = probs @ candidates
            if grad_candidates is not None:
                grad_candidates.addmm_(probs.T, h)
        return grad_hidden, grad_candidates, None, None, None, None, None


def _dlogits(logits: Tensor, lse: Tensor, targets: Tensor, smoothing: float) -> Tensor:
    """softmax - (1 - eps) onehot(target): the logits' gradient per unit of row loss, before the
    smoothing's spread over the real columns."""
    probs = torch.exp(logits - lse[:, None])
    rows = torch.arange(logits.shape[0], device=logits.device)
    hit = (targets >= 0).to(probs.dtype) * (1.0 - smoothing)
    probs[rows, targets.clamp(min=0)] -= hit
    return probs
