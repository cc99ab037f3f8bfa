"""Times the Triton linear scan against the copy roofline and accelerated-scan's Triton scan.

For each shape and dtype it reports forward and forward+backward milliseconds (median of CUDA
event timings, ``triton.testing.do_bench``) and the fraction of the copy roofline:
bytes that must move / (measured device-to-device copy bandwidth x time). Bytes that must move,
per element of [B, T, D]: forward reads log_a and b and writes h; backward reads dL/dh, log_a and
h and writes dlog_a and db (fp32: 12 + 20 = 32 bytes). The copy bandwidth is measured in the same
run (bytes read + written by a 2 GiB ``copy_``).

The peer, accelerated-scan 0.3.1 (``accelerated_scan.scalar``, Triton), takes its own layout
[B, D, T] and gates a = exp(log_a); the packed batch is padded to [S, D, max L] for it, since it
has no variable-length mode. Its roofline fraction uses the same (packed) byte count as ours.

Usage (GPU)::

    python benchmarks/bench_linear_scan.py --lengths-file .bench/ml1m_lengths.txt --out results.json
    python benchmarks/bench_linear_scan.py --sweep ...     # also time a grid of tile shapes
    # the lengths file, made where the dataset is (never commit dataset files):
    python benchmarks/bench_linear_scan.py --data-dir ../shared/data --write-lengths .bench/ml1m_lengths.txt
"""

import argparse
import gzip
import json
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from recblr_torchrec.kernels.linear_scan import launch as scan_launch
from recblr_torchrec.kernels.linear_scan import op as scan_op
from recblr_torchrec.kernels.linear_scan import tuning as scan_tuning

DENSE_SHAPES: List[Tuple[int, int, int]] = [(2048, 256, 128), (128, 2048, 128), (32, 8192, 128)]
MAX_LENGTH = 200  # ML-1M training length: each user's last 200 items
CHANNELS = 128
C = scan_tuning.ScanConfig
SWEEP = [  # (chunk, block_d, num_warps, lookback)
    C(64, 32, 4, 1),
    C(64, 32, 4, 16),
    C(64, 32, 4, 4),
    C(32, 64, 4, 1),
    C(128, 32, 4, 1),
    C(64, 32, 2, 1),
    C(32, 32, 2, 1),
    C(16, 128, 1, 1),
]
SWEEP_BF16 = [C(64, 32, 4, 1), C(64, 64, 4, 1), C(32, 128, 4, 1)]


def ml1m_lengths(data_dir: str) -> List[int]:
    """Each ML-1M user's sequence length, truncated to the last ``MAX_LENGTH`` items."""
    path = os.path.join(data_dir, "ml-1m", "ml-1m.txt.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; pass --data-dir (or RECBLR_DATA_DIR) = the shared data folder")
    with gzip.open(path, "rt") as lines:
        return [min(len(line.split()) - 1, MAX_LENGTH) for line in lines if line.strip()]


def read_lengths(args: argparse.Namespace) -> Optional[List[int]]:
    if args.lengths_file:
        with open(args.lengths_file) as f:
            return [int(x) for x in f.read().split()]
    data_dir = args.data_dir or os.environ.get("RECBLR_DATA_DIR")
    return ml1m_lengths(data_dir) if data_dir else None


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written."""
    from triton.testing import do_bench

    src = torch.randn(512 * 1024 * 1024, device=device)  # 2 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def scan_bytes(elements: int, dtype: torch.dtype) -> Tuple[int, int]:
    size = torch.tensor([], dtype=dtype).element_size()
    return 3 * elements * size, 5 * elements * size


class Case:
    """One benchmark input: dense [B, T, D] or packed [N, D] with offsets, in one dtype."""

    def __init__(
        self,
        name: str,
        dtype: torch.dtype,
        device: torch.device,
        dense: Optional[Tuple[int, int, int]] = None,
        lengths: Optional[List[int]] = None,
    ):
        gen = torch.Generator(device=device).manual_seed(0)
        if dense is not None:
            shape, self.offsets, self.lengths = dense, None, [dense[1]] * dense[0]
        else:
            assert lengths is not None
            shape, self.lengths = (sum(lengths), CHANNELS), lengths
            self.offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64, device=device)
            self.offsets[1:] = torch.tensor(lengths, device=device).cumsum(0)
        self.name, self.dtype = name, dtype
        # RecBLR-like decays: log a in [-0.1, 0] (a in [0.9, 1]); never zeros (see METHOD.md).
        self.log_a = (-0.1 * torch.rand(shape, generator=gen, device=device)).to(dtype)
        self.b = torch.randn(shape, generator=gen, device=device).to(dtype)
        self.grad_h = torch.randn(shape, generator=gen, device=device).to(dtype)
        self.elements = self.b.numel()


def time_ms(fn: Callable[[], object], grad_to_none: Optional[List[Tensor]] = None) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def time_both_ways(forward: Callable[[], object], leaves: List[Tensor], backward_from: Callable[[object], None]):
    """ms of forward and forward+backward, eager (host launch costs included) and as graph replays."""

    def fwd_bwd() -> None:
        backward_from(forward())

    return {
        "fwd_eager_ms": time_ms(forward),
        "fwd_bwd_eager_ms": time_ms(fwd_bwd, grad_to_none=leaves),
        "fwd_ms": time_graphed(forward, []),
        "fwd_bwd_ms": time_graphed(fwd_bwd, leaves),
    }


def time_ours(case: Case) -> Dict[str, float]:
    """Times of the path linear_scan(backend=TRITON) takes, without its eager input checks."""
    op = scan_op.linear_scan_triton
    log_a = case.log_a.clone().requires_grad_()
    b = case.b.clone().requires_grad_()
    with torch.no_grad():
        fwd = time_ms(lambda: op(case.log_a, case.b, case.offsets, None))
    times = time_both_ways(lambda: op(log_a, b, case.offsets, None)[0], [log_a, b], lambda h: h.backward(case.grad_h))
    times["fwd_nograd_eager_ms"] = fwd
    return times


def time_public_api(case: Case) -> float:
    """Forward+backward through recblr_torchrec.linear_scan, eager input checks included."""
    from recblr_torchrec import KernelBackend, linear_scan

    log_a = case.log_a.clone().requires_grad_()
    b = case.b.clone().requires_grad_()

    def fwd_bwd() -> None:
        h, _ = linear_scan(log_a, b, case.offsets, backend=KernelBackend.TRITON)
        h.backward(case.grad_h)

    return time_ms(fwd_bwd, grad_to_none=[log_a, b])


def to_peer_layout(case: Case, x: Tensor) -> Tensor:
    """[B, T, D] or packed [N, D] -> accelerated-scan's [B, D, T] (packed: zero-padded to max L)."""
    if case.offsets is None:
        return x.transpose(1, 2).contiguous()
    padded = torch.nn.utils.rnn.pad_sequence(list(torch.split(x, case.lengths)), batch_first=True)
    return padded.transpose(1, 2).contiguous()


def time_peer(case: Case) -> Dict[str, float]:
    """accelerated-scan's eager forward and forward+backward ms, in its own layout."""
    from accelerated_scan.scalar import scan

    gates = to_peer_layout(case, case.log_a.float().exp().to(case.dtype)).requires_grad_()
    tokens = to_peer_layout(case, case.b).requires_grad_()
    grad = to_peer_layout(case, case.grad_h)
    with torch.no_grad():
        fwd = time_ms(lambda: scan(gates, tokens))
    both = time_ms(lambda: scan(gates, tokens).backward(grad), grad_to_none=[gates, tokens])
    return {"fwd_eager_ms": fwd, "fwd_bwd_eager_ms": both}


def sweep(case: Case, configs: List[scan_tuning.ScanConfig], bandwidth: float) -> Dict[str, object]:
    """Forward and backward times of each tile shape and schedule, each kernel alone."""
    rows = []
    fwd_bytes, bwd_bytes = scan_bytes(case.elements, case.dtype)
    h, _ = scan_launch.scan_forward(case.log_a, case.b, case.offsets, None)
    for config in configs:
        fwd = time_ms(lambda c=config: scan_launch.scan_forward(case.log_a, case.b, case.offsets, None, c))
        bwd = time_ms(
            lambda c=config: scan_launch.scan_backward(case.grad_h, None, case.log_a, h, case.offsets, None, c)
        )
        fwd_frac, bwd_frac = fwd_bytes / bandwidth / (fwd * 1e-3), bwd_bytes / bandwidth / (bwd * 1e-3)
        rows.append(
            {
                "config": vars(config),
                "fwd_ms": fwd,
                "bwd_ms": bwd,
                "fwd_roofline": fwd_frac,
                "bwd_roofline": bwd_frac,
            }
        )
        print(
            f"  sweep {case.name} {case.dtype} {tuple(vars(config).values())}: fwd {fwd:.3f} ms "
            f"({fwd_frac:.0%}), bwd {bwd:.3f} ms ({bwd_frac:.0%})",
            flush=True,
        )
    return {"case": case.name, "dtype": str(case.dtype), "rows": rows}


def time_graphed(fn: Callable[[], object], grad_to_none: List[Tensor]) -> float:
    """Median ms of a CUDA-graph replay of ``fn``: device time, without the host's launch overhead."""
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
            for t in grad_to_none:
                t.grad = None
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="shared data folder holding ml-1m/ml-1m.txt.gz (or RECBLR_DATA_DIR)")
    parser.add_argument("--lengths-file", help="whitespace-separated sequence lengths (from --write-lengths)")
    parser.add_argument("--write-lengths", help="write ML-1M's truncated lengths to this file and exit")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--sweep", action="store_true", help="also time the configs in SWEEP / SWEEP_BF16")
    parser.add_argument("--sweep-only", action="store_true", help="only the sweep, no results table")
    parser.add_argument("--no-peer", action="store_true", help="skip accelerated-scan")
    parser.add_argument("--out", help="write all numbers to this JSON file")
    args = parser.parse_args()

    lengths = read_lengths(args)
    if args.write_lengths:
        if lengths is None:
            parser.error("--write-lengths needs --data-dir or RECBLR_DATA_DIR")
        os.makedirs(os.path.dirname(os.path.abspath(args.write_lengths)), exist_ok=True)
        with open(args.write_lengths, "w") as f:
            f.write(" ".join(map(str, lengths)) + "\n")
        print(f"wrote {len(lengths)} lengths (sum {sum(lengths)}) to {args.write_lengths}")
        return
    if not torch.cuda.is_available():
        parser.error("the benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    results: Dict[str, object] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "copy_bandwidth_TBps": bandwidth / 1e12,
        "rows": [],
        "sweeps": [],
    }
    print(f"{results['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)

    specs: List[Tuple[str, Dict[str, object]]] = [(f"{b}x{t}x{d}", {"dense": (b, t, d)}) for b, t, d in DENSE_SHAPES]
    if lengths is not None:
        specs.append((f"ML-1M packed (S={len(lengths)}, N={sum(lengths)})", {"lengths": lengths}))
    else:
        print("no ML-1M lengths (--lengths-file / --data-dir): packed case skipped", flush=True)

    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for name, spec in specs:
            case = Case(name, dtype, device, **spec)
            if args.sweep or args.sweep_only:
                configs = SWEEP if dtype == torch.float32 else SWEEP_BF16
                results["sweeps"].append(sweep(case, configs, bandwidth))
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump(results, f, indent=1)
            if args.sweep_only:
                continue
            fwd_bytes, bwd_bytes = scan_bytes(case.elements, dtype)
            ideal_fwd = fwd_bytes / bandwidth * 1e3
            ideal_both = (fwd_bytes + bwd_bytes) / bandwidth * 1e3
            row: Dict[str, object] = {
                "shape": name,
                "dtype": dtype_name,
                "ideal_fwd_ms": ideal_fwd,
                "ideal_fwd_bwd_ms": ideal_both,
            }
            if not args.no_peer:
                try:
                    row.update({f"peer_{k}": v for k, v in time_peer(case).items()})
                except Exception as error:  # the peer may not support a dtype; say so in the table
                    row["peer_error"] = f"{type(error).__name__}: {str(error)[:200]}"
            row.update(time_ours(case))
            if case.offsets is not None:
                row["api_fwd_bwd_eager_ms"] = time_public_api(case)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            del case
            torch.cuda.empty_cache()
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)

    print(markdown_table(results))


def markdown_table(results: Dict[str, object]) -> str:
    def cell(r: Dict[str, object], key: str, ideal: str) -> str:
        return f"{r[key]:.3f} ({r[ideal] / r[key]:.0%})" if key in r else "-"

    lines = [
        f"{results['device']}, torch {results['torch']}, triton {results['triton']}, "
        f"copy bandwidth {results['copy_bandwidth_TBps']:.2f} TB/s. ms (fraction of the copy roofline). "
        "graph: CUDA-graph replay (device time); eager: plain calls (host launch costs included).",
        "",
        "| shape | dtype | ideal fwd / fwd+bwd | ours fwd, graph | ours fwd+bwd, graph | ours fwd eager "
        "| ours fwd+bwd eager | accelerated-scan fwd eager | accelerated-scan fwd+bwd eager "
        "| eager fwd+bwd speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        speedup = f"{r['peer_fwd_bwd_eager_ms'] / r['fwd_bwd_eager_ms']:.2f}x" if "peer_fwd_bwd_eager_ms" in r else "-"
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['ideal_fwd_ms']:.3f} / {r['ideal_fwd_bwd_ms']:.3f} "
            f"| {cell(r, 'fwd_ms', 'ideal_fwd_ms')} | {cell(r, 'fwd_bwd_ms', 'ideal_fwd_bwd_ms')} "
            f"| {cell(r, 'fwd_nograd_eager_ms', 'ideal_fwd_ms')} "
            f"| {cell(r, 'fwd_bwd_eager_ms', 'ideal_fwd_bwd_ms')} "
            f"| {cell(r, 'peer_fwd_eager_ms', 'ideal_fwd_ms')} "
            f"| {cell(r, 'peer_fwd_bwd_eager_ms', 'ideal_fwd_bwd_ms')} | {speedup} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
