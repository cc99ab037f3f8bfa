"""Times the loss's softmax cross-entropy over candidates on the GPU: the Triton kernel against the
chunked PyTorch reference, forward + backward, in one run.

Shapes (rows M x candidates C, d = 64):
  sampled  - 32,768 x 35,840: the rows of an all-positions batch of ``configs/synthetic-10m.yaml``
             (1,024 histories of ~30 positions, padded) against the most candidates such a
             batch can have, every target distinct plus 4,096 uniform negatives, padded to the
             1,024 candidate quantum (the shipped data's batches have 19,456: its popular items
             repeat; ``bench_loader.py`` prints the count);
  full     - 409,600 x 3,417: ML-1M's all-positions batch (2,048 histories of 200) against the
             whole catalog (the padding column out).
Per shape and precision (bf16: inputs in bfloat16; fp32: TF32 off, full float32 products):
median milliseconds of loss + backward (``triton.testing.do_bench``), peak memory above the
inputs, the kernel's loss and gradients against the reference's (largest relative difference),
and the kernel's speedup. ``--tiles 128x64x8 64x128x4 ...`` also times the kernel with each
(BLOCK_M x BLOCK_N x warps) logit tile in place of ``kernels/softmax_ce``'s ``_config`` (rows
``triton BMxBNxW``). Row ``triton unsplit`` times the kernel with dc's rows never split among
programs (``ROW_TILES_PER_SPLIT``), the peer of that split.

Usage (GPU): python benchmarks/bench_softmax_ce.py --out softmax_ce.json
"""

import argparse
import contextlib
import json
import os
import sys
from typing import Dict, List, Optional
from unittest import mock

import torch

from recblr_torchrec import KernelBackend
from recblr_torchrec.kernels.softmax_ce import softmax_cross_entropy
from recblr_torchrec.kernels.softmax_ce import triton as softmax_triton
from recblr_torchrec.results import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"sampled": (32768, 35840), "full": (409600, 3417)}
WIDTH = 64


def make_inputs(kind: str, dtype: torch.dtype, device: torch.device):
    rows, columns = SHAPES[kind]
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(rows, WIDTH, device=device, generator=gen) * 0.5).to(dtype).requires_grad_()
    candidates = (torch.randn(columns, WIDTH, device=device, generator=gen) * 0.5).to(dtype).requires_grad_()
    bias = torch.zeros(columns, device=device)
    if kind == "sampled":
        bias = -torch.rand(columns, device=device, generator=gen) * 5  # -log Q
        bias[:1000] = float("-inf")  # the padding ids in front
    else:
        bias[0] = float("-inf")
    low = 1000 if kind == "sampled" else 1
    targets = torch.randint(low, columns, (rows,), device=device, generator=gen)
    return hidden, candidates, bias, targets


def variant(spec: Optional[str]):
    """``kernels/softmax_ce``'s tile set to ``spec`` (BMxBNxW) while inside; None: its own;
    ``unsplit``: its own, dc's rows in one program per candidate block."""
    if spec is None:
        return contextlib.nullcontext()
    if spec == "unsplit":
        return mock.patch.object(softmax_triton, "ROW_TILES_PER_SPLIT", 2**62)
    block_m, block_n, warps = (int(v) for v in spec.split("x"))
    own = softmax_triton._config

    def config(dtype, width):
        _, _, block_d, _, precision = own(dtype, width)
        return block_m, block_n, block_d, warps, precision

    return mock.patch.object(softmax_triton, "_config", config)


def measure(kind: str, dtype: torch.dtype, device: torch.device, tiles: List[str]) -> List[Dict]:
    from triton.testing import do_bench

    inputs = make_inputs(kind, dtype, device)
    grad = torch.full((inputs[0].shape[0],), 1.0 / inputs[0].shape[0], device=device)
    rows, results = [], {}
    variants = [(KernelBackend.TRITON, None), (KernelBackend.PYTORCH, None)]
    variants += [(KernelBackend.TRITON, spec) for spec in ["unsplit", *tiles]]
    for backend, spec in variants:

        def step(backend=backend):
            loss = softmax_cross_entropy(*inputs, backend=backend)
            return (loss, *torch.autograd.grad(loss, inputs[:2], grad))

        with variant(spec):
            outputs = [t.float() for t in step()]
            results[backend] = outputs
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            extra_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms = do_bench(step, warmup=10, rep=50, return_mode="median")
        name = backend.value if spec is None else f"{backend.value} {spec}"
        rows.append({"shape": kind, "rows": SHAPES[kind][0], "candidates": SHAPES[kind][1], "width": WIDTH})
        rows[-1].update(precision=_name(dtype), backend=name, ms=ms, extra_mib=extra_mib)
        if backend == KernelBackend.TRITON:
            rows[-1]["outputs"] = outputs
    reference = results[KernelBackend.PYTORCH]
    for row in rows:
        if "outputs" in row:
            differences = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(row.pop("outputs"), reference)]
            row["max_rel_difference"] = dict(zip(("loss", "grad_hidden", "grad_candidates"), differences))
    rows[0]["speedup"] = rows[1]["ms"] / rows[0]["ms"]
    for row in rows:
        print(f"{kind:8} {row['precision']:5} {row['backend']:16} {row['ms']:8.2f} ms  +{row['extra_mib']:8.1f} MiB")
    print(f"{kind:8} {_name(dtype):5} kernel {rows[0]['speedup']:.2f}x the reference; {rows[0]['max_rel_difference']}")
    return rows


def _name(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--tiles", nargs="*", default=[], help="kernel tiles BMxBNxW to time as well")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for kind in args.shapes:
        for precision in args.precisions:
            rows += measure(kind, torch.bfloat16 if precision == "bf16" else torch.float32, device, args.tiles)
            torch.cuda.empty_cache()
    command = "python benchmarks/bench_softmax_ce.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"rows": rows, "provenance": provenance(torch.cuda.get_device_name(), command.strip(), ROOT)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
