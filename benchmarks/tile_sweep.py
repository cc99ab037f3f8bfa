"""Tile sweep of the fused BD-LRU and the causal conv + SiLU kernels on the GPU.

For each shape ([B, T] = [2048, 200] and [256, 2048], D = 128, fp32, packed), times forward and
forward+backward (``triton.testing.do_bench``, median ms) of
  bdlru  - every (CHUNK, BLOCK_D) in {16, 32, 64} x {16, 32, 64, 128}, the same tile both ways;
  conv   - every (forward and dx BLOCK_N, first backward pass's programs) in {16, 32, 64} x
           {512, 1024, 4096};
by overriding the kernels' tile choice for the run. ``--directions`` instead times the BD-LRU's
forward and backward kernels apart over (CHUNK, BLOCK_D, num_warps) in {8, 16} x {16, 32} x
{1, 2, 4}, fp32 and bf16. ``--conv-dpre`` times the conv's backward (both passes and the partial
sums) in bf16 at [2048, 200], [256, 2048] and [32, 8192] over the first pass's (rows, channels)
tile and program count in {[16, 128], [32, 64], [64, 64]} x {1024, 2048}. The defaults in
``kernels/bdlru/tuning.py`` (``_tile``) and ``kernels/causal_conv/triton.py`` (``_BLOCK_N``,
``_DPRE_BLOCK_N``, ``_DPRE_MAX_BLOCK_D``, ``_DPRE_MAX_PROGRAMS``) come from these sweeps.

Usage (GPU): python benchmarks/tile_sweep.py [--directions | --conv-dpre] --out tiles.json
"""

import argparse
import contextlib
import itertools
import json
from typing import Dict, List, Optional

import torch

from recblr_torchrec import KernelBackend
from recblr_torchrec.kernels.bdlru import bdlru
from recblr_torchrec.kernels.bdlru import launch as bdlru_launch
from recblr_torchrec.kernels.bdlru import tuning as bdlru_tuning
from recblr_torchrec.kernels.causal_conv import causal_conv_silu
from recblr_torchrec.kernels.causal_conv import triton as conv
from recblr_torchrec.kernels.linear_scan.pytorch import packed_positions

SHAPES = [(2048, 200), (256, 2048)]
LONG_SHAPES = [*SHAPES, (32, 8192)]  # --conv-dpre's


@contextlib.contextmanager
def forced_tile(chunk: int, block_d: int, warps: int):
    """Inside, both BD-LRU kernels launch with this (CHUNK, BLOCK_D, num_warps) instead of ``_tile``'s."""
    default = bdlru_tuning._tile
    bdlru_tuning._tile = lambda _channels, _backward: (chunk, block_d, warps)
    try:
        yield
    finally:
        bdlru_tuning._tile = default


def timed(forward, inputs: List[torch.Tensor], grad: torch.Tensor) -> Dict[str, float]:
    from triton.testing import do_bench

    detached = [t.detach() for t in inputs]
    return {
        "fwd_ms": do_bench(lambda: forward(*detached), warmup=10, rep=50),
        "fwd_bwd_ms": do_bench(lambda: torch.autograd.grad(forward(*inputs), inputs, grad), warmup=10, rep=50),
    }


def sweep(batch: int, steps: int, channels: int = 128) -> List[Dict]:
    device, n = torch.device("cuda"), batch * steps
    offsets = torch.arange(batch + 1, device=device) * steps
    grad = torch.randn(n, channels, device=device)
    rows = []
    c, z = (torch.randn(n, channels, device=device, requires_grad=True) for _ in range(2))
    gates = torch.randn(n, 2 * channels, device=device, requires_grad=True)
    decay = torch.linspace(-2.2, -6.9, channels, device=device).requires_grad_()
    for chunk, block_d in itertools.product((16, 32, 64), (16, 32, 64, 128)):
        with forced_tile(chunk, block_d, 4):
            run = timed(lambda *t: bdlru(*t, offsets=offsets, backend=KernelBackend.TRITON), [c, gates, z, decay], grad)
        rows.append({"kernel": "bdlru", "batch": batch, "length": steps, "chunk": chunk, "block_d": block_d, **run})
        print(json.dumps(rows[-1]), flush=True)
    x, weight, bias, positions = conv_inputs(batch, steps, channels, torch.float32)
    defaults = conv._BLOCK_N, conv._DPRE_MAX_PROGRAMS
    try:
        for block_n, programs in itertools.product((16, 32, 64), (512, 1024, 4096)):
            conv._BLOCK_N, conv._DPRE_MAX_PROGRAMS = block_n, programs
            run = timed(
                lambda *t: causal_conv_silu(*t, positions, backend=KernelBackend.TRITON), [x, weight, bias], grad
            )
            rows.append(
                {"kernel": "conv", "batch": batch, "length": steps, "block_n": block_n, "programs": programs, **run}
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        conv._BLOCK_N, conv._DPRE_MAX_PROGRAMS = defaults
    return rows


def conv_inputs(batch: int, steps: int, channels: int, dtype: torch.dtype):
    """(x, weight, bias, positions) of a packed [batch * steps, channels] conv on the GPU, x a strided
    view (the first half of a [N, 2D] projection) as in the model."""
    device, n = torch.device("cuda"), batch * steps
    x = torch.randn(n, 2 * channels, device=device, dtype=dtype)[:, :channels].requires_grad_()
    weight = (0.3 * torch.randn(channels, 1, 4, device=device)).requires_grad_()
    bias = (0.1 * torch.randn(channels, device=device)).requires_grad_()
    positions = packed_positions(torch.arange(batch + 1, device=device) * steps, n)[1]
    return x, weight, bias, positions


def conv_dpre_sweep(batch: int, steps: int, channels: int = 128) -> List[Dict]:
    """The conv's backward (``--conv-dpre``, module docstring), bf16, x a strided view as in the model."""
    from triton.testing import do_bench

    x, weight, bias, positions = conv_inputs(batch, steps, channels, torch.bfloat16)
    grad = torch.randn(batch * steps, channels, device=x.device, dtype=torch.bfloat16)
    out = causal_conv_silu(x, weight, bias, positions, backend=KernelBackend.TRITON)
    rows = []
    defaults = conv._DPRE_BLOCK_N, conv._DPRE_MAX_BLOCK_D, conv._DPRE_MAX_PROGRAMS
    try:
        for (block_n, block_d), programs in itertools.product(((16, 128), (32, 64), (64, 64)), (1024, 2048)):
            conv._DPRE_BLOCK_N, conv._DPRE_MAX_BLOCK_D, conv._DPRE_MAX_PROGRAMS = block_n, block_d, programs
            backward_ms = do_bench(lambda: torch.autograd.grad(out, [x, weight, bias], grad, retain_graph=True))
            row = {"kernel": "conv backward", "batch": batch, "length": steps, "dtype": "bfloat16"}
            rows.append({**row, "block_n": block_n, "block_d": block_d, "programs": programs, "ms": backward_ms})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        conv._DPRE_BLOCK_N, conv._DPRE_MAX_BLOCK_D, conv._DPRE_MAX_PROGRAMS = defaults
    return rows


def time_directions(c, gates, z, dout, decay, offsets) -> Dict[str, float]:
    """Median ms of the BD-LRU forward and backward host wrappers (each one kernel launch plus the
    softplus of Lambda, the output buffers and, backward, the dLambda sum), with the current tile."""
    from triton.testing import do_bench

    _, h = bdlru_launch.bdlru_forward(c, gates, z, decay, offsets)
    return {
        "fwd_ms": do_bench(lambda: bdlru_launch.bdlru_forward(c, gates, z, decay, offsets), warmup=5, rep=40),
        "bwd_ms": do_bench(lambda: bdlru_launch.bdlru_backward(dout, c, gates, z, decay, h, offsets), warmup=5, rep=40),
    }


def direction_sweep(batch: int, steps: int, channels: int = 128) -> List[Dict]:
    """The BD-LRU forward and backward kernels timed apart, per tile and warp count."""
    n, rows = batch * steps, []
    offsets = torch.arange(batch + 1, device="cuda") * steps
    decay = torch.linspace(-2.2, -6.9, channels, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        c, dout = (torch.randn(n, channels, device="cuda", dtype=dtype) for _ in range(2))
        gates = (2 * torch.randn(n, 2 * channels, device="cuda")).to(dtype)
        z = torch.randn(n, 2 * channels, device="cuda", dtype=dtype)[:, channels:]  # strided, as in the model
        for chunk, block_d, warps in itertools.product((8, 16), (16, 32), (1, 2, 4)):
            with forced_tile(chunk, block_d, warps):
                run = time_directions(c, gates, z, dout, decay, offsets)
            row = {"kernel": "bdlru-directions", "batch": batch, "length": steps, "dtype": str(dtype)[6:]}
            rows.append({**row, "chunk": chunk, "block_d": block_d, "warps": warps, **run})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--directions", action="store_true", help="BD-LRU forward and backward apart, with warps")
    parser.add_argument("--conv-dpre", action="store_true", help="the conv's backward tile, bf16, three shapes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    if args.conv_dpre:
        rows = [row for batch, steps in LONG_SHAPES for row in conv_dpre_sweep(batch, steps)]
    else:
        run = direction_sweep if args.directions else sweep
        rows = [row for batch, steps in SHAPES for row in run(batch, steps)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
