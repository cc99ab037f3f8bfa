"""Triton kernels of the softmax cross-entropy over candidates, forward and backward.

Forward, one program per block of BLOCK_M rows: the rows' [BLOCK_M, d] tile stays in registers
while the candidates stream past in [BLOCK_N, d] tiles; each tile's logits s = h c^T + b
(float32 accumulation) update an online log-sum-exp (running max and scaled sum), the target's
logit and, with label smoothing, the sum over real columns. Nothing of size M x C is written:
per row the log-sum-exp and the loss.

Backward, from the per-row loss gradient g: ds = g * (exp(s - lse) - (1 - eps) [j = t] - eps/n [j
real]). dh = ds c runs per block of rows over every candidate tile; dc = ds^T h per block of
candidates over every row tile; each recomputes its logits (two more passes of matrix products and
exponentials, no atomics, deterministic). When the candidate blocks are too few to fill the GPU
(a sampled set is small next to an all-positions batch's rows), dc's rows are split among several
programs per block, each writing a float32 partial that one sum adds up in a fixed order. The
products take ds in the inputs' dtype, as flash
attention's backward does; float32 inputs multiply in TF32 when torch allows it for matmuls
(``torch.backends.cuda.matmul.allow_tf32``), else in full float32.
"""

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["softmax_cross_entropy_triton"]

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))
# dc's grid: at least this many programs per multiprocessor, by splitting the rows, as long as each
# split keeps ROW_TILES_PER_SPLIT row tiles (fewer would cost more in partials than they gain).
PROGRAMS_PER_SM = 4
ROW_TILES_PER_SPLIT = 16


@triton.jit
def _rows(ptr, rows, cols, stride, M, D):
    """The [len(rows), BLOCK_D] tile of a row-major [M, D] matrix (zeros outside)."""
    ok = (rows < M)[:, None] & (cols < D)[None, :]
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=ok, other=0.0)


@triton.jit
def _store_rows(ptr, rows, cols, M, D, value):
    """Store a [len(rows), BLOCK_D] tile into a contiguous [M, D] matrix (``_rows``'s inverse)."""
    ok = (rows < M)[:, None] & (cols < D)[None, :]
    tl.store(ptr + rows[:, None] * D + cols[None, :], value.to(ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b with float32 accumulation; "upcast" multiplies in float32 (the CPU interpreter's
    half-precision dot is wrong; half-precision values are exact in float32, so the product is the
    tensor cores' up to the order of the sums)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _candidate_block(c_ptr, bias_ptr, cols, dims, stride_c, N, D):
    """A block of candidates' vectors and biases (-inf past the end: no part in the softmax)."""
    return _rows(c_ptr, cols, dims, stride_c, N, D), tl.load(bias_ptr + cols, mask=cols < N, other=NEG_INF)


@triton.jit
def _logits(h, c, bias, PRECISION: tl.constexpr):
    """[rows, candidates] float32 logits of a row tile and a candidate tile."""
    return _dot(h, tl.trans(c), PRECISION) + bias[None, :]


@triton.jit
def _dlogits(s, bias, cols, target, lse, g, smoothing, spread, SMOOTH: tl.constexpr):
    """g * (softmax - (1 - eps) onehot(target) - eps/n on the real columns) for a logit tile."""
    p = tl.where(s > NEG_INF, tl.exp(s - lse[:, None]), 0.0)
    p -= tl.where(cols[None, :] == target[:, None], 1.0 - smoothing, 0.0)
    if SMOOTH:
        p -= tl.where((bias > NEG_INF)[None, :], spread, 0.0)
    return p * g[:, None]


@triton.jit
def _forward_kernel(
    h_ptr, c_ptr, bias_ptr, target_ptr, spread_ptr, lse_ptr, loss_ptr, M, N, D, stride_h, stride_c, smoothing,
    SMOOTH: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    h = _rows(h_ptr, rows, dims, stride_h, M, D)
    target = tl.load(target_ptr + rows, mask=rows < M, other=-1)
    top = tl.full([BLOCK_M], NEG_INF, tl.float32)  # running max
    total = tl.zeros([BLOCK_M], tl.float32)  # sum of exp(s - top)
    picked = tl.zeros([BLOCK_M], tl.float32)
    real_sum = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        c, bias = _candidate_block(c_ptr, bias_ptr, cols, dims, stride_c, N, D)
        s = _logits(h, c, bias, PRECISION)
        picked += tl.sum(tl.where(cols[None, :] == target[:, None], s, 0.0), axis=1)
        if SMOOTH:
            real_sum += tl.sum(tl.where((bias > NEG_INF)[None, :], s, 0.0), axis=1)
        new_top = tl.maximum(top, tl.max(s, axis=1))
        shift = tl.where(new_top == NEG_INF, 0.0, new_top)  # a tile of -inf columns only: nothing to add
        total = total * tl.exp(top - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        top = new_top
    lse = top + tl.log(total)
    loss = lse - (1.0 - smoothing) * picked
    if SMOOTH:
        loss -= tl.load(spread_ptr) * real_sum
    tl.store(lse_ptr + rows, lse, mask=rows < M)
    tl.store(loss_ptr + rows, loss, mask=rows < M)


@triton.jit
def _row_block(h_ptr, target_ptr, lse_ptr, g_ptr, rows, dims, stride_h, M, D):
    """A block of rows' vectors, target columns, log-sum-exps and loss gradients (what backward reads)."""
    h = _rows(h_ptr, rows, dims, stride_h, M, D)
    target = tl.load(target_ptr + rows, mask=rows < M, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rows < M, other=0.0)
    g = tl.load(g_ptr + rows, mask=rows < M, other=0.0)
    return h, target, lse, g


@triton.jit
def _grad_hidden_kernel(
    h_ptr, c_ptr, bias_ptr, target_ptr, spread_ptr, lse_ptr, g_ptr, dh_ptr, M, N, D, stride_h, stride_c, smoothing,
    SMOOTH: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    h, target, lse, g = _row_block(h_ptr, target_ptr, lse_ptr, g_ptr, rows, dims, stride_h, M, D)
    spread = tl.load(spread_ptr)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        c, bias = _candidate_block(c_ptr, bias_ptr, cols, dims, stride_c, N, D)
        ds = _dlogits(_logits(h, c, bias, PRECISION), bias, cols, target, lse, g, smoothing, spread, SMOOTH)
        acc += _dot(ds.to(c.dtype), c, PRECISION)
    _store_rows(dh_ptr, rows, dims, M, D, acc)


@triton.jit
def _grad_candidates_kernel(
    h_ptr, c_ptr, bias_ptr, target_ptr, spread_ptr, lse_ptr, g_ptr, dc_ptr, M, N, D, stride_h, stride_c, smoothing,
    rows_per_split, SMOOTH: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (i, k): candidate block i over the k-th ``rows_per_split`` rows, into dc's k-th [N, D] slice."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    c, bias = _candidate_block(c_ptr, bias_ptr, cols, dims, stride_c, N, D)
    spread = tl.load(spread_ptr)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first = split * rows_per_split
    for start in range(first, tl.minimum(first + rows_per_split, M), BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        h, target, lse, g = _row_block(h_ptr, target_ptr, lse_ptr, g_ptr, rows, dims, stride_h, M, D)
        ds = _dlogits(_logits(h, c, bias, PRECISION), bias, cols, target, lse, g, smoothing, spread, SMOOTH)
        acc += _dot(tl.trans(ds.to(h.dtype)), h, PRECISION)
    _store_rows(dc_ptr + split * N * D, cols, dims, N, D, acc)


def _config(dtype: torch.dtype, width: int) -> Tuple[int, int, int, int, str]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, warps, precision): 128 x 64 logit tiles up to d = 64, 64 x 64 beyond."""
    block_d = max(16, triton.next_power_of_2(width))
    wide = block_d > 64 or dtype == torch.float32
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        precision = "upcast" if dtype != torch.float32 else "ieee"
    else:
        precision = "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return (64 if wide else 128), 64, block_d, (4 if wide else 8), precision


class _SoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, candidates, bias, targets, smoothing, spread):
        hidden, candidates = hidden.contiguous(), candidates.contiguous()
        bias, targets = bias.contiguous(), targets.contiguous()
        (m, d), n = hidden.shape, candidates.shape[0]
        block_m, block_n, block_d, warps, precision = _config(hidden.dtype, d)
        lse = torch.empty(m, dtype=torch.float32, device=hidden.device)
        loss = torch.empty_like(lse)
        _forward_kernel[(triton.cdiv(m, block_m),)](
            hidden, candidates, bias, targets, spread, lse, loss, m, n, d, hidden.stride(0), candidates.stride(0),
            smoothing, SMOOTH=smoothing > 0, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=block_d, num_warps=warps,
        )  # fmt: skip
        ctx.smoothing = smoothing
        ctx.save_for_backward(hidden, candidates, bias, targets, spread, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        hidden, candidates, bias, targets, spread, lse = ctx.saved_tensors
        g = grad_loss.float().contiguous()
        (m, d), n = hidden.shape, candidates.shape[0]
        block_m, block_n, block_d, warps, precision = _config(hidden.dtype, d)
        shared = (hidden, candidates, bias, targets, spread, lse, g)
        sizes = (m, n, d, hidden.stride(0), candidates.stride(0), ctx.smoothing)
        options = dict(SMOOTH=ctx.smoothing > 0, PRECISION=precision, BLOCK_D=block_d, num_warps=warps)
        grad_hidden = grad_candidates = None
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.empty_like(hidden)
            _grad_hidden_kernel[(triton.cdiv(m, block_m),)](
                *shared, grad_hidden, *sizes, BLOCK_M=block_m, BLOCK_N=block_n, **options
            )
        if ctx.needs_input_grad[1]:  # candidate blocks of 128 rows: fewer passes over the rows
            blocks, tiles = triton.cdiv(n, 2 * block_n), triton.cdiv(m, block_n)
            span = triton.cdiv(tiles, _row_splits(blocks, tiles, hidden.device)) * block_n
            splits = triton.cdiv(m, span)
            shape, dtype = ((splits, n, d), torch.float32) if splits > 1 else ((n, d), candidates.dtype)
            grad_candidates = torch.empty(shape, dtype=dtype, device=candidates.device)
            _grad_candidates_kernel[(blocks, splits)](
                *shared, grad_candidates, *sizes, span, BLOCK_M=block_n, BLOCK_N=2 * block_n, **options
            )
            if splits > 1:
                grad_candidates = grad_candidates.sum(0).to(candidates.dtype)
        return grad_hidden, grad_candidates, None, None, None, None


def _row_splits(blocks: int, tiles: int, device: torch.device) -> int:
    """How many parts dc's ``tiles`` row tiles are split into, for ``blocks`` candidate blocks
    (``PROGRAMS_PER_SM``; one multiprocessor off the GPU, where the interpreter runs)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, blocks)
    return max(1, min(wanted, tiles // ROW_TILES_PER_SPLIT))


def softmax_cross_entropy_triton(
    hidden: Tensor, candidates: Tensor, bias: Tensor, targets: Tensor, smoothing: float, spread: Optional[Tensor]
) -> Tensor:
    """Per-row float32 loss; ``bias`` float32 [C], ``targets`` int64 [M] (-1: none), ``spread``
    the one-element float32 eps / (real column count), None without smoothing (see the package's
    docstring)."""
    spread = bias[:1] if spread is None else spread  # unread without smoothing: any float32 pointer
    return _SoftmaxCrossEntropy.apply(hidden, candidates, bias, targets, smoothing, spread)
