"""Triton kernels for SiLU(causal depthwise conv(x)) on packed rows, forward and backward.

Row t of a packed batch reads x at t, t-1, ..., t-k+1, each tap masked where its row belongs to
an earlier sequence (``positions[t] < j``). Forward: one program per [BLOCK_N, BLOCK_D] tile; the
k shifted loads of x hit the cache, so DRAM sees x once and c once. Backward recomputes the
pre-activation instead of storing it, in two passes: the first forms dpre = dc * SiLU'(pre) once
per row and writes it (in x's dtype), reducing dw and dbias per program into [P, k, D] and [P, D]
partials that the host sums in a fixed order (deterministic, no atomics; programs walk the row
tiles with a stride, so P stays small whatever N is); the second forms
dx[t] = sum_j dpre[t+j] * w[k-1-j] over the taps j whose row t+j is in t's sequence.

x may be a strided view (the first D columns of the input projection); weights are read in
float32, sums are float32, c and dx come back in x's dtype.
"""

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["causal_conv_silu_triton"]

# Of {16, 32, 64} x {512, 1024, 4096} programs, the fastest one-kernel backward on the H200
# (tiles_h200.json); for the two-pass backward the sweep's spread was within its noise
# (tiles_two_pass_conv_h200.json), so the tile stayed for the forward and dx.
_BLOCK_N = 64
# The first backward pass (dpre, dw, db): [16, 128] tiles over at most 2,048 programs along the
# rows (each walks N / (16 * P) tiles), the fastest of the register-sum tiles [32, 64] x 1,024 or
# 2,048, [64, 64] x 1,024 with 8 warps and [16, 128] x 2,048 on an H100 at 2048 x 200,
# 256 x 2048 and 32 x 8192 rows of D = 128 in bf16, 0.57-0.66x the time of the per-tile sums it
# replaced (benchmarks/results/kernel_variants_h100.json; tile_sweep.py --conv-dpre sweeps it).
_DPRE_BLOCK_N = 16
_DPRE_MAX_BLOCK_D = 128
_DPRE_MAX_PROGRAMS = 2048


@triton.jit
def _tap(x_ptr, x_stride, rows, pos, cols, ok, j):
    """x[t - j] for a tile's rows t, fp32; 0 where row t - j is before t's sequence."""
    tap_ok = ok & (pos >= j)[:, None]
    return tl.load(x_ptr + (rows - j)[:, None] * x_stride + cols[None, :], mask=tap_ok, other=0.0).to(tl.float32)


@triton.jit
def _tap_weight(w_ptr, cols, col_ok, K: tl.constexpr, j: tl.constexpr):
    """w[k-1-j], the weight of tap j (x[t - j]), fp32 [BLOCK_D]; zeros for a tap the conv lacks (j >= K)."""
    if j < K:
        return tl.load(w_ptr + cols * K + (K - 1 - j), mask=col_ok, other=0.0).to(tl.float32)
    return tl.zeros(cols.shape, dtype=tl.float32)


@triton.jit
def _tap_sum(x_ptr, x_stride, w_ptr, rows, pos, cols, col_ok, ok, FIRST: tl.constexpr, K: tl.constexpr):
    """sum_j w[k-1-j] * x[rows - j] over taps FIRST <= j < K, fp32 [BLOCK_N, BLOCK_D]; taps before a
    sequence's start read 0."""
    acc = tl.zeros(ok.shape, dtype=tl.float32)
    for j in tl.static_range(FIRST, K):
        acc += _tap(x_ptr, x_stride, rows, pos, cols, ok, j) * _tap_weight(w_ptr, cols, col_ok, K, j)[None, :]
    return acc


@triton.jit
def _pre_activation(x_ptr, x_stride, w_ptr, bias, rows, pos, cols, col_ok, ok, K: tl.constexpr):
    """bias + sum_j w[k-1-j] * x[rows - j] over every tap, fp32 [BLOCK_N, BLOCK_D]."""
    return bias[None, :] + _tap_sum(x_ptr, x_stride, w_ptr, rows, pos, cols, col_ok, ok, 0, K)


@triton.jit
def _add_row(dw, taps, row, values):
    """dw [K_POW2, BLOCK_D] with ``values`` [BLOCK_D] added to its row ``row``."""
    return dw + tl.where((taps == row)[:, None], values[None, :], 0.0)


@triton.jit
def _conv_silu_forward_kernel(
    x_ptr, w_ptr, b_ptr, pos_ptr, out_ptr, N, D, x_stride,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < N, cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0)
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    pre = _pre_activation(x_ptr, x_stride, w_ptr, bias, rows, pos, cols, col_ok, ok, K)
    out = pre * tl.sigmoid(pre)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _conv_silu_dpre_kernel(
    x_ptr, w_ptr, b_ptr, pos_ptr, dc_ptr, dpre_ptr, dw_ptr, db_ptr, N, D, x_stride,
    K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Backward pass 1: dpre = dc * SiLU'(pre) at every row (pre recomputed), written once; the
    weight and bias gradients reduced per program from it. The bias's and the first four taps'
    products accumulate in [BLOCK_N, BLOCK_D] registers, summed over rows once after the
    program's last tile (a sum over rows per tile cost more than the tile's bytes); taps past the
    fourth (k > 4) are summed per tile."""
    program, programs = tl.program_id(0), tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    w0 = _tap_weight(w_ptr, cols, col_ok, K, 0)
    w1 = _tap_weight(w_ptr, cols, col_ok, K, 1)
    w2 = _tap_weight(w_ptr, cols, col_ok, K, 2)
    w3 = _tap_weight(w_ptr, cols, col_ok, K, 3)
    acc0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # sum_t dpre[t] * x[t - 0], per row slot
    acc1 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc_bias = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    taps = tl.arange(0, K_POW2)
    dw = tl.zeros([K_POW2, BLOCK_D], dtype=tl.float32)  # row K-1-j: sum_t dpre[t] * x[t-j], taps j >= 4
    for tile in range(program, tl.cdiv(N, BLOCK_N), programs):
        rows = (tile * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < N
        ok = row_ok[:, None] & col_ok[None, :]
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=0)
        x0 = _tap(x_ptr, x_stride, rows, pos, cols, ok, 0)
        x1 = _tap(x_ptr, x_stride, rows, pos, cols, ok & (K > 1), 1)  # taps the conv lacks read nothing
        x2 = _tap(x_ptr, x_stride, rows, pos, cols, ok & (K > 2), 2)
        x3 = _tap(x_ptr, x_stride, rows, pos, cols, ok & (K > 3), 3)
        pre = bias[None, :] + x0 * w0[None, :] + x1 * w1[None, :] + x2 * w2[None, :] + x3 * w3[None, :]
        pre += _tap_sum(x_ptr, x_stride, w_ptr, rows, pos, cols, col_ok, ok, 4, K)
        dc = tl.load(dc_ptr + rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        gate = tl.sigmoid(pre)
        dpre = tl.where(ok, dc * gate * (1.0 + pre * (1.0 - gate)), 0.0)
        tl.store(dpre_ptr + rows[:, None] * D + cols[None, :], dpre.to(dpre_ptr.dtype.element_ty), mask=ok)
        acc_bias += dpre
        acc0 += dpre * x0
        acc1 += dpre * x1
        acc2 += dpre * x2
        acc3 += dpre * x3
        for j in tl.static_range(4, K):  # the taps again (cache hits)
            dw = _add_row(dw, taps, K - 1 - j, tl.sum(dpre * _tap(x_ptr, x_stride, rows, pos, cols, ok, j), axis=0))
    dw = _add_row(dw, taps, K - 1, tl.sum(acc0, axis=0))
    dw = _add_row(dw, taps, K - 2, tl.sum(acc1, axis=0))
    dw = _add_row(dw, taps, K - 3, tl.sum(acc2, axis=0))
    dw = _add_row(dw, taps, K - 4, tl.sum(acc3, axis=0))
    at = program * K * D + taps[:, None] * D + cols[None, :]
    tl.store(dw_ptr + at, dw, mask=(taps < K)[:, None] & col_ok[None, :])
    tl.store(db_ptr + program * D + cols, tl.sum(acc_bias, axis=0), mask=col_ok)


@triton.jit
def _conv_dx_kernel(
    dpre_ptr, w_ptr, pos_ptr, dx_ptr, N, D,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Backward pass 2: dx[t] = sum_j w[k-1-j] * dpre[t+j] over the taps j whose row t+j is in t's sequence."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    dx = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        later = rows + j
        pos_later = tl.load(pos_ptr + later, mask=later < N, other=0)
        reach = ((later < N) & (pos_later >= j))[:, None] & col_ok[None, :]
        dpre = tl.load(dpre_ptr + later[:, None] * D + cols[None, :], mask=reach, other=0.0).to(tl.float32)
        dx += dpre * _tap_weight(w_ptr, cols, col_ok, K, j)[None, :]
    ok = (rows < N)[:, None] & col_ok[None, :]
    tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _allocate(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Buffers the kernels fill completely (tests poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _block_d(channels: int) -> int:
    return min(64, triton.next_power_of_2(channels))


def _rows_view(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _CausalConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, positions: Tensor) -> Tensor:
        x, positions = _rows_view(x), positions.contiguous()
        n, channels = x.shape
        k = weight.shape[-1]
        w, b = weight.detach().reshape(channels, k).contiguous(), bias.detach().contiguous()
        out = _allocate((n, channels), x.dtype, x.device)
        block_d = _block_d(channels)
        grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(channels, block_d))
        if n:
            _conv_silu_forward_kernel[grid](
                x, w, b, positions, out, n, channels, x.stride(0), K=k, BLOCK_N=_BLOCK_N, BLOCK_D=block_d
            )
        ctx.save_for_backward(x, w, b, positions)
        ctx.shapes = weight.shape, weight.dtype, bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_c: Tensor):
        x, w, b, positions = ctx.saved_tensors
        weight_shape, weight_dtype, bias_dtype = ctx.shapes
        n, channels = x.shape
        k = w.shape[1]
        grad_c = grad_c.contiguous()
        block_d = _block_d(channels)
        dpre_block_d = min(_DPRE_MAX_BLOCK_D, triton.next_power_of_2(channels))
        programs = max(1, min(triton.cdiv(n, _DPRE_BLOCK_N), _DPRE_MAX_PROGRAMS))
        grad_pre = _allocate((n, channels), x.dtype, x.device)  # x's dtype: bf16 halves its round trip
        grad_x = _allocate((n, channels), x.dtype, x.device)
        grad_w = _allocate((programs, k, channels), torch.float32, x.device)
        grad_b = _allocate((programs, channels), torch.float32, x.device)
        _conv_silu_dpre_kernel[(programs, triton.cdiv(channels, dpre_block_d))](
            x, w, b, positions, grad_c, grad_pre, grad_w, grad_b, n, channels, x.stride(0),
            K=k, K_POW2=triton.next_power_of_2(k), BLOCK_N=_DPRE_BLOCK_N, BLOCK_D=dpre_block_d,
        )  # fmt: skip
        if n:
            _conv_dx_kernel[(triton.cdiv(n, _BLOCK_N), triton.cdiv(channels, block_d))](
                grad_pre, w, positions, grad_x, n, channels, K=k, BLOCK_N=_BLOCK_N, BLOCK_D=block_d
            )
        grad_w = grad_w.sum(0).T.reshape(weight_shape).to(weight_dtype)
        return grad_x, grad_w, grad_b.sum(0).to(bias_dtype), None


def causal_conv_silu_triton(x: Tensor, weight: Tensor, bias: Tensor, positions: Tensor) -> Tensor:
    """The Triton kernels behind ``causal_conv_silu(..., backend=KernelBackend.TRITON)``."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(
            f"the Triton causal conv takes float32, bfloat16 or float16, got {x.dtype}; use the PyTorch backend"
        )
    return _CausalConvSiLU.apply(x, weight, bias, positions)
