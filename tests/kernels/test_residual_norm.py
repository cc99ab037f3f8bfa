"""LayerNorm(Dropout(branch) + residual): the Triton kernels against the float64 reference with the
same dropout mask (output and every gradient), the mask's rate, its replay from torch's seed, and (GPU)
new masks at every replay of a captured CUDA graph."""

import pytest
import torch
import torch.nn.functional as F

from recblr_torchrec import KernelBackend
from recblr_torchrec.kernels.residual_norm import dropout_add_layer_norm
from recblr_torchrec.kernels.residual_norm import triton as fused


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(
        fused, "_allocate", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )


def inputs(shape, device, dtype=torch.float32, residual=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = shape[-1]
    branch = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    res = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_() if residual else None
    weight = (1 + 0.3 * torch.randn(width, generator=gen)).to(device).requires_grad_()
    bias = (0.1 * torch.randn(width, generator=gen)).to(device).requires_grad_()
    return branch, res, weight, bias


def compare(shape, device, p=0.0, dtype=torch.float32, residual=True, atol=1e-4, rtol=1e-4, eps=1e-12):
    branch, res, weight, bias = inputs(shape, device, dtype, residual)
    torch.manual_seed(11)
    out = dropout_add_layer_norm(branch, res, weight, bias, p, p > 0, eps, backend=KernelBackend.TRITON)
    assert out.shape == branch.shape and out.dtype == dtype  # as F.layer_norm outside autocast
    leaves = [t for t in (branch, res, weight, bias) if t is not None]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    grads = torch.autograd.grad(out, leaves, grad)
    # the reference, in float64, with the mask the kernel drew from the same torch seed
    torch.manual_seed(11)
    seed = fused.draw_seed(branch.device) if p > 0 else 0
    width = shape[-1]
    keep = fused.dropout_keep_mask(seed, branch.numel() // width, width, p, branch.device).reshape(shape)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_branch, ref_res = ref_leaves[0], ref_leaves[1] if residual else None
    mixed = torch.where(keep, ref_branch / (1 - p), 0.0) if p > 0 else ref_branch
    if ref_res is not None:
        mixed = mixed + ref_res
    ref = F.layer_norm(mixed, (width,), ref_leaves[-2], ref_leaves[-1], eps)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    for i, (got, want) in enumerate(zip(grads, ref_grads)):
        assert got.dtype == leaves[i].dtype and not torch.isnan(got).any()
        torch.testing.assert_close(got.double(), want, atol=atol * 10, rtol=1e-3, msg=lambda m, i=i: f"grad {i}: {m}")


@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (130, 64), (3, 5, 24)])
def test_kernel_matches_the_reference_without_dropout(shape, device):
    compare(shape, device)


@pytest.mark.parametrize("shape", [(70, 64), (2, 9, 40)])
def test_kernel_matches_the_reference_with_the_same_dropout_mask(shape, device):
    compare(shape, device, p=0.3)


def test_no_residual_and_bf16_inputs(device):
    compare((33, 64), device, p=0.2, residual=False)
    compare((33, 64), device, p=0.2, dtype=torch.bfloat16, atol=2e-2, rtol=1e-2)  # bf16 output


def test_backward_programs_walk_several_tiles(device, monkeypatch):
    monkeypatch.setattr(fused, "_MAX_PROGRAMS", 2)  # 5 tiles of 64 rows over 2 programs
    compare((300, 64), device, p=0.1)


def test_mask_keeps_one_minus_p_and_replays_from_torch_seed(device):
    first = fused.dropout_keep_mask(5, 128, 64, 0.25, device)
    assert torch.equal(first, fused.dropout_keep_mask(5, 128, 64, 0.25, device))
    assert not torch.equal(first, fused.dropout_keep_mask(6, 128, 64, 0.25, device))
    assert abs(first.float().mean().item() - 0.75) < 0.02  # 8,192 draws: 4 standard deviations
    branch, res, weight, bias = inputs((16, 64), device)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(dropout_add_layer_norm(branch, res, weight, bias, 0.5, True, backend=KernelBackend.TRITON))
    assert torch.equal(outs[0], outs[1])
    evaluated = dropout_add_layer_norm(branch, res, weight, bias, 0.5, False, backend=KernelBackend.TRITON)
    torch.testing.assert_close(evaluated, F.layer_norm(branch + res, (64,), weight, bias, 1e-5), atol=1e-5, rtol=1e-5)


def test_bad_shapes_and_rates_are_named(device):
    branch, res, weight, bias = inputs((4, 8), device)
    with pytest.raises(ValueError, match=r"residual \(4, 7\) must have the branch's shape \(4, 8\)"):
        dropout_add_layer_norm(branch, res[:, :7], weight, bias)
    with pytest.raises(ValueError, match=r"weight and bias must be \[d\] = \[8\]"):
        dropout_add_layer_norm(branch, res, weight[:4], bias)
    with pytest.raises(ValueError, match="dropout p=1.0 must be in"):
        dropout_add_layer_norm(branch, res, weight, bias, p=1.0)


def test_traced_and_compiled_graphs_get_the_reference(monkeypatch, device):
    def refuse(*args):
        raise AssertionError("the Triton path ran inside a traced graph")

    monkeypatch.setattr(fused, "dropout_add_layer_norm_triton", refuse)
    branch, res, weight, bias = (t.detach() for t in inputs((6, 8), device))

    def norm(branch, res):
        return dropout_add_layer_norm(branch, res, weight, bias, 0.1, False, 1e-5, backend=KernelBackend.TRITON)

    want = F.layer_norm(branch + res, (8,), weight, bias, 1e-5)
    torch.testing.assert_close(torch.jit.trace(norm, (branch, res), check_trace=False)(branch, res), want)
    torch.testing.assert_close(torch.compile(norm, backend="eager", fullgraph=True)(branch, res), want)
    with pytest.raises(AssertionError, match="inside a traced graph"):
        norm(branch, res)  # eagerly the kernel is taken


def test_dropout_hits_the_branch_only_and_the_dtype_follows_layer_norm(device):
    branch, res, weight, bias = inputs((40, 64), device)
    zeros = torch.zeros_like(branch)
    out = dropout_add_layer_norm(zeros, res, weight, bias, 0.5, True, 1e-5, backend=KernelBackend.TRITON)
    torch.testing.assert_close(out, F.layer_norm(res, (64,), weight, bias, 1e-5), atol=1e-5, rtol=1e-5)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        want = F.layer_norm(branch.bfloat16() + res, (64,), weight, bias, 1e-5).dtype
        got = dropout_add_layer_norm(branch.bfloat16(), res, weight, bias, backend=KernelBackend.TRITON).dtype
    assert got == want


def test_empty_input_and_double_backward(device):
    branch, res, weight, bias = inputs((0, 64), device)
    out = dropout_add_layer_norm(branch, res, weight, bias, 0.3, True, backend=KernelBackend.TRITON)
    grads = torch.autograd.grad(out.sum(), [branch, res, weight, bias])
    assert [tuple(g.shape) for g in grads] == [(0, 64), (0, 64), (64,), (64,)]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[2:])
    branch, res, weight, bias = inputs((5, 64), device)
    out = dropout_add_layer_norm(branch, res, weight, bias, backend=KernelBackend.TRITON)
    (grad,) = torch.autograd.grad(out.square().sum(), [branch], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with @once_differentiable"):
        grad.sum().backward()  # an error, not silently graph-less second derivatives


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the H200)")
def test_a_captured_graph_draws_a_new_mask_at_every_replay(device):
    branch, res, weight, bias = (t.detach() for t in inputs((64, 64), device))

    def norm():
        return dropout_add_layer_norm(branch, res, weight, bias, 0.5, True, backend=KernelBackend.TRITON)

    side = torch.cuda.Stream()  # warm-up (compilation) outside the capture, as CUDA graphs require
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        norm()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = norm()
    outs = []
    for _ in range(3):
        graph.replay()
        outs.append(out.clone())
    # a seed frozen into the graph (a Python int) would drop the same elements at every replay
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    assert all(torch.isfinite(o).all() for o in outs)
