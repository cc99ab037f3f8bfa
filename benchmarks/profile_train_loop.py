"""Where a real training step's time goes: the host, the GPU, the loader, and host synchronisations.

``bench_step.py`` times one fixed batch; this runs the trainer's own loop (a config's data, its
DataLoader, ``Trainer.train_step``) and splits each step's wall time:

- ``wall_ms``: wall time per step over ``--steps`` steps (the device synchronised at both ends);
- ``loader_wait_ms``: time spent waiting for the next batch;
- ``host_ms``: time the training loop spends issuing a step (loader wait excluded). When it is
  close to ``wall_ms`` and ``gpu_busy_ms`` is well below, the step is bound by the host;
- ``gpu_busy_ms``: the time per step in which the device ran a kernel, copy or memset
  (``torch.profiler``; :func:`device_busy_us`);
- ``syncs_per_step``: host synchronisations per step, counted with
  ``torch.cuda.set_sync_debug_mode`` and attributed to the source line that caused each;
- ``host_ops``: the operators with the most host (CPU) self time per step (a synchronising op's
  time includes its wait for the device);
- ``gpu_kernels``: the kernels and copies with the most GPU time per step;
- with ``--eval-reps N``: ``eval_wall_ms``, the wall time of one validation pass (as after every
  epoch, mean of N after a first), and of one profiled pass its operators, GPU busy time and syncs.

Usage (GPU; on CPU the device columns are left out):

    python benchmarks/profile_train_loop.py --config configs/ml-1m/recblr-paper.yaml --data-dir DATA \
        --set train.precision=bf16 train.compile=inductor --warmup 20 --steps 50 --out loop.json
"""

import argparse
import collections
import json
import os
import tempfile
import time
import traceback
import warnings
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch.autograd import DeviceType

from recblr_torchrec.config import add_overrides_argument, load_config, resolve_data_dir
from recblr_torchrec.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PACKAGE_DIRS = tuple(os.path.join(ROOT, name) + os.sep for name in ("recblr_torchrec", "kernels"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def endless_batches(trainer: Trainer, counter: Optional[List[int]] = None) -> Iterator:
    """Training batches, epoch after epoch, as ``Trainer.train_epoch`` feeds them; ``counter[0]``,
    if given, sums the global sequences handed out."""
    epoch = 0
    while True:
        epoch += 1
        trainer.train_batches.set_epoch(epoch)
        for index, batch in enumerate(trainer.loader(trainer.train_batches)):
            if counter is not None:
                counter[0] += trainer.train_batches.global_batch_size(index)
            yield batch


def _timed_steps(trainer: Trainer, batches: Iterator, steps: int) -> Dict[str, float]:
    """Runs ``steps`` steps; returns wall, loader-wait and host milliseconds per step."""
    device = trainer.device
    synchronize(device)
    wait = host = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        trainer.train_step(batch)
        t2 = time.perf_counter()
        wait, host = wait + (t1 - t0), host + (t2 - t1)
    synchronize(device)
    wall = time.perf_counter() - start
    return {"wall_ms": 1e3 * wall / steps, "loader_wait_ms": 1e3 * wait / steps, "host_ms": 1e3 * host / steps}


def _relative(filename: str) -> str:
    return os.path.relpath(filename, ROOT) if filename.startswith(ROOT + os.sep) else os.path.basename(filename)


def count_sync_warnings(run: Callable[[], None]) -> collections.Counter:
    """Runs ``run`` with CUDA's sync debug mode on (where CUDA is available) and counts the
    synchronisation warnings by site: the innermost frame of this project's code on the stack
    when the warning fired, with the library line that raised it when that is elsewhere.
    Warnings raised on autograd's threads reach Python when backward returns, so every sync inside
    backward is charged to the line that called it."""
    counts: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return
        ours = [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE_DIRS)]
        site = f"{_relative(ours[-1].filename)}:{ours[-1].lineno}" if ours else "outside this project"
        if not filename.startswith(PACKAGE_DIRS):
            site += f" (via {_relative(filename)}:{lineno})"
        counts[site] += 1

    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    return counts


def _sync_sites(trainer: Trainer, batches: Iterator, steps: int) -> Dict[str, float]:
    """Host synchronisations per training step, by site (CUDA only)."""
    inputs = [next(batches) for _ in range(steps)]  # the loader's own work is not the step's

    def run() -> None:
        for batch in inputs:
            trainer.train_step(batch)

    counts = count_sync_warnings(run)
    return {site: n / steps for site, n in counts.most_common()}


def _device_spans(events):
    """The kernels, copies and memsets among profiler events (no annotation ranges)."""
    return [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def top_kernels(events, steps: int, top: int) -> List[Dict]:
    """The device kernels (and copies) with the most GPU time, in milliseconds and calls per step."""
    totals: Dict[str, List[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in _device_spans(events):
        totals[e.name][0] += e.time_range.end - e.time_range.start
        totals[e.name][1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:top]
    return [{"kernel": name, "gpu_ms": us / 1e3 / steps, "calls": n / steps} for name, (us, n) in ranked]


def device_busy_us(events) -> float:
    """Microseconds in which the GPU ran at least one kernel, copy or memset: the union of those
    events' intervals. Operators' device times would count their kernels again, and the GPU-side
    ranges of ``record_function`` annotations (Adam.step, Inductor graphs, TorchRec's) span the
    kernels inside them and the idle gaps between."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in _device_spans(events))
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def _profiler(device: torch.device) -> torch.profiler.profile:
    """A profiler of the host and, on a GPU, of the device."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def _profile(trainer: Trainer, batches: Iterator, steps: int, top: int) -> Dict:
    """Device busy time and the host operators with the most CPU self time, per step."""
    with _profiler(trainer.device) as prof:
        for _ in range(steps):
            trainer.train_step(next(batches))
        synchronize(trainer.device)
    events = prof.key_averages()
    host_ops = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    result = {
        "host_ops": [
            {"op": e.key, "host_self_ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count / steps}
            for e in host_ops
        ],
        "ops_per_step": sum(e.count for e in events if e.key.startswith("aten::")) / steps,
    }
    if trainer.device.type == "cuda":
        result["gpu_busy_ms"] = device_busy_us(prof.events()) / 1e3 / steps
        result["gpu_kernels"] = top_kernels(prof.events(), steps, top)
    return result


def profile_evaluation(trainer: Trainer, reps: int) -> Dict:
    """One validation pass (``Trainer.evaluate``, as after every epoch): its wall time over ``reps``
    passes after a first one, then one pass profiled (GPU busy time, operators, syncs)."""
    trainer.evaluate("valid")  # first pass: allocator, kernel compilation, the catalog cache
    synchronize(trainer.device)
    start = time.perf_counter()
    for _ in range(reps):
        trainer.evaluate("valid")
    synchronize(trainer.device)
    result = {"eval_wall_ms": 1e3 * (time.perf_counter() - start) / reps}
    with _profiler(trainer.device) as prof:
        trainer.evaluate("valid")
        synchronize(trainer.device)
    events = prof.key_averages()
    result["eval_ops"] = sum(e.count for e in events if e.key.startswith("aten::"))
    if trainer.device.type == "cuda":
        result["eval_gpu_busy_ms"] = device_busy_us(prof.events()) / 1e3
        sites = count_sync_warnings(lambda: trainer.evaluate("valid"))
        result["eval_syncs"] = sum(sites.values())
    return result


def profile_loop(config, data_dir: Optional[str], warmup: int, steps: int, top: int = 25, eval_reps: int = 0) -> Dict:
    """Builds the trainer of ``config`` and measures its loop (see the module docstring)."""
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out, data_dir)
        trainer.model.train()
        batches = endless_batches(trainer)
        for _ in range(warmup):
            trainer.train_step(next(batches))
        result = {"config": config.name, "device": str(trainer.device), "warmup": warmup, "steps": steps}
        result.update(_timed_steps(trainer, batches, steps))
        result.update(_profile(trainer, batches, min(steps, 10), top))
        if trainer.device.type == "cuda":
            result["syncs_per_step"] = _sync_sites(trainer, batches, min(steps, 10))
            result["gpu"] = torch.cuda.get_device_name(trainer.device)
        if trainer.graphed is not None:
            result["graphs"] = trainer.graphed.stats()
            print(f"  cuda graphs: {result['graphs']}")
        if eval_reps:
            result.update(profile_evaluation(trainer, eval_reps))
    result.update(torch=torch.__version__, batch_size=config.train.batch_size, protocol=config.train.protocol)
    return result


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--data-dir", default=None, help="folder holding the datasets (default: $RECBLR_DATA_DIR)")
    add_overrides_argument(parser, "config overrides, e.g. --set train.precision=bf16 train.cuda_graphs=true")
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing (compilation, allocator)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--eval-reps", type=int, default=0, help="also time this many validation passes")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.eval_reps < 0:
        parser.error(
            f"--steps must be >= 1, --warmup and --eval-reps >= 0; got {args.steps}, {args.warmup}, {args.eval_reps}"
        )
    config = load_config(args.config, args.overrides)
    result = profile_loop(config, resolve_data_dir(args.data_dir), args.warmup, args.steps, eval_reps=args.eval_reps)
    line = f"{result['config']} on {result['device']}: {result['wall_ms']:.2f} ms a step wall, "
    line += f"{result['host_ms']:.2f} ms host, {result['loader_wait_ms']:.2f} ms waiting for batches"
    if "gpu_busy_ms" in result:
        line += f", {result['gpu_busy_ms']:.2f} ms GPU busy"
    print(line)
    for site, n in result.get("syncs_per_step", {}).items():
        print(f"  sync {n:5.1f} a step  {site}")
    for op in result["host_ops"][:15]:
        print(f"  {op['host_self_ms']:7.3f} ms host  {op['calls']:6.1f} calls  {op['op'][:90]}")
    for kernel in result.get("gpu_kernels", [])[:15]:
        print(f"  {kernel['gpu_ms']:7.3f} ms GPU   {kernel['calls']:6.1f} calls  {kernel['kernel'][:90]}")
    if "eval_wall_ms" in result:
        line = f"validation pass: {result['eval_wall_ms']:.1f} ms wall, {result['eval_ops']} operators"
        if "eval_gpu_busy_ms" in result:
            line += f", {result['eval_gpu_busy_ms']:.1f} ms GPU busy, {result['eval_syncs']} syncs"
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
