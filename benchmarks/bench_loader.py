"""How fast the trainer's loader builds and hands over training batches, on the CPU alone.

A sharded step replayed from CUDA graphs can outrun its loader: at the 10M-item catalog
(``configs/synthetic-10m.yaml``) the GPU needs about 4.4 ms a step, and the loader must hand over a
batch in less ([benchmarks](../docs/benchmarks.md#the-sharded-step-against-the-local-one)). This
script times, for one config and without a GPU:

- ``build``: ``SampleBatches[i]`` in the calling process (gather the histories, draw and
  deduplicate the candidate set, pad to the graph quantum), median milliseconds;
- ``build, np.unique``: the same with the candidate set deduplicated by ``np.unique`` in place
  of ``negatives._sorted_unique`` (the peer, timed in the same run);
- ``loader, N workers``: milliseconds per batch out of ``make_loader`` with ``--workers N ...``
  (the build plus, with workers, the hand-over through shared memory), after warm-up batches;
- ``loader, N workers, a tensor per array``: the same with each of the batch's int64 arrays its
  own tensor (its own shared-memory segment) in place of ``loader._int64_views``'s views of one
  buffer (the peer, in the same run; N > 0).
- ``epochs, N workers``: milliseconds per batch over ``--epochs`` whole epochs from the loader
  the trainer keeps for the run, its workers started once (N > 0);
- ``epochs, N workers, a loader per epoch``: the same with a new loader each epoch, whose workers
  start each epoch (the peer, in the same run). At the 10M-item config's 20 batches an epoch,
  the start is most of an epoch's cost.

Batches are padded as a graphed GPU run pads them (``train.graph_quantum``).

    python benchmarks/bench_loader.py --data-dir DATA --out loader.json
"""

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable, List, Optional
from unittest import mock

import numpy as np
import torch

from recblr_torchrec.config import load_config
from recblr_torchrec.data import SampleBatches, loader, make_loader, negatives, training_samples
from recblr_torchrec.results import provenance
from recblr_torchrec.training.trainer import load_data, training_candidates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_ms(fn: Callable[[int], object], count: int) -> float:
    times = []
    for i in range(count):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def loader_ms(batches: SampleBatches, workers: int, count: int, warmup: int = 3) -> float:
    batches.set_epoch(1)
    it = iter(make_loader(batches, workers))
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(count):
        next(it)
    return 1000 * (time.perf_counter() - start) / count


def epochs_ms(batches: SampleBatches, workers: int, epochs: int, fresh: bool) -> float:
    """Milliseconds per batch over ``epochs`` whole epochs: one loader for all (the trainer's), or
    a new one each epoch (``fresh``); the first epoch is warm-up, as a run starts its workers once."""
    kept = None if fresh else make_loader(batches, workers)
    batches_seen, start = 0, 0.0
    for epoch in range(epochs + 1):
        if epoch == 1:
            batches_seen, start = 0, time.perf_counter()
        batches.set_epoch(epoch)
        for _ in make_loader(batches, workers) if kept is None else kept:
            batches_seen += 1
    return 1000 * (time.perf_counter() - start) / batches_seen


def tensor_per_array(*groups):
    """``loader._int64_views`` without the shared buffer: one tensor per group."""
    return [torch.from_numpy(np.concatenate([np.asarray(a, dtype=np.int64) for a in group])) for group in groups]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "synthetic-10m.yaml"))
    parser.add_argument("--data-dir", default=os.environ.get("RECBLR_DATA_DIR"))
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--batches", type=int, default=12, help="timed batches per row")
    parser.add_argument("--epochs", type=int, default=3, help="timed whole epochs of the epochs rows")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    t = config.train
    data = load_data(config, args.data_dir)
    samples = training_samples(data, config.data.max_len, t.protocol)
    batches = SampleBatches(
        data,
        samples,
        t.batch_size,
        shuffle=True,
        seed=t.seed,
        candidates=training_candidates(config, data, False),
        pad_quantum=t.graph_quantum,
    )
    batches.set_epoch(0)
    count = min(args.batches, len(batches))
    rows = [{"variant": "build", "ms_per_batch": median_ms(batches.__getitem__, count)}]
    with mock.patch.object(negatives, "_sorted_unique", np.unique):
        rows.append({"variant": "build, np.unique", "ms_per_batch": median_ms(batches.__getitem__, count)})
    for workers in args.workers:
        rows.append({"variant": f"loader, {workers} workers", "ms_per_batch": loader_ms(batches, workers, count)})
        if workers:
            with mock.patch.object(loader, "_int64_views", tensor_per_array):  # forked workers inherit it
                ms = loader_ms(batches, workers, count)
            rows.append({"variant": f"loader, {workers} workers, a tensor per array", "ms_per_batch": ms})
    for workers in [w for w in args.workers if w]:
        for fresh, variant in ((False, ""), (True, ", a loader per epoch")):
            ms = epochs_ms(batches, workers, args.epochs, fresh)
            rows.append({"variant": f"epochs, {workers} workers{variant}", "ms_per_batch": ms})
    for row in rows:
        row["ms_per_batch"] = round(row["ms_per_batch"], 3)
        print(f"{row['variant']:40} {row['ms_per_batch']:8.2f} ms a batch", flush=True)
    batch = batches[0]
    shape = {"sequences": int(batch.user_ids.numel()), "positions": int(batch.targets.numel())}
    shape["candidates"] = 0 if batch.candidate_log_q is None else int(batch.candidate_log_q.numel())
    command = "python benchmarks/bench_loader.py " + " ".join(argv if argv is not None else sys.argv[1:])
    hardware = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    result = {"provenance": provenance(hardware, command.strip(), ROOT), "config": config.name, "batch": shape}
    result["rows"] = rows
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
