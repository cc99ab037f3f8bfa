"""Throughput and memory of the trainer's step, local against sharded through TorchRec, and what
the sampled softmax costs in quality.

Cases (``--cases``), each the trainer's own step (``Trainer`` and its placement's ``steps``: the
local step, CUDA-graphed where the config allows; the sharded one through
DistributedModelParallel and, on GPU, ``TrainPipelineSparseDist``) over ``--steps`` steps after
``--warmup``, its batches from the config's loader, no checkpoint written:

- ``local``: ``configs/ml-1m/recblr-paper.yaml`` in one process;
- ``dmp``: the same config through DistributedModelParallel, on a GPU the dense part of each
  step replayed from CUDA graphs (``train.cuda_graphs: auto``; ``--set train.cuda_graphs=off`` for
  the eager step);
- ``synthetic``: ``configs/synthetic-10m.yaml`` as shipped (10M items, the item table row-wise
  sharded, batches of 1,024, sampled softmax with in-batch targets and 4,096 uniform negatives)
  through DistributedModelParallel, graphed alike.

Per case: sequences/s (global), wall and host milliseconds per step (host: the time the loop
spends issuing a step), kernel launches per step on GPU (``cudaLaunchKernel`` and graph launches,
counted by ``torch.profiler`` over 10 steps), each rank's peak GPU memory, and the CUDA graphs'
counters (the whole local step's, or the sharded step's dense part's).

Run as a plain process, the sharded cases form a process group of one (DMP on one device); under
``torchrun --nproc_per_node N`` the same script measures the sharded cases on N devices (the
local case needs a plain process and is skipped there):

    python benchmarks/bench_sharded.py --data-dir DATA --out sharded.json
    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/bench_sharded.py \\
        --data-dir DATA --out sharded_2.json

``--quality-seeds 0 1 2`` also trains ``configs/ml-1m/recblr-all-positions.yaml`` with the full
and with the sampled softmax (4,096 uniform negatives), once per seed (``launchers/train.py``
runs sharing the visible GPUs, ``--parallel`` at a time), and reports test NDCG@10 and HR@10.
"""

import argparse
import contextlib
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional

import torch
from profile_train_loop import endless_batches, synchronize  # benchmarks/, this script's folder

from recblr_torchrec.config import RunConfig, add_overrides_argument, load_config, resolve_data_dir
from recblr_torchrec.distributed.env import launched_by_torchrun
from recblr_torchrec.results import provenance, spread
from recblr_torchrec.training.history import METRICS_JSON, read_metrics
from recblr_torchrec.training.placement import LocalPlacement, resolve_device
from recblr_torchrec.training.pool import Run, run_pool
from recblr_torchrec.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {  # config, overrides
    "local": ("configs/ml-1m/recblr-paper.yaml", []),
    "dmp": ("configs/ml-1m/recblr-paper.yaml", []),
    "synthetic": ("configs/synthetic-10m.yaml", []),
}
QUALITY_CONFIG = "configs/ml-1m/recblr-all-positions.yaml"
QUALITY_ROWS = {"full": ["train.loss=full"], "sampled": ["train.loss=sampled", "train.num_negatives=4096"]}
LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


class _WorldOfOne:
    """The environment torchrun would export for a single process, for DMP without a launcher."""

    def __enter__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.names = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
        self.names.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ.update(self.names)

    def __exit__(self, *exc: Any) -> None:
        for name in self.names:
            os.environ.pop(name, None)


def _join(stack: contextlib.ExitStack, config: RunConfig, torchrun: bool):
    """The process group of the sharded cases: torchrun's, or a world of one; left on ``stack``'s exit."""
    import torch.distributed as dist

    from recblr_torchrec.distributed.env import init_distributed

    if not torchrun:
        stack.enter_context(_WorldOfOne())
    d = config.distributed
    env = init_distributed(d.backend.value, d.timeout_s, config.train.device)
    stack.callback(dist.destroy_process_group)
    return env


def _launches_per_step(stream: Iterator, device: torch.device, steps: int) -> Optional[float]:
    if device.type != "cuda":
        return None
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]  # CUDA: runtime calls
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            next(stream)
        synchronize(device)
    return sum(1 for e in prof.events() if e.name in LAUNCH_EVENTS) / steps


def measure(config: RunConfig, data_dir: Optional[str], placement, warmup: int, steps: int) -> Dict[str, Any]:
    """One case: the trainer's steps after ``warmup``, timed over ``steps`` (module docstring)."""
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out, data_dir, placement)
        trainer.module.train()
        device = trainer.device
        counter = [0]
        stream = placement.steps(endless_batches(trainer, counter), trainer)
        for _ in range(warmup):
            next(stream)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        placement.barrier()
        first, host = counter[0], 0.0
        start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            next(stream)
            host += time.perf_counter() - t0
        synchronize(device)
        wall = time.perf_counter() - start
        sequences = counter[0] - first  # the pipeline's read-ahead is the same at both ends
        launches = _launches_per_step(stream, device, min(steps, 10))
        peak = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
        t = trainer.config.train
        gathered = placement.gather(peak)
        graphed = getattr(placement, "dense_step", None) or trainer.graphed  # sharded: the dense part's graphs
        graphs = graphed.stats() if graphed is not None else {}
        del stream, trainer  # the next case's peak memory starts from nothing of this one
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {
            "config": config.name,
            "placement": type(placement).__name__,
            "world_size": placement.world_size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": str(t.precision),
            "cuda_graphs": str(t.cuda_graphs),
            "batch_size": t.batch_size,
            "loss": str(t.loss),
            "warmup": warmup,
            "steps": steps,
            "sequences_per_s": round(sequences / wall, 1),
            "step_ms": round(1e3 * wall / steps, 3),
            "host_ms": round(1e3 * host / steps, 3),
            "launches_per_step": launches,
            "graphs": graphs,
            "peak_gpu_mb_per_rank": gathered,
        }


def run_case(name: str, args: argparse.Namespace, data_dir: Optional[str], env, torchrun: bool) -> Optional[Dict]:
    """One case; ``env``: the process group the sharded cases share (None without one); None when
    the case is ``local`` and ``torchrun`` launched this process."""
    path, overrides = CASES[name]
    config = load_config(os.path.join(ROOT, path), overrides + args.overrides)
    if name == "local":
        if torchrun:
            return None
        placement = LocalPlacement(resolve_device(config.train.device))
        return {"case": name, **measure(config, data_dir, placement, args.warmup, args.steps)}
    from recblr_torchrec.distributed.placement import ShardedPlacement

    placement = ShardedPlacement(env, config)
    return {"case": name, **measure(config, data_dir, placement, args.warmup, args.steps)}


def quality(args: argparse.Namespace, data_dir: str) -> List[Dict[str, Any]]:
    """Test metrics of the full and the sampled softmax over ``--quality-seeds`` (module docstring)."""
    runs, folders = [], {}
    for row, overrides in QUALITY_ROWS.items():
        for seed in args.quality_seeds:
            out = os.path.join(args.runs_dir, row, f"seed{seed}")
            folders.setdefault(row, []).append(out)
            if os.path.isfile(os.path.join(out, METRICS_JSON)):
                continue
            command = [sys.executable, os.path.join(ROOT, "launchers", "train.py"), "--config", QUALITY_CONFIG]
            command += ["--data-dir", data_dir, "--output-dir", out, "--set", f"train.seed={seed}", *overrides]
            runs.append(Run(f"{row} seed {seed}", out, command))
    failed, _ = run_pool(runs, args.parallel, time.monotonic() + 60 * args.budget_minutes, ROOT)
    if failed:
        print(f"quality runs failed: {', '.join(failed)}; see train.log in their folders", flush=True)
    rows = []
    for row, outs in folders.items():
        done = [metrics for metrics in map(read_metrics, outs) if metrics is not None]
        if not done:
            continue
        entry: Dict[str, Any] = {
            "loss": row,
            "config": QUALITY_CONFIG,
            "overrides": QUALITY_ROWS[row],
            "seeds": len(done),
        }
        for name in ("NDCG@10", "HR@10"):
            entry[name] = spread(m["test"][name] for m in done)
        entry["train_seconds"] = round(statistics.mean(m["train_seconds"] for m in done), 1)
        rows.append(entry)
    return rows


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="folder holding the datasets (default: $RECBLR_DATA_DIR)")
    parser.add_argument("--cases", nargs="*", choices=list(CASES), default=list(CASES), help="none: quality rows only")
    parser.add_argument("--warmup", type=int, default=30, help="steps before timing (graph capture, allocator)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps")
    parser.add_argument("--quality-seeds", type=int, nargs="*", default=[], help="seeds of the quality rows (d)")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "bench_sharded"), help="quality runs")
    parser.add_argument("--parallel", type=int, default=6, help="quality runs at a time")
    parser.add_argument("--budget-minutes", type=float, default=9.0, help="the quality runs' wall-time limit")
    parser.add_argument("--out", help="write the results as JSON here (rank 0)")
    add_overrides_argument(parser, "overrides for every case, e.g. --set train.precision=fp32")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0; got {args.steps}, {args.warmup}")
    data_dir = resolve_data_dir(args.data_dir)
    data_dir = data_dir and os.path.abspath(data_dir)  # the quality runs start in the repo root
    args.runs_dir = os.path.abspath(args.runs_dir)
    gpus = torch.cuda.device_count()
    hardware = f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else f"CPU ({os.cpu_count()} cores)"
    command = "python benchmarks/bench_sharded.py " + " ".join(argv)
    result: Dict[str, Any] = {"provenance": provenance(hardware, command, ROOT), "cases": []}
    torchrun = launched_by_torchrun()
    with contextlib.ExitStack() as stack:
        env = None
        if any(name != "local" for name in args.cases):
            env = _join(stack, load_config(os.path.join(ROOT, CASES["dmp"][0]), args.overrides), torchrun)
        main_rank = env is None or env.is_main
        for name in args.cases:
            row = run_case(name, args, data_dir, env, torchrun)
            if row is None:
                if main_rank:
                    print(f"{name}: skipped under torchrun (a one-process case)", flush=True)
                continue
            result["cases"].append(row)
            if main_rank:
                print(
                    f"{name}: {row['sequences_per_s']:,.0f} sequences/s, {row['step_ms']:.2f} ms a step "
                    f"({row['host_ms']:.2f} ms host, {row['launches_per_step']} launches), "
                    f"peak GPU MB per rank {row['peak_gpu_mb_per_rank']}",
                    flush=True,
                )
    if args.quality_seeds and main_rank:
        result["quality"] = quality(args, data_dir)
        for row in result["quality"]:
            print(f"quality {row['loss']}: test NDCG@10 {row['NDCG@10']}, HR@10 {row['HR@10']}", flush=True)
    if args.out and main_rank:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
