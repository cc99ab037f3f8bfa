"""Where a training step's GPU time goes: the encoder step alone, and a per-op profile.

The model of ``bench_step.py`` without TorchRec (a plain ``nn.Embedding`` instead of the
EmbeddingCollection, so it runs where TorchRec is not installed): B full-length histories of T
items, the encoder with the loss rows only in its last layer, the chunked full softmax at each
history's last position, backward, Adam. Prints the step's median milliseconds (CUDA events), then
``torch.profiler``'s CUDA time per op for a few steps, and writes both as JSON.

Usage (GPU): python benchmarks/profile_step.py --out profile.json [--batch 2048 --length 200]
"""

import argparse
import importlib
import json
import os
import statistics
import sys
import types
from typing import List, Optional

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def import_without_torchrec(subpackage: str, name: str):
    """Imports ``recblr_torchrec.<subpackage>.<name>`` without running the subpackage's
    ``__init__`` (which imports the TorchRec model)."""
    import recblr_torchrec

    package = f"recblr_torchrec.{subpackage}"
    if package not in sys.modules:
        stub = types.ModuleType(package)
        stub.__path__ = [os.path.join(os.path.dirname(recblr_torchrec.__file__), subpackage)]
        sys.modules[package] = stub
    return importlib.import_module(f"{package}.{name}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--items", type=int, default=3417)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--architectures", nargs="+", default=["recblr", "sasrec"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    encoder_mod = import_without_torchrec("modules", "encoder")
    sasrec_mod = import_without_torchrec("modules", "sasrec")
    full_softmax_loss = import_without_torchrec("training", "losses").full_softmax_loss

    device = torch.device("cuda")
    batch, steps = args.batch, args.length
    ids = torch.randint(1, args.items, (batch * steps,), device=device)
    offsets = torch.arange(batch + 1, device=device) * steps
    rows = offsets[1:] - 1
    targets = torch.randint(1, args.items, (batch,), device=device)
    results = {"batch": batch, "length": steps, "precision": args.precision, "device": torch.cuda.get_device_name()}
    for arch in args.architectures:
        torch.manual_seed(0)
        if arch == "recblr":
            encoder = encoder_mod.RecBLREncoder(encoder_mod.RecBLRConfig(scan_backend="triton"))
        else:
            encoder = sasrec_mod.SASRecEncoder(sasrec_mod.SASRecConfig(max_len=steps))
        table = nn.Embedding(args.items, 64)
        model = nn.ModuleDict({"table": table, "encoder": encoder}).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "bf16")

        def step(encoder=encoder, table=table, optimizer=optimizer, autocast=autocast):
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                hidden = encoder(table(ids), offsets=offsets, rows=rows)
                loss = full_softmax_loss(hidden, targets, table.weight)
            loss.backward()
            optimizer.step()

        for _ in range(3):
            step()
        times = []
        for _ in range(args.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        ops = []
        for event in prof.key_averages():
            cuda_us = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0))
            self_us = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0))
            if self_us > 0:
                ops.append({"op": event.key, "self_cuda_ms_per_step": self_us / 3e3, "cuda_ms_per_step": cuda_us / 3e3})
        ops.sort(key=lambda o: -o["self_cuda_ms_per_step"])
        results[arch] = {"step_ms": statistics.median(times), "ops": ops[:40]}
        print(f"{arch}: step {statistics.median(times):.2f} ms (encoder + table + loss + Adam, no TorchRec)")
        for o in ops[:25]:
            print(f"  {o['self_cuda_ms_per_step']:7.3f} ms  {o['op'][:100]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
