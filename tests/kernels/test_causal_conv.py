"""The packed causal conv + SiLU: the recomputing reference against autograd, the Triton kernels
against the reference (output and every gradient, ragged lengths, strided input, bf16)."""

import pytest
import torch
import torch.nn.functional as F

from recblr_torchrec import KernelBackend
from recblr_torchrec.kernels.causal_conv import causal_conv_dense, causal_conv_packed, causal_conv_silu
from recblr_torchrec.kernels.causal_conv import triton as fused
from recblr_torchrec.kernels.causal_conv.pytorch import CausalConvSiLUPacked
from recblr_torchrec.kernels.linear_scan.pytorch import packed_positions


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(
        fused, "_allocate", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )


def packed(lengths, channels, device, dtype=torch.float32, width=4, seed=0, strided=False):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    positions = packed_positions(offsets, n)[1].to(device)
    # strided: x is the first D columns of a [N, 2D] projection, as in the model
    source = torch.randn(n, 2 * channels if strided else channels, generator=gen)
    x = source.to(device=device, dtype=dtype)[:, :channels].requires_grad_()
    weight = (0.5 * torch.randn(channels, 1, width, generator=gen)).to(device).requires_grad_()
    bias = (0.1 * torch.randn(channels, generator=gen)).to(device).requires_grad_()
    return x, weight, bias, positions


def reference(x, weight, bias, positions):
    """Plain autograd through the float64 reference conv."""
    args = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    return args, F.silu(causal_conv_packed(*args, positions))


def compare(x, weight, bias, positions, atol, rtol=1e-4):
    out = causal_conv_silu(x, weight, bias, positions, backend=KernelBackend.TRITON)
    assert out.dtype == x.dtype and out.shape == x.shape
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    grads = torch.autograd.grad(out, [x, weight, bias], grad)
    ref_args, ref = reference(x, weight, bias, positions)
    ref_grads = torch.autograd.grad(ref, ref_args, grad.double())
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    for name, got, want in zip(("x", "weight", "bias"), grads, ref_grads):
        assert got.dtype == {"x": x.dtype, "weight": weight.dtype, "bias": bias.dtype}[name]
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


def test_recomputing_reference_backward_matches_autograd():
    x, weight, bias, positions = packed([1, 2, 5, 3, 7], 6, "cpu", dtype=torch.float64)
    weight, bias = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    got = CausalConvSiLUPacked.apply(x, weight, bias, positions)
    want = F.silu(causal_conv_packed(x, weight, bias, positions))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    grad = torch.randn_like(got)
    for a, b in zip(
        torch.autograd.grad(got, [x, weight, bias], grad), torch.autograd.grad(want, [x, weight, bias], grad)
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda *t: CausalConvSiLUPacked.apply(*t, positions), (x, weight, bias))


@pytest.mark.parametrize("lengths", [[1], [3, 1, 2], [1, 2, 5, 3, 7, 0, 4], [40, 0, 33]])
def test_kernel_matches_reference_at_ragged_lengths(device, lengths):
    # lengths shorter than, equal to and longer than the taps; empty sequences; tiles that
    # straddle sequence boundaries (BLOCK_N = 64)
    compare(*packed(lengths, 5, device), atol=1e-5)


def test_strided_input_several_channel_blocks_and_width(device):
    compare(*packed([9, 30, 2], 70, device, width=3, seed=1, strided=True), atol=1e-5)


@pytest.mark.parametrize("width", [1, 4, 6])  # fewer taps than the registers hold, as many, more
def test_backward_programs_walk_several_tiles(device, monkeypatch, width):
    monkeypatch.setattr(fused, "_BLOCK_N", 16)
    monkeypatch.setattr(fused, "_DPRE_BLOCK_N", 16)
    monkeypatch.setattr(fused, "_DPRE_MAX_PROGRAMS", 2)  # 100 rows = 7 tiles over 2 programs
    compare(*packed([37, 1, 62], 4, device, width=width, seed=2), atol=1e-5)


def test_strided_positions(device):
    x, weight, bias, positions = packed([3, 4, 2], 4, device, seed=5)
    every_other = torch.stack([positions, torch.zeros_like(positions)], dim=1).reshape(-1)[::2]
    assert not every_other.is_contiguous()
    compare(x, weight, bias, every_other, atol=1e-5)


def test_bf16_input_keeps_its_dtype_and_tracks_the_reference(device):
    compare(*packed([6, 11], 8, device, dtype=torch.bfloat16, seed=3), atol=3e-2, rtol=3e-2)


def test_packed_rows_equal_the_dense_conv_per_sequence(device):
    x, weight, bias, positions = packed([4, 9], 6, device, seed=4)
    out = causal_conv_silu(x, weight, bias, positions, backend=KernelBackend.TRITON)
    for start, end in ((0, 4), (4, 13)):
        dense = F.silu(causal_conv_dense(x[start:end][None], weight, bias))[0]
        torch.testing.assert_close(out[start:end], dense, atol=1e-5, rtol=1e-5)


def test_no_rows_and_bad_shapes(device):
    x, weight, bias, positions = packed([0], 4, device)
    assert causal_conv_silu(x, weight, bias, positions, backend=KernelBackend.TRITON).shape == (0, 4)
    x, weight, bias, positions = packed([3], 4, device)
    with pytest.raises(ValueError, match=r"x must be \[N, D\] and weight \[D, 1, k\]"):
        causal_conv_silu(x[None], weight, bias, positions)
    with pytest.raises(ValueError, match=r"positions must be \[N\] = \[3\]"):
        causal_conv_silu(x, weight, bias, positions[:2])
