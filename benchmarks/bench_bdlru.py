"""Times the fused BD-LRU layer (gates + scan + output gate) on the GPU.

Compares, in one run, at [B, T, D] = [2048, 200, 128], [256, 2048, 128] and [32, 8192, 128], fp32
and bf16:
  fused      - ``bdlru(..., backend=TRITON)``: one kernel forward, one backward (each after a
               summary kernel where the sequences are cut into segments, ``tuning._segment``);
  whole      - the same kernels with every sequence one segment (one program per sequence and
               channel block, as before segments: 128 programs at 32 x 8,192 x 128);
  busy<N>    - fused with ``tuning.BUSY_PROGRAMS = N`` (``--busy-programs N ...``): cut into
               segments until N programs run;
  stages<N>  - fused with ``tuning.LOOP_STAGES = N`` (``--stages N ...``): the loops over tiles
               software-pipelined into N stages;
  unfused    - the same math as separate torch ops around the Triton linear scan;
  reference  - ``bdlru(..., backend=PYTORCH)``: torch ops around the sequential PyTorch scan.
Reports forward and forward+backward milliseconds (median, ``triton.testing.do_bench``) and the
fraction of the copy roofline: the bytes of the layer's inputs and outputs (forward: c, [r; i], z
in, out; backward: c, [r; i], z, dout in, dc, d[r; i], dz out) over the measured
device-to-device copy bandwidth times the time.

Usage (GPU): python benchmarks/bench_bdlru.py --out results.json
"""

import argparse
import json
from typing import Callable, Dict, List
from unittest import mock

import torch
import torch.nn.functional as F
from bench_linear_scan import copy_bandwidth

from recblr_torchrec import KernelBackend, linear_scan
from recblr_torchrec.kernels.bdlru import bdlru, bdlru_gates, tuning

SHAPES = [(2048, 200, 128), (256, 2048, 128), (32, 8192, 128)]


def unfused(c, gate_logits, z, decay):
    log_alpha, beta = bdlru_gates(gate_logits, decay)
    h, _ = linear_scan(log_alpha, beta * c, backend=KernelBackend.TRITON)
    return F.silu(z) * h


VARIANTS: Dict[str, Callable] = {
    "fused": lambda *a: bdlru(*a, backend=KernelBackend.TRITON),
    "whole": lambda *a: bdlru(*a, backend=KernelBackend.TRITON),  # timed with tuning.BUSY_PROGRAMS = 0
    "unfused": unfused,
    "reference": lambda *a: bdlru(*a, backend=KernelBackend.PYTORCH),
}


def make_inputs(shape, dtype, device):
    b, t, d = shape
    c = torch.randn(b, t, d, device=device, dtype=dtype, requires_grad=True)
    gates = (2 * torch.randn(b, t, 2 * d, device=device)).to(dtype).requires_grad_()
    z = torch.randn(b, t, d, device=device, dtype=dtype, requires_grad=True)
    decay = torch.linspace(-2.2, -6.9, d, device=device).requires_grad_()
    return c, gates, z, decay


def main(argv: List[str] = None) -> None:
    from triton.testing import do_bench

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip-reference-long", action="store_true", help="skip the slow sequential T=2048 case")
    parser.add_argument(
        "--busy-programs",
        type=int,
        nargs="*",
        default=[],
        help="also time the fused kernels with tuning.BUSY_PROGRAMS at each of these values (variant busy<N>)",
    )
    parser.add_argument(
        "--stages",
        type=int,
        nargs="*",
        default=[],
        help="also time the fused kernels with tuning.LOOP_STAGES at each of these values (variant stages<N>)",
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    rows = []
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            inputs = make_inputs(shape, dtype, device)
            grad = torch.randn(shape, device=device, dtype=dtype)
            ref = VARIANTS["unfused"](*inputs)
            units = shape[0] * shape[1] * shape[2] * torch.tensor([], dtype=dtype).element_size()
            variants = dict(VARIANTS, **{f"busy{n}": VARIANTS["fused"] for n in args.busy_programs})
            variants.update({f"stages{n}": VARIANTS["fused"] for n in args.stages})
            for name, fn in variants.items():
                if name == "reference" and shape[1] > 1000 and args.skip_reference_long:
                    continue
                values = {
                    "BUSY_PROGRAMS": 0 if name == "whole" else tuning.BUSY_PROGRAMS,
                    "LOOP_STAGES": tuning.LOOP_STAGES,
                }
                for prefix, constant in (("busy", "BUSY_PROGRAMS"), ("stages", "LOOP_STAGES")):
                    if name.startswith(prefix):
                        values[constant] = int(name[len(prefix) :])
                with mock.patch.multiple(tuning, **values):
                    out = fn(*inputs)
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    fwd = do_bench(lambda fn=fn, x=inputs: fn(*x), warmup=25, rep=100, return_mode="median")
                    both = do_bench(
                        lambda fn=fn, x=inputs, g=grad: torch.autograd.grad(fn(*x), x, g),
                        warmup=25,
                        rep=100,
                        return_mode="median",
                    )
                row = {
                    "shape": list(shape),
                    "dtype": str(dtype).replace("torch.", ""),
                    "variant": name,
                    "forward_ms": fwd,
                    "forward_backward_ms": both,
                    "forward_roofline": 5 * units / (bandwidth * fwd * 1e-3),
                    "forward_backward_roofline": 14 * units / (bandwidth * both * 1e-3),
                    "rel_err_vs_unfused": err,
                }
                rows.append(row)
                print(
                    f"{str(shape):18} {row['dtype']:9} {name:9} fwd {fwd:8.3f} ms ({row['forward_roofline']:5.1%})  "
                    f"fwd+bwd {both:8.3f} ms ({row['forward_backward_roofline']:5.1%})  err {err:.1e}",
                    flush=True,
                )
    result = {"device": torch.cuda.get_device_name(), "copy_bandwidth_GBps": bandwidth / 1e9, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
