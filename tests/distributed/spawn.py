"""Runs a function on 2 CPU processes with gloo and short timeouts; results come back as pickles."""

import datetime
import os
import pickle
import socket
import sys
import traceback
from typing import Any, Callable, List

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60  # a failure on one rank frees the other within this, not the default 30 minutes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, folder: str, fn: Callable, args: tuple) -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, root)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        result = fn(rank, world, *args)
    except BaseException:
        with open(os.path.join(folder, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
    with open(os.path.join(folder, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_on_ranks(fn: Callable, folder: str, *args: Any, world: int = 2) -> List[Any]:
    """fn(rank, world, *args) on ``world`` processes; returns each rank's result (errors re-raised)."""
    try:
        mp.spawn(_entry, args=(world, free_port(), str(folder), fn, args), nprocs=world, join=True)
    except Exception as error:
        details = [open(os.path.join(folder, n)).read() for n in sorted(os.listdir(folder)) if n.startswith("error")]
        raise AssertionError("\n".join(details) or str(error)) from error
    results = []
    for rank in range(world):
        with open(os.path.join(folder, f"rank{rank}.pkl"), "rb") as f:
            results.append(pickle.load(f))
    return results
