"""The softmax cross-entropy over candidates: the Triton kernels (per-row loss and both gradients)
against a dense float64 computation, for the full softmax's and sampled softmax's column biases,
rows without a target, label smoothing, a first tile of excluded columns and ragged tile edges;
and the chunked reference against the same dense computation."""

import pytest
import torch

from recblr_torchrec import KernelBackend
from recblr_torchrec.kernels.softmax_ce import softmax_cross_entropy
from recblr_torchrec.kernels.softmax_ce import triton as softmax_triton

NEG_INF = float("-inf")


def dense(hidden, candidates, bias, targets, smoothing):
    """Per-row loss from the whole [M, C] logits, in float64."""
    logits = hidden.double() @ candidates.double().T + bias.double()
    lse = torch.logsumexp(logits, dim=1)
    picked = logits.gather(1, targets.clamp(min=0)[:, None])[:, 0].masked_fill(targets < 0, 0.0)
    real = bias > NEG_INF
    mean = torch.where(real, logits, 0.0).sum(dim=1) / real.sum()
    return lse - (1 - smoothing) * picked - smoothing * mean


def case(rows, columns, width, kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=gen)
    candidates = torch.randn(columns, width, generator=gen)
    if kind == "full":  # the padding column out
        bias = torch.zeros(columns)
        bias[0] = NEG_INF
        targets = torch.randint(1, columns, (rows,), generator=gen)
    else:  # sampled: 70 leading padding columns (a whole first tile excluded), -log Q elsewhere
        bias = -torch.rand(columns, generator=gen) * 3
        bias[:70] = NEG_INF
        targets = torch.randint(70, columns, (rows,), generator=gen)
    targets[::5] = -1  # rows without a target
    return hidden, candidates, bias, targets


def check(backend, device, rows, columns, width, kind, smoothing, dtype=torch.float32, tol=1e-4):
    hidden, candidates, bias, targets = case(rows, columns, width, kind)
    h = hidden.to(device, dtype).requires_grad_()
    c = candidates.to(device, dtype).requires_grad_()
    loss = softmax_cross_entropy(h, c, bias.to(device), targets.to(device), smoothing, chunk=48, backend=backend)
    assert loss.shape == (rows,) and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    grad = torch.randn(rows, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(loss, (h, c), grad.to(device))
    ref_h, ref_c = h.detach().double().cpu().requires_grad_(), c.detach().double().cpu().requires_grad_()
    want_loss = dense(ref_h, ref_c, bias, targets, smoothing)
    want = torch.autograd.grad(want_loss, (ref_h, ref_c), grad.double())
    torch.testing.assert_close(loss.double().cpu(), want_loss, atol=tol, rtol=tol)
    for name, a, b in zip(("hidden", "candidates"), got, want):
        assert a.dtype == dtype and torch.isfinite(a).all()
        torch.testing.assert_close(a.double().cpu(), b, atol=tol * 10, rtol=tol * 10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("kind", ["full", "sampled"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("rows, columns, width", [(130, 150, 24), (9, 300, 64)])
def test_kernel_matches_the_dense_loss(kind, smoothing, rows, columns, width, device):
    check(KernelBackend.TRITON, device, rows, columns, width, kind, smoothing)


@pytest.mark.parametrize("kind", ["full", "sampled"])
def test_candidate_gradient_split_over_row_parts_matches_the_dense_loss(kind, device, monkeypatch):
    """dc summed from per-split partials (few candidate blocks, many rows) equals the unsplit one."""
    monkeypatch.setattr(softmax_triton, "ROW_TILES_PER_SPLIT", 1)
    monkeypatch.setattr(softmax_triton, "PROGRAMS_PER_SM", 1000)
    assert softmax_triton._row_splits(2, 5, torch.device(device)) == 5
    check(KernelBackend.TRITON, device, 300, 150, 24, kind, 0.2)  # 5 row tiles in 5 parts, the last ragged
    check(KernelBackend.TRITON, device, 300, 150, 24, kind, 0.0, dtype=torch.bfloat16, tol=2e-2)


def test_kernel_in_bfloat16_matches_the_dense_loss_of_its_rounded_inputs(device):
    check(KernelBackend.TRITON, device, 70, 200, 64, "sampled", 0.0, dtype=torch.bfloat16, tol=2e-2)


@pytest.mark.parametrize("kind", ["full", "sampled"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_chunked_reference_matches_the_dense_loss(kind, smoothing):
    check(KernelBackend.PYTORCH, torch.device("cpu"), 130, 150, 24, kind, smoothing, dtype=torch.float64, tol=1e-9)


def test_bad_shapes_and_smoothing_are_refused_by_name():
    hidden, candidates, bias, targets = case(4, 80, 8, "full")
    with pytest.raises(ValueError, match="share d"):
        softmax_cross_entropy(hidden, candidates[:, :4], bias, targets)
    with pytest.raises(ValueError, match=r"bias must be \[C\] = \[80\]"):
        softmax_cross_entropy(hidden, candidates, bias[:3], targets)
    with pytest.raises(ValueError, match="label smoothing 1.0"):
        softmax_cross_entropy(hidden, candidates, bias, targets, smoothing=1.0)


def test_auto_leaves_full_float32_products_to_cublas(monkeypatch):
    from recblr_torchrec.kernels import softmax_ce

    monkeypatch.setattr(softmax_ce, "implementation", lambda *args: KernelBackend.TRITON)  # as on a GPU
    h32, c32 = torch.zeros(4, 8), torch.zeros(6, 8)
    h16, c16 = h32.bfloat16(), c32.bfloat16()
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert not softmax_ce._kernel_fits(h32, c32, KernelBackend.AUTO)  # FMA dots: the reference's SGEMM
        assert softmax_ce._kernel_fits(h32, c32, KernelBackend.TRITON)  # asked for by name
        assert softmax_ce._kernel_fits(h16, c16, KernelBackend.AUTO)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert softmax_ce._kernel_fits(h32, c32, KernelBackend.AUTO)
        torch.backends.cuda.matmul.allow_tf32 = True
        assert softmax_ce._kernel_fits(h32, c32, KernelBackend.AUTO)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
