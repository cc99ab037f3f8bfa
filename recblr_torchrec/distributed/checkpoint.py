"""Distributed checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is a DCP folder ``checkpoints/dcp/step-<global step>`` holding the sharded tables
(each rank writes its shards), the dense parameters, both optimizers' states (the fused sparse
one, sharded like its tables, and the dense one), the training progress (epoch, batch within
the epoch, early-stopping state, history) and every rank's RNG states. ``LATEST`` names the
newest complete one: it is replaced (atomically, by rank 0) only after every rank has written,
so a crash during a save leaves the previous checkpoint in force.
"""

import os
import pickle
import shutil
from typing import Any, Dict, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

LATEST = "LATEST"
KEEP = 2


def dcp_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints", "dcp")


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint folder under ``root``, or None."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(root, f.read().strip())
    if not os.path.isdir(path):
        raise RuntimeError(f"{pointer} names {path}, which does not exist; remove {pointer} to start over")
    return path


def save(state: Dict[str, Any], objects: Dict[str, Any], root: str, name: str, keep: int = KEEP) -> str:
    """Writes ``state`` (tensors, ShardedTensors) plus pickled ``objects`` as checkpoint ``name``.

    ``objects`` keys that differ by rank (``rank<r>``) are written by their rank only. The newest
    ``keep`` checkpoints under ``root`` are kept (a 10M-row table is gigabytes per copy).
    """
    path = os.path.join(root, name)
    full = dict(state)
    full.update({key: pickle.dumps(value) for key, value in objects.items()})
    dcp.save(full, checkpoint_id=path)
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = os.path.join(root, f"{LATEST}.tmp")
        with open(tmp, "w") as f:
            f.write(name)
        os.replace(tmp, os.path.join(root, LATEST))
        old = sorted(d for d in os.listdir(root) if d.startswith("step-") and d != name)
        for stale in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    dist.barrier()
    return path


def load(state: Dict[str, Any], object_keys: list, path: str) -> Dict[str, Any]:
    """Loads checkpoint ``path`` into ``state`` in place; returns the unpickled objects.

    Objects the checkpoint lacks are left out of the result (a rank that did not exist when it
    was written: DCP reshards the tables for the new world size, per-rank objects cannot be).
    """
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    present = [key for key in object_keys if key in saved]
    full = dict(state)
    full.update({key: b"" for key in present})
    dcp.load(full, checkpoint_id=path)
    for key in state:
        state[key] = full[key]
    return {key: pickle.loads(full[key]) for key in present}
