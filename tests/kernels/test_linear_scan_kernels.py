"""The Triton linear scan against the float64 sequential reference: h, final state, all gradients.

Runs on the GPU when there is one, else on CPU through TRITON_INTERPRET=1 (conftest.py), where
the chunk is 16 steps so that the test lengths cross several chained tiles. Every kernel output
buffer starts as NaN (conftest.py).
"""

from typing import Dict, List, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from recblr_torchrec import KernelBackend, linear_scan
from recblr_torchrec.kernels.linear_scan import launch as scan_launch
from recblr_torchrec.kernels.linear_scan import pytorch as scan_reference
from recblr_torchrec.kernels.linear_scan import tuning as scan_tuning

from .conftest import DEVICE

ON_GPU = DEVICE.type == "cuda"
FP32_TOL = 2e-5
BF16_TOL = 3e-2


def offsets_of(lengths: List[int], device: torch.device) -> Tensor:
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return offsets.to(device)


def random_inputs(shape, num_seq: int, dtype: torch.dtype, device: torch.device, seed: int):
    """log_a in [-0.6, 0] (some exactly 0: a = 1), b and h0 standard normal."""
    gen = torch.Generator().manual_seed(seed)
    log_a = -0.6 * torch.rand(shape, generator=gen)
    log_a[torch.rand(shape, generator=gen) < 0.05] = 0.0
    b = torch.randn(shape, generator=gen)
    h0 = torch.randn(num_seq, shape[-1], generator=gen)
    return log_a.to(device, dtype), b.to(device, dtype), h0.to(device)


def scan_with_grads(
    backend: KernelBackend,
    log_a: Tensor,
    b: Tensor,
    offsets: Optional[Tensor],
    h0: Optional[Tensor],
    grad_h: Tensor,
    grad_final: Optional[Tensor],
    dtype: Optional[torch.dtype] = None,
) -> Dict[str, Tensor]:
    """h, final state and the gradients of <h, grad_h> + <final, grad_final>, in ``dtype`` if given."""
    inputs = [log_a, b] + ([] if h0 is None else [h0])
    leaves = [(x if dtype is None else x.to(dtype)).detach().requires_grad_() for x in inputs]
    h, final = linear_scan(
        leaves[0],
        leaves[1],
        offsets,
        leaves[2] if h0 is not None else None,
        output_final_state=True,
        backend=backend,
    )
    loss = (h * grad_h.to(h.dtype)).sum()
    if grad_final is not None:
        loss = loss + (final * grad_final.to(final.dtype)).sum()
    grads = torch.autograd.grad(loss, leaves)
    out = {"h": h, "final": final, "grad_log_a": grads[0], "grad_b": grads[1]}
    if h0 is not None:
        out["grad_h0"] = grads[2]
    return out


def check_against_reference(
    log_a: Tensor,
    b: Tensor,
    offsets: Optional[Tensor],
    h0: Optional[Tensor],
    tol: float,
    with_final_grad: bool = True,
) -> Dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1234)
    grad_h = torch.randn(b.shape, generator=gen).to(b.device)
    num_seq = b.shape[0] if offsets is None else offsets.numel() - 1
    grad_final = torch.randn(num_seq, b.shape[-1], generator=gen).to(b.device) if with_final_grad else None
    got = scan_with_grads(KernelBackend.TRITON, log_a, b, offsets, h0, grad_h, grad_final)
    want = scan_with_grads(KernelBackend.PYTORCH, log_a, b, offsets, h0, grad_h, grad_final, torch.float64)
    assert got["h"].dtype == b.dtype and got["final"].dtype == torch.float32
    for name, expected in want.items():
        assert_relative_close(got[name], expected, tol, name)
    return got


def assert_relative_close(actual: Tensor, expected: Tensor, tol: float, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert bool(torch.isfinite(actual).all()), f"{name} has NaN or inf (an unwritten element?)"
    if expected.numel() == 0:
        return
    error = float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
    assert error < tol, f"{name}: relative error {error:.2e} exceeds {tol:.0e}"


@pytest.mark.parametrize("steps", [1, 2, 3, 17, 63, 200])
def test_dense_scan_matches_reference_at_any_length(steps: int, device: torch.device) -> None:
    log_a, b, h0 = random_inputs((3, steps, 5), 3, torch.float32, device, seed=steps)
    check_against_reference(log_a, b, None, h0, FP32_TOL)


def test_ragged_packed_batch_with_empty_sequences_matches_reference(device: torch.device) -> None:
    lengths = [0, 1, 2, 3, 17, 0, 63, 40, 0]
    offsets = offsets_of(lengths, device)
    log_a, b, h0 = random_inputs((sum(lengths), 6), len(lengths), torch.float32, device, seed=7)
    got = check_against_reference(log_a, b, offsets, h0, FP32_TOL)
    empty = torch.tensor(lengths) == 0
    # An empty sequence's final state is its initial state.
    torch.testing.assert_close(got["final"][empty.to(device)], h0[empty.to(device)])


def test_dense_and_packed_layouts_give_the_same_result(device: torch.device) -> None:
    log_a, b, h0 = random_inputs((4, 37, 5), 4, torch.float32, device, seed=3)
    grad_h = torch.randn(4, 37, 5).to(device)
    grad_final = torch.randn(4, 5).to(device)
    dense = scan_with_grads(KernelBackend.TRITON, log_a, b, None, h0, grad_h, grad_final)
    offsets = offsets_of([37] * 4, device)
    packed = scan_with_grads(
        KernelBackend.TRITON,
        log_a.reshape(-1, 5),
        b.reshape(-1, 5),
        offsets,
        h0,
        grad_h.reshape(-1, 5),
        grad_final,
    )
    for name in dense:
        torch.testing.assert_close(packed[name].reshape(dense[name].shape), dense[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_bfloat16_inputs_match_reference_within_bfloat16_rounding(packed: bool, device: torch.device) -> None:
    lengths = [63, 0, 17, 40]
    offsets = offsets_of(lengths, device) if packed else None
    shape = (sum(lengths), 8) if packed else (3, 63, 8)
    log_a, b, h0 = random_inputs(shape, len(lengths) if packed else 3, torch.bfloat16, device, seed=11)
    check_against_reference(log_a, b, offsets, h0, BF16_TOL)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_scan_without_initial_state_or_final_state_gradient(packed: bool, device: torch.device) -> None:
    lengths = [5, 0, 33]
    offsets = offsets_of(lengths, device) if packed else None
    shape = (sum(lengths), 4) if packed else (2, 33, 4)
    log_a, b, _ = random_inputs(shape, 3, torch.float32, device, seed=5)
    check_against_reference(log_a, b, offsets, None, FP32_TOL, with_final_grad=False)


TILE_CONFIGS = [
    scan_tuning.ScanConfig(chunk=1, block_d=1, num_warps=1),
    scan_tuning.ScanConfig(chunk=2, block_d=4, num_warps=1, lookback=4),
    scan_tuning.ScanConfig(chunk=4, block_d=2, num_warps=2, lookback=2, dynamic_order=True),
    scan_tuning.ScanConfig(chunk=32, block_d=8, num_warps=4),
    scan_tuning.ScanConfig(chunk=4, block_d=8, num_warps=1, lookback=16),
]


def scan_with_config(log_a, b, offsets, h0, grad_h, grad_final, config):
    h, final = scan_launch.scan_forward(log_a, b, offsets, h0, config)
    grads = scan_launch.scan_backward(grad_h, grad_final, log_a, h, offsets, h0, config)
    return dict(zip(["h", "final", "grad_log_a", "grad_b", "grad_h0"], (h, final) + grads))


@pytest.mark.parametrize("config", TILE_CONFIGS, ids=lambda c: f"c{c.chunk}d{c.block_d}l{c.lookback}")
def test_every_tile_shape_and_schedule_computes_the_same_scan(
    config: scan_tuning.ScanConfig, device: torch.device
) -> None:
    lengths = [9, 0, 1, 30]
    offsets = offsets_of(lengths, device)
    log_a, b, h0 = random_inputs((sum(lengths), 6), len(lengths), torch.float32, device, seed=config.chunk)
    grad_h = torch.randn(sum(lengths), 6).to(device)
    grad_final = torch.randn(len(lengths), 6).to(device)
    got = scan_with_config(log_a, b, offsets, h0, grad_h, grad_final, config)
    want = scan_with_grads(KernelBackend.PYTORCH, log_a, b, offsets, h0, grad_h, grad_final, torch.float64)
    for name in want:
        assert_relative_close(got[name], want[name], FP32_TOL, name)


def test_results_are_bitwise_deterministic(device: torch.device) -> None:
    lengths = [50, 3, 0, 77]
    offsets = offsets_of(lengths, device)
    log_a, b, h0 = random_inputs((sum(lengths), 5), len(lengths), torch.float32, device, seed=2)
    grad_h = torch.randn(sum(lengths), 5).to(device)
    runs = [scan_with_grads(KernelBackend.TRITON, log_a, b, offsets, h0, grad_h, None) for _ in range(2)]
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), f"{name} differs between two identical calls"


LONG_CONFIGS = [
    None,
    scan_tuning.ScanConfig(chunk=64, block_d=32, num_warps=4, lookback=1),
    scan_tuning.ScanConfig(chunk=16, block_d=128, num_warps=1, lookback=8),
]


@pytest.mark.parametrize("config", LONG_CONFIGS, ids=["default", "plain_chain", "lookback8"])
def test_long_sequences_chain_many_tiles_without_races(
    config: Optional[scan_tuning.ScanConfig], device: torch.device
) -> None:
    # GPU: the benchmark's long shape (hundreds of tiles per chain); CPU interpreter: 13 tiles.
    batch, steps, channels = (2, 8192, 128) if ON_GPU else (1, 200, 3)
    log_a, b, h0 = random_inputs((batch, steps, channels), batch, torch.float32, device, seed=17)
    grad_h = torch.randn(batch, steps, channels).to(device)
    grad_final = torch.randn(batch, channels).to(device)
    want = scan_with_grads(KernelBackend.PYTORCH, log_a, b, None, h0, grad_h, grad_final, torch.float64)
    runs = [scan_with_config(log_a, b, None, h0, grad_h, grad_final, config) for _ in range(3)]
    for name in want:
        assert_relative_close(runs[0][name], want[name], FP32_TOL, name)
        # A state read before it was fully written would make repeated runs differ.
        assert torch.equal(runs[0][name], runs[1][name]) and torch.equal(runs[0][name], runs[2][name]), name


@settings(max_examples=8 if not ON_GPU else 15, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=5),
    channels=st.integers(min_value=1, max_value=9),
    with_h0=st.booleans(),
)
def test_random_ragged_batches_match_reference(lengths: List[int], channels: int, with_h0: bool) -> None:
    offsets = offsets_of(lengths, DEVICE)
    log_a, b, h0 = random_inputs((sum(lengths), channels), len(lengths), torch.float32, DEVICE, seed=len(lengths))
    check_against_reference(log_a, b, offsets, h0 if with_h0 else None, FP32_TOL)


# Errors: each names the bad value and the fix.


def test_rejects_mismatched_shapes(device: torch.device) -> None:
    with pytest.raises(ValueError, match="same shape"):
        linear_scan(torch.zeros(2, 3, 4, device=device), torch.zeros(2, 3, 5, device=device))


def test_rejects_integer_inputs(device: torch.device) -> None:
    with pytest.raises(TypeError, match="pass float32"):
        linear_scan(torch.zeros(2, 3, 4, device=device, dtype=torch.int32), torch.zeros(2, 3, 4, device=device))


def test_triton_backend_rejects_float64_with_the_alternative(device: torch.device) -> None:
    x = torch.zeros(2, 3, 4, device=device, dtype=torch.float64)
    with pytest.raises(TypeError, match="KernelBackend.PYTORCH"):
        linear_scan(x, x)


def test_rejects_inputs_on_two_devices() -> None:
    with pytest.raises(ValueError, match="one device"):
        linear_scan(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, device="meta"))


def test_triton_backend_on_cpu_without_interpreter_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        linear_scan(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    # a graph traced off the GPU can only hold the reference: it gets it instead of a Triton crash
    log_a, b = -torch.rand(2, 3, 4), torch.randn(2, 3, 4)
    want = linear_scan(log_a, b, backend=KernelBackend.PYTORCH)[0]
    fn = lambda x, y: linear_scan(x, y, backend=KernelBackend.TRITON)[0]  # noqa: E731
    traced = torch.jit.trace(fn, (log_a, b), check_trace=False)  # its check reruns fn eagerly
    torch.testing.assert_close(traced(log_a, b), want)


def test_rejects_non_monotone_offsets(device: torch.device) -> None:
    x = torch.zeros(6, 4, device=device)
    with pytest.raises(ValueError, match=r"non-decreasing: offsets\[1\]=4 > offsets\[2\]=2"):
        linear_scan(x, x, offsets=torch.tensor([0, 4, 2, 6], device=device))


def test_rejects_offsets_that_do_not_cover_the_rows(device: torch.device) -> None:
    x = torch.zeros(6, 4, device=device)
    with pytest.raises(ValueError, match="end at N=6, got 0 and 5"):
        linear_scan(x, x, offsets=torch.tensor([0, 2, 5], device=device))


def test_rejects_float_offsets_and_wrong_initial_state(device: torch.device) -> None:
    x = torch.zeros(6, 4, device=device)
    with pytest.raises(TypeError, match="int64"):
        linear_scan(x, x, offsets=torch.tensor([0.0, 6.0], device=device))
    with pytest.raises(ValueError, match=r"initial_state must be \(2, 4\)"):
        linear_scan(
            x,
            x,
            offsets=torch.tensor([0, 2, 6], device=device),
            initial_state=torch.zeros(3, 4, device=device),
        )


def test_rejects_dense_input_of_wrong_rank(device: torch.device) -> None:
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        linear_scan(torch.zeros(6, 4, device=device), torch.zeros(6, 4, device=device))


# The log-depth PyTorch reference.


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_log_depth_reference_matches_sequential_reference(packed: bool) -> None:
    lengths = [0, 5, 17, 0, 33, 1]
    offsets = offsets_of(lengths, torch.device("cpu")) if packed else None
    shape = (sum(lengths), 5) if packed else (3, 37, 5)
    log_a, b, h0 = random_inputs(shape, len(lengths) if packed else 3, torch.float64, torch.device("cpu"), seed=9)
    results = []
    for scan in (scan_reference.linear_scan_pytorch, scan_reference.linear_scan_log_depth):
        leaves = [x.clone().requires_grad_() for x in (log_a, b, h0)]
        h, final = scan(leaves[0], leaves[1], offsets, leaves[2])
        grads = torch.autograd.grad(h.sin().sum() + final.cos().sum(), leaves)
        results.append((h, final) + grads)
    for sequential, log_depth in zip(*results):
        torch.testing.assert_close(log_depth, sequential, rtol=1e-10, atol=1e-10)


def test_log_depth_reference_runs_under_torchscript() -> None:
    scripted = torch.jit.script(scan_reference.linear_scan_log_depth)
    log_a, b, h0 = random_inputs((2, 9, 3), 2, torch.float32, torch.device("cpu"), seed=4)
    h, final = scripted(log_a, b, None, h0)
    want_h, want_final = scan_reference.linear_scan_pytorch(log_a, b, None, h0)
    torch.testing.assert_close(h, want_h)
    torch.testing.assert_close(final, want_final)


# Registration as a custom op.


def test_custom_op_passes_opcheck(device: torch.device) -> None:
    lengths = [4, 0, 7]
    offsets = offsets_of(lengths, device)
    log_a, b, h0 = random_inputs((sum(lengths), 3), len(lengths), torch.float32, device, seed=8)
    for args in [(log_a, b, offsets, h0), (log_a.reshape(1, -1, 3), b.reshape(1, -1, 3), None, None)]:
        args = tuple(x if x is None or not x.is_floating_point() else x.requires_grad_() for x in args)
        torch.library.opcheck(torch.ops.recblr_torchrec.linear_scan.default, args)


def test_model_using_the_scan_compiles_without_graph_breaks(device: torch.device) -> None:
    torch._dynamo.reset()
    weight = torch.randn(4, 8, device=device, requires_grad=True)

    def model(x: Tensor, offsets: Tensor) -> Tensor:
        gates = x @ weight
        log_a = -torch.nn.functional.softplus(gates[:, :4])
        h, final = linear_scan(log_a, gates[:, 4:], offsets=offsets, output_final_state=True)
        return h.square().mean() + final.sum()

    compiled = torch.compile(model, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    x = torch.randn(12, 4, device=device)
    offsets = offsets_of([5, 0, 7], device)
    eager_loss = model(x, offsets)
    (eager_grad,) = torch.autograd.grad(eager_loss, weight)
    compiled_loss = compiled(x, offsets)  # fullgraph=True: any graph break raises
    (compiled_grad,) = torch.autograd.grad(compiled_loss, weight)
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad)
