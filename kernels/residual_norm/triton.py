"""Triton kernels for LayerNorm(Dropout(branch) + residual), forward and backward.

Rows of width d are normalised in [BLOCK_N, BLOCK_D] tiles (BLOCK_D = d rounded up to a power of
two, BLOCK_N rows so a tile holds ~4K values), in float32 whatever the input dtype. Forward
writes y and the per-row mean and 1/std. Dropout keeps element (row, col) when
``tl.rand(seed, row * d + col) >= p``; backward draws the same numbers from the same seed, so no
mask is stored. The seed is a one-element int64 tensor on the kernel's device, drawn by torch's
generator of that device: no host round trip, and a CUDA graph that captured the step draws a
new seed at every replay (a Python int would be frozen into the graph). Backward recomputes
s = Dropout(branch) + residual from its inputs (it saves them, not s: the residual is kept alive
by the next layer's projection anyway), then
ds = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) with g = dy * weight; the residual's gradient
is ds, the branch's ds * keep / (1 - p). Weight and bias gradients are reduced per program into
[P, d] partials that the host sums in a fixed order (deterministic, no atomics).
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["dropout_add_layer_norm_triton", "dropout_keep_mask"]

_TILE = 4096  # values per tile: BLOCK_N = _TILE // BLOCK_D rows
_MAX_PROGRAMS = 1024  # backward programs; each walks N / (BLOCK_N * P) tiles


@triton.jit
def _keep(seed, at, p):
    """The dropout mask at element offsets ``at``: kept where Philox(seed, offset) >= p."""
    return tl.rand(seed, at.to(tl.int32)) >= p


@triton.jit
def _mixed(a_ptr, r_ptr, rows, cols, ok, D, p, scale, seed, HAS_RESIDUAL: tl.constexpr, DROPOUT: tl.constexpr):
    """(s, keep): s = Dropout(branch) + residual in float32 for a tile, keep the dropout mask."""
    at = rows[:, None] * D + cols[None, :]
    s = tl.load(a_ptr + at, mask=ok, other=0.0).to(tl.float32)
    keep = ok
    if DROPOUT:
        keep = ok & _keep(seed, at, p)
        s = tl.where(keep, s * scale, 0.0)
    if HAS_RESIDUAL:
        s += tl.load(r_ptr + at, mask=ok, other=0.0).to(tl.float32)
    return s, keep


@triton.jit
def _forward_kernel(
    a_ptr, r_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, N, D, eps, p, scale, seed_ptr,
    HAS_RESIDUAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    seed = tl.load(seed_ptr)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < N, cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    s, _ = _mixed(a_ptr, r_ptr, rows, cols, ok, D, p, scale, seed, HAS_RESIDUAL, DROPOUT)
    mean = tl.sum(s, axis=1) / D
    centred = tl.where(ok, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _backward_kernel(
    a_ptr, r_ptr, w_ptr, mean_ptr, rstd_ptr, dy_ptr, da_ptr, dr_ptr, dw_ptr, db_ptr, N, D, p, scale, seed_ptr,
    HAS_RESIDUAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    seed = tl.load(seed_ptr)
    program, programs = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    for tile in range(program, tl.cdiv(N, BLOCK_N), programs):
        rows = (tile * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # < N + BLOCK_N < 2**31: no overflow
        row_ok = rows < N
        ok = row_ok[:, None] & col_ok[None, :]
        s, keep = _mixed(a_ptr, r_ptr, rows, cols, ok, D, p, scale, seed, HAS_RESIDUAL, DROPOUT)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        x_hat = tl.where(ok, (s - mean[:, None]) * rstd[:, None], 0.0)
        at = rows[:, None] * D + cols[None, :]
        dy = tl.load(dy_ptr + at, mask=ok, other=0.0).to(tl.float32)
        g = dy * w[None, :]
        ds = (g - (x_hat * (tl.sum(g * x_hat, axis=1) / D)[:, None] + (tl.sum(g, axis=1) / D)[:, None])) * rstd[:, None]
        if HAS_RESIDUAL:
            tl.store(dr_ptr + at, ds.to(dr_ptr.dtype.element_ty), mask=ok)
        da = tl.where(keep, ds * scale, 0.0) if DROPOUT else ds
        tl.store(da_ptr + at, da.to(da_ptr.dtype.element_ty), mask=ok)
        dw += tl.sum(dy * x_hat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(dw_ptr + program * D + cols, dw, mask=col_ok)
    tl.store(db_ptr + program * D + cols, db, mask=col_ok)


@triton.jit
def _keep_mask_kernel(out_ptr, N, D, p, seed_ptr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    seed = tl.load(seed_ptr)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    ok = (rows < N)[:, None] & (cols < D)[None, :]
    at = rows[:, None] * D + cols[None, :]
    tl.store(out_ptr + at, _keep(seed, at, p).to(tl.int8), mask=ok)


def _allocate(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Buffers the kernels fill completely (tests poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _blocks(width: int) -> Tuple[int, int]:
    block_d = triton.next_power_of_2(width)
    return max(1, _TILE // block_d), block_d


def draw_seed(device: torch.device) -> Tensor:
    """A Philox seed: a [1] int64 tensor drawn on ``device`` by torch's generator there
    (``torch.manual_seed`` and checkpoint replay reproduce it; CUDA graphs redraw it each replay)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device)


def dropout_keep_mask(seed: Tensor, rows: int, width: int, p: float, device: torch.device) -> Tensor:
    """The bool [rows, width] mask the kernels keep with ``seed`` (a [1] int64 tensor, or an int) and ``p``
    (for tests and checks)."""
    seed = torch.as_tensor(seed, dtype=torch.int64, device=device).reshape(1)
    out = torch.empty((rows, width), dtype=torch.int8, device=device)
    block_n, block_d = _blocks(width)
    if rows:
        _keep_mask_kernel[(triton.cdiv(rows, block_n),)](out, rows, width, p, seed, BLOCK_N=block_n, BLOCK_D=block_d)
    return out.bool()


class _DropoutAddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, branch, residual, weight, bias, p, eps, out_dtype):  # types: dropout_add_layer_norm_triton
        width = branch.shape[-1]
        shape = branch.shape
        a = branch.reshape(-1, width).contiguous()
        r = residual.reshape(-1, width).contiguous() if residual is not None else None
        n = a.shape[0]
        y = _allocate((n, width), out_dtype, a.device)
        mean = _allocate((n,), torch.float32, a.device)
        rstd = _allocate((n,), torch.float32, a.device)
        seed = draw_seed(a.device) if p > 0 else mean  # without dropout the kernels never read it
        block_n, block_d = _blocks(width)
        w, b = weight.detach().contiguous(), bias.detach().contiguous()
        if n:
            _forward_kernel[(triton.cdiv(n, block_n),)](
                a, a if r is None else r, w, b, y, mean, rstd, n, width, eps, p, 1.0 / (1.0 - p), seed,
                HAS_RESIDUAL=r is not None, DROPOUT=p > 0, BLOCK_N=block_n, BLOCK_D=block_d,
            )  # fmt: skip
        ctx.save_for_backward(a, r, w, mean, rstd, seed)
        ctx.meta = shape, p, weight.dtype, bias.dtype
        return y.reshape(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        a, r, w, mean, rstd, seed = ctx.saved_tensors
        shape, p, weight_dtype, bias_dtype = ctx.meta
        n, width = a.shape
        if n == 0:  # nothing to launch: the affine parameters get zero gradients
            zeros = torch.zeros(width, dtype=torch.float32, device=a.device)
            grad_residual = torch.zeros(shape, dtype=r.dtype, device=r.device) if r is not None else None
            empty = torch.zeros(shape, dtype=a.dtype, device=a.device)
            return empty, grad_residual, zeros.to(weight_dtype), zeros.to(bias_dtype), None, None, None
        dy = grad_y.reshape(n, width).contiguous()
        block_n, block_d = _blocks(width)
        programs = min(triton.cdiv(n, block_n), _MAX_PROGRAMS)
        grad_a = _allocate((n, width), a.dtype, a.device)
        grad_r = _allocate((n, width), r.dtype, r.device) if r is not None else None
        grad_w = _allocate((programs, width), torch.float32, a.device)
        grad_b = _allocate((programs, width), torch.float32, a.device)
        _backward_kernel[(programs,)](
            a, a if r is None else r, w, mean, rstd, dy, grad_a, grad_a if grad_r is None else grad_r,
            grad_w, grad_b, n, width, p, 1.0 / (1.0 - p), seed,
            HAS_RESIDUAL=r is not None, DROPOUT=p > 0, BLOCK_N=block_n, BLOCK_D=block_d,
        )  # fmt: skip
        grad_residual = grad_r.reshape(shape) if grad_r is not None else None
        return (
            grad_a.reshape(shape),
            grad_residual,
            grad_w.sum(0).to(weight_dtype),
            grad_b.sum(0).to(bias_dtype),
            None,
            None,
            None,
        )


def dropout_add_layer_norm_triton(
    branch: Tensor,
    residual: Optional[Tensor],
    weight: Tensor,
    bias: Tensor,
    p: float,
    eps: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """The Triton kernels behind ``dropout_add_layer_norm(..., backend=KernelBackend.TRITON)``;
    ``p`` is the dropout actually applied (0 outside training); the output is ``out_dtype`` (the
    caller applies ``F.layer_norm``'s dtype rule)."""
    return _DropoutAddLayerNorm.apply(branch, residual, weight, bias, float(p), float(eps), out_dtype)
