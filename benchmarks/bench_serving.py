"""Latency and throughput of one step.pt event against re-scoring the whole history with scorer.pt.

Needs only torch: it loads the exported TorchScript files (``launchers/export.py``), so it runs on
a machine without TorchRec. For each device, batch B and history length T it times

- ``scorer``: scorer.pt on B full histories of T events (what serving without a state costs per
  new event: score the whole history again);
- ``step``: step.pt advancing B users by one event from their states;

both returning the top-10 over the whole catalog, input validation included. Latency is the
median wall time of one call (CUDA synchronised), after warm-up calls that let TorchScript's
profiling executor settle; throughput is B / latency in users (events) per second.

Usage::

    python launchers/export.py --checkpoint runs/ml-1m-cpu --output-dir serving/ml-1m
    python benchmarks/bench_serving.py --artifacts serving/ml-1m [--devices cpu cuda] [--out results.json]
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

TOP_K = 10


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, min_reps: int, budget_s: float) -> float:
    """Median seconds of one call: ``warmup`` untimed calls, then at least ``min_reps`` timed ones (or ``budget_s``)."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_parity(scorer, step, device: torch.device, num_items: int, steps: int = 50) -> float:
    """Max |state difference| between feeding 8 histories event by event through step.pt and scorer.pt."""
    ids = torch.randint(1, num_items + 1, (8, steps), generator=torch.Generator().manual_seed(1)).to(device)
    lengths = torch.full((8,), steps, dtype=torch.long, device=device)
    state = step.initial_state(8)
    for t in range(steps):
        state = step(state, ids[:, t].contiguous(), TOP_K)[0]
    return float((state - scorer.user_state(ids, lengths)).abs().max())


def bench_device(artifacts: str, device: torch.device, batches: List[int], lengths: List[int], budget_s: float):
    scorer = torch.jit.load(os.path.join(artifacts, "scorer.pt"), map_location=device).eval()
    step = torch.jit.load(os.path.join(artifacts, "step.pt"), map_location=device).eval()
    num_items = int(scorer.item_table.shape[0]) - 1
    rows = []
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        diff = check_parity(scorer, step, device, num_items)
        print(f"{device.type}: step.pt vs scorer.pt state after 50 events: max |diff| {diff:.2e}")
        for batch in batches:
            for steps in lengths:
                ids = torch.randint(1, num_items + 1, (batch, steps), generator=generator).to(device)
                lengths_t = torch.full((batch,), steps, dtype=torch.long, device=device)
                state = scorer.user_state(ids, lengths_t)
                new_items = ids[:, -1].contiguous()
                heavy = batch * steps >= 100_000 and device.type == "cpu"
                score_s = time_call(
                    lambda ids=ids, lengths_t=lengths_t: scorer(ids, lengths_t, TOP_K),
                    device,
                    2 if heavy else 3,
                    3 if heavy else 10,
                    budget_s,
                )
                step_s = time_call(
                    lambda state=state, new_items=new_items: step(state, new_items, TOP_K), device, 5, 20, budget_s
                )
                row = {
                    "device": device.type,
                    "batch": batch,
                    "history": steps,
                    "scorer_ms": score_s * 1e3,
                    "step_ms": step_s * 1e3,
                    "scorer_users_per_s": batch / score_s,
                    "step_events_per_s": batch / step_s,
                    "speedup": score_s / step_s,
                }
                rows.append(row)
                print(
                    f"{device.type:4s} B={batch:4d} T={steps:5d}  scorer {row['scorer_ms']:9.2f} ms "
                    f"({row['scorer_users_per_s']:10.0f} users/s)  step {row['step_ms']:7.3f} ms "
                    f"({row['step_events_per_s']:10.0f} events/s)  x{row['speedup']:.0f}",
                    flush=True,
                )
    return rows


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def markdown(rows: List[Dict], hardware_names: Dict[str, str]) -> str:
    lines = [
        "| device | B | T | scorer.pt (ms) | step.pt (ms) | scorer users/s | step events/s | step speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {hardware_names[r['device']]} | {r['batch']} | {r['history']} | {r['scorer_ms']:.2f} | "
            f"{r['step_ms']:.3f} | {r['scorer_users_per_s']:,.0f} | {r['step_events_per_s']:,.0f} | "
            f"{r['speedup']:,.0f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True, help="folder with scorer.pt and step.pt (launchers/export.py)")
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    parser.add_argument("--lengths", nargs="+", type=int, default=[50, 200, 2000])
    parser.add_argument("--budget-s", type=float, default=1.0, help="time spent per measurement beyond the minimum")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    with open(os.path.join(args.artifacts, "manifest.json")) as f:
        manifest = json.load(f)
    model = manifest["model"]
    print(
        f"torch {torch.__version__}; model d={model['embedding_dim']} layers={model['num_layers']} "
        f"k={model['conv_width']} catalog {manifest['num_items']} items; top-{TOP_K}; fp32"
    )
    rows, names = [], {}
    for name in args.devices:
        device = torch.device(name)
        names[device.type] = hardware(device)
        rows += bench_device(args.artifacts, device, args.batches, args.lengths, args.budget_s)
    print(markdown(rows, names))
    if args.out:
        with open(args.out, "w") as f:
            provenance = {
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(["python", *sys.argv]),
                "checkpoint": manifest["checkpoint"],
                "num_items": manifest["num_items"],
            }
            result = {"torch": torch.__version__, "hardware": names, "manifest_model": model, **provenance}
            json.dump({**result, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
