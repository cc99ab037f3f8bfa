"""PyTorch reference for the linear scan: a sequential loop over time with an analytic backward.

On CPU this is also the fast path: T steps of one fused multiply-add over [B, D] beat a
log-depth scan, whose log2(T) passes each touch all of [B, T, D]. The loop itself
(:func:`scan_sequential`) is TorchScript-compatible, so serving artifacts use it unchanged.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scan_sequential(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """h_t = a_t * h_{t-1} + b_t over the leading dim of time-major a, b [T, B, D]; h0 [B, D]."""
    h = torch.empty_like(b)
    state = h0
    for t in range(a.shape[0]):
        state = torch.addcmul(b[t], a[t], state)
        h[t] = state
    return h


class _SequentialScan(torch.autograd.Function):
    """Dense [B, T, D] scan in the accumulation dtype; backward is the reverse scan (docs/kernels.md)."""

    @staticmethod
    def forward(ctx, log_a: Tensor, b: Tensor, h0: Tensor) -> Tuple[Tensor, Tensor]:
        a_tm = log_a.transpose(0, 1).exp().contiguous()  # [T, B, D], time-major for contiguous steps
        h_tm = scan_sequential(a_tm, b.transpose(0, 1).contiguous(), h0)
        ctx.save_for_backward(a_tm, h_tm, h0)
        final = h_tm[-1] if h_tm.shape[0] > 0 else h0
        return h_tm.transpose(0, 1), final.clone()

    @staticmethod
    def backward(ctx, grad_h: Optional[Tensor], grad_final: Optional[Tensor]):
        a_tm, h_tm, h0 = ctx.saved_tensors
        steps = a_tm.shape[0]
        delta = torch.zeros_like(h0) if grad_final is None else grad_final.to(h0.dtype)
        g_tm = torch.zeros_like(h_tm) if grad_h is None else grad_h.to(h0.dtype).transpose(0, 1).contiguous()
        grad_a = torch.empty_like(a_tm)
        grad_b = torch.empty_like(a_tm)
        for t in range(steps - 1, -1, -1):
            delta = delta + g_tm[t]
            grad_b[t] = delta
            grad_a[t] = delta * (h_tm[t - 1] if t > 0 else h0)
            delta = delta * a_tm[t]
        grad_log_a = (grad_a * a_tm).transpose(0, 1)  # d/dlog_a = d/da * a
        return grad_log_a, grad_b.transpose(0, 1), delta


def packed_positions(offsets: Tensor, num_positions: int) -> Tuple[Tensor, Tensor]:
    """For packed rows, the sequence index and the position inside its sequence, each [N]."""
    lengths = offsets[1:] - offsets[:-1]
    seq_index = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=num_positions
    )
    pos_index = torch.arange(num_positions, device=offsets.device) - offsets[:-1][seq_index]
    return seq_index, pos_index


def pad_packed(values: Tensor, offsets: Tensor, seq_index: Tensor, pos_index: Tensor, length: int = 0) -> Tensor:
    """Packed rows [N, D] -> a right-padded block [S, T, D] with zeros after each sequence.

    ``seq_index``/``pos_index`` come from :func:`packed_positions`; TorchScript-compatible.
    T is the longest sequence (read on the host: a synchronisation), or ``length`` when it is > 0,
    which must then bound every sequence (no read, so a CUDA graph can capture the padding).
    """
    num_seq = offsets.shape[0] - 1
    if length > 0:
        t_max = length
    else:
        t_max = int((offsets[1:] - offsets[:-1]).max()) if num_seq > 0 else 0
    padded = values.new_zeros(num_seq, t_max, values.shape[-1])
    return padded.index_put((seq_index, pos_index), values)


def linear_scan_pytorch(
    log_a: Tensor, b: Tensor, offsets: Optional[Tensor], initial_state: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """Reference implementation behind ``linear_scan(..., backend=KernelBackend.PYTORCH)``."""
    acc = compute_dtype(b.dtype)
    num_seq = log_a.shape[0] if offsets is None else offsets.numel() - 1
    channels = log_a.shape[-1]
    if initial_state is None:
        h0 = torch.zeros(num_seq, channels, dtype=acc, device=b.device)
    else:
        h0 = initial_state.to(acc)
    if offsets is None:
        h, final = _SequentialScan.apply(log_a.to(acc), b.to(acc), h0)
        return h.to(b.dtype), final
    # Packed: scatter into a right-padded [S, T_max, D] block whose padding steps have a = 1 and
    # b = 0, so the state is carried unchanged to the end and the last step is the final state.
    seq_index, pos_index = packed_positions(offsets, log_a.shape[0])
    log_a_pad = pad_packed(log_a.to(acc), offsets, seq_index, pos_index)
    b_pad = pad_packed(b.to(acc), offsets, seq_index, pos_index)
    h_pad, final = _SequentialScan.apply(log_a_pad, b_pad, h0)
    return h_pad[seq_index, pos_index].to(b.dtype), final


def scan_log_depth(a: Tensor, b: Tensor) -> Tensor:
    """Inclusive scan h_t = a_t * h_{t-1} + b_t, h_{-1} = 0, over dim 1 of a, b [B, T, D].

    Hillis-Steele doubling: ceil(log2 T) passes, each one fused multiply-add over the whole
    tensor, so a handful of large ops replaces T small ones (what pays under TorchScript and for
    small batches). Differentiable by autograd; TorchScript-compatible.
    """
    steps = a.shape[1]
    shift = 1
    while shift < steps:
        b = torch.cat([b[:, :shift], torch.addcmul(b[:, shift:], a[:, shift:], b[:, :-shift])], dim=1)
        a = torch.cat([a[:, :shift], a[:, shift:] * a[:, :-shift]], dim=1)
        shift *= 2
    return b


def linear_scan_log_depth(
    log_a: Tensor, b: Tensor, offsets: Optional[Tensor], initial_state: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """The log-depth PyTorch scan, same contract as :func:`linear_scan_pytorch`; TorchScript-ready.

    Packed [N, D] input is scanned as one sequence of N rows in which every sequence start gets
    a = 0 (the state restarts) and b + a * h0 (the initial state enters): no padding. Dense
    [B, T, D] input folds h0 into the first step the same way.
    """
    acc = compute_dtype(b.dtype)
    channels = b.shape[-1]
    if offsets is None:
        num_seq = b.shape[0]
    else:
        num_seq = offsets.shape[0] - 1
    if initial_state is None:
        h0 = torch.zeros(num_seq, channels, dtype=acc, device=b.device)
    else:
        h0 = initial_state.to(acc)
    a = log_a.to(acc).exp()
    x = b.to(acc)
    if offsets is None:
        if x.shape[1] == 0:
            return b.clone(), h0.clone()
        first = torch.addcmul(x[:, :1], a[:, :1], h0.unsqueeze(1))
        h = scan_log_depth(a, torch.cat([first, x[:, 1:]], dim=1))
        return h.to(b.dtype), h[:, -1]
    lengths = offsets[1:] - offsets[:-1]
    if x.shape[0] == 0:
        return b.clone(), h0.clone()
    nonempty = lengths > 0
    starts = offsets[:-1][nonempty]
    is_start = torch.zeros(x.shape[0], 1, dtype=acc, device=b.device)
    is_start[starts] = 1.0
    entry = torch.zeros_like(x)
    entry[starts] = a[starts] * h0[nonempty]
    h = scan_log_depth((a * (1.0 - is_start)).unsqueeze(0), (x + entry).unsqueeze(0)).squeeze(0)
    last_rows = (offsets[1:] - 1).clamp(min=0)
    final = torch.where(nonempty.unsqueeze(1), h[last_rows], h0)
    return h.to(b.dtype), final
