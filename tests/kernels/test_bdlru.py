"""The fused BD-LRU kernel against its PyTorch reference: output and every gradient."""

import pytest
import torch

from recblr_torchrec import KernelBackend
from recblr_torchrec.kernels.bdlru import bdlru
from recblr_torchrec.kernels.bdlru import launch as bdlru_launch
from recblr_torchrec.kernels.bdlru import tuning as bdlru_tuning


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(
        bdlru_launch,
        "_allocate",
        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device),
    )


def inputs(shape, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    channels = shape[-1]
    c = torch.randn(shape, generator=gen)
    gates = torch.randn(shape[:-1] + (2 * channels,), generator=gen) * 2
    z = torch.randn(shape, generator=gen)
    decay = torch.linspace(-2.2, -6.9, channels) + 0.3 * torch.randn(channels, generator=gen)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (c, gates, z)] + [
        decay.to(device).requires_grad_()
    ]


def compare(args, offsets, atol, rtol=1e-4):
    out = bdlru(*args, offsets=offsets, backend=KernelBackend.TRITON)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, args, grad_out)
    ref_args = [a.detach().double().requires_grad_() for a in args]
    ref = bdlru(*ref_args, offsets=offsets, backend=KernelBackend.PYTORCH)
    ref_grads = torch.autograd.grad(ref, ref_args, grad_out.double())
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    for name, got, want in zip(("c", "gate_logits", "z", "decay"), grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("steps", [1, 2, 3, 17, 63, 200])
def test_dense_matches_reference_at_odd_lengths(device, steps):
    compare(inputs((2, steps, 5), device), None, atol=2e-5)


@pytest.mark.parametrize("forward_tile, backward_tile", [((16, 32, 4), (8, 32, 2)), ((8, 16, 1), (16, 16, 4))])
def test_every_tile_boundary_with_different_tiles_forward_and_backward(
    device, monkeypatch, forward_tile, backward_tile
):
    # the defaults first; then the other way round: each direction's chunk must not assume the other's
    monkeypatch.setattr(bdlru_tuning, "_tile", lambda channels, backward: backward_tile if backward else forward_tile)
    chunks = {forward_tile[0], backward_tile[0]}
    lengths = sorted({n for chunk in chunks for n in (chunk - 1, chunk, chunk + 1, 2 * chunk)})  # 7..32
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    compare(inputs((sum(lengths), 40), device, seed=8), offsets, atol=2e-5)  # 40 channels: a partial block
    compare(inputs((2, lengths[-1], 5), device, seed=9), None, atol=2e-5)


def test_several_channel_blocks(device):
    compare(inputs((2, 20, 70), device, seed=4), None, atol=2e-5)


def test_packed_ragged_with_empty_sequences_matches_reference(device):
    lengths = [0, 3, 1, 0, 40, 2]
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    compare(inputs((sum(lengths), 6), device, seed=1), offsets, atol=2e-5)


def test_packed_equals_dense(device):
    args = inputs((3, 19, 4), device, seed=2)
    dense = bdlru(*args, backend=KernelBackend.TRITON)
    offsets = torch.arange(0, 58, 19, device=device)
    packed = bdlru(*[a.reshape(57, -1) for a in args[:3]], args[3], offsets=offsets, backend=KernelBackend.TRITON)
    torch.testing.assert_close(dense.reshape(57, 4), packed, atol=1e-6, rtol=0)


def test_z_views_whose_rows_are_not_evenly_strided_or_have_one_step(device):
    # [B, 1, D] time-major (rows stride(0) apart, which contiguous() leaves as is) and [B, T, D]
    # transposed from [B, D, T] (copied): both must read the right rows.
    c, gates, z, decay = inputs((3, 1, 5), device, seed=6)
    z_time_major = z.detach().reshape(1, 3, 5).permute(1, 0, 2).requires_grad_()
    assert z_time_major.stride() == (5, 15, 1)
    compare([c, gates, z_time_major, decay], None, atol=2e-5)
    c, gates, z, decay = inputs((2, 7, 5), device, seed=7)
    z_transposed = z.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    compare([c, gates, z_transposed, decay], None, atol=2e-5)


@pytest.mark.parametrize("shape, offsets", [((23, 6), [0, 9, 9, 23]), ((2, 11, 6), None)])
def test_z_read_through_its_row_stride(device, shape, offsets):
    # In the model z is the second half of the input projection's output: rows 2D apart.
    c, gates, z, decay = inputs(shape, device, seed=5)
    projection = torch.cat([torch.randn_like(z), z.detach()], dim=-1).requires_grad_()
    z_view = projection[..., shape[-1] :]
    assert not z_view.is_contiguous()
    offsets = None if offsets is None else torch.tensor(offsets, device=device)
    compare([c, gates, z_view, decay], offsets, atol=2e-5)


def test_bf16_inputs_accumulate_in_fp32(device):
    compare(inputs((2, 33, 8), device, dtype=torch.bfloat16, seed=3), None, atol=3e-2, rtol=3e-2)


def test_shape_errors_name_the_problem(device):
    c, gates, z, decay = inputs((2, 4, 3), device)
    with pytest.raises(ValueError, match=r"gate_logits must be \[..., 2D\]"):
        bdlru(c, gates[..., :3], z, decay)
    with pytest.raises(ValueError, match=r"decay_param must be \[D\]"):
        bdlru(c, gates, z, decay[:2])
    with pytest.raises(ValueError, match="packed"):
        bdlru(c, gates, z, decay, offsets=torch.tensor([0, 8], device=device))


def test_custom_op_passes_opcheck(device):
    offsets = torch.tensor([0, 4, 4, 11], device=device)
    packed = inputs((11, 8), device, seed=3)
    dense = inputs((2, 5, 8), device, seed=4)
    for args in [(*packed, offsets), (*dense, None)]:
        torch.library.opcheck(torch.ops.recblr_torchrec.bdlru.default, args)


def test_a_layer_using_the_fused_kernel_compiles_without_graph_breaks(device):
    torch._dynamo.reset()
    weight = torch.randn(8, 32, device=device, requires_grad=True)
    decay = torch.linspace(-2.2, -6.9, 8, device=device).requires_grad_()

    def layer(x, offsets):
        projected = x @ weight  # c, the gate logits and z from one projection
        c, gates, z = projected[:, :8], projected[:, 8:24], projected[:, 24:]
        return bdlru(c, gates, z, decay, offsets=offsets, backend=KernelBackend.TRITON).square().mean()

    on_gpu = device.type == "cuda"
    compiled = torch.compile(layer, fullgraph=True, backend="inductor" if on_gpu else "aot_eager")
    x = torch.randn(12, 8, device=device)
    offsets = torch.tensor([0, 5, 5, 12], device=device)
    eager_loss = layer(x, offsets)
    eager_grads = torch.autograd.grad(eager_loss, [weight, decay])
    compiled_loss = compiled(x, offsets)  # fullgraph=True: any graph break raises
    compiled_grads = torch.autograd.grad(compiled_loss, [weight, decay])
    torch.testing.assert_close(compiled_loss, eager_loss)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("segment", [3, 24])
def test_sequences_cut_into_segments_match_reference(device, monkeypatch, segment):
    # segments shorter than a tile, ragged against both directions' tiles, and spanning several tiles
    monkeypatch.setattr(bdlru_tuning, "_segment", lambda programs, longest, mean: segment)
    lengths = [0, 3, 1, 40, 17, 33]
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    compare(inputs((sum(lengths), 40), device, seed=5), offsets, atol=2e-5)  # 2 channel blocks, the second partial
    compare(inputs((2, 37, 5), device, seed=6), None, atol=2e-5)


def test_segments_only_where_the_programs_leave_the_gpu_idle():
    busy, least = bdlru_tuning.BUSY_PROGRAMS, bdlru_tuning.MIN_SEGMENT
    assert bdlru_tuning._segment(256 * 4, 2048, 2048) == 2048  # 256 x 2048 x 128: enough programs, whole sequences
    assert bdlru_tuning._segment(32 * 4, 8192, 8192) == 8192 // (busy // 128)  # 32 x 8192: 8 segments each
    assert bdlru_tuning._segment(4, 300, 300) == least  # never shorter than MIN_SEGMENT rows
    assert bdlru_tuning._segment(4, 4 * 200, 200) == 4 * 200  # short sequences stay whole
