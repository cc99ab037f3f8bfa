"""The distributed environment torchrun/TorchX set up: ranks, device, process group."""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass
class DistEnv:
    """Where this process sits: rank of world_size, its device, and the collective backend."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True under torchrun / TorchX dist.ddp (they export RANK, WORLD_SIZE and MASTER_ADDR)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def _attempt_store(rank: int, world_size: int, attempt: str, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store seen through a prefix unique to this restart attempt.

    After torchrun restarts crashed workers (--max-restarts), the store can still hold the
    previous attempt's gloo addresses under the same keys; the restarted ranks would
    then dial the dead processes' ports and fail (measured). A per-attempt prefix keeps them apart.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=rank == 0 and not agent_store,
        timeout=timeout,
    )
    return dist.PrefixStore(f"recblr/attempt_{attempt}", store)


def init_distributed(backend: str = "auto", timeout_s: int = 600, device: str = "auto") -> DistEnv:
    """Joins the process group torchrun described (env:// rendezvous): gloo on CPU, NCCL on GPU.

    ``timeout_s`` bounds every collective: a failure on one rank (a planner error, a crash)
    frees the others after it instead of the default 10-30 minutes.
    """
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    chosen = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
    if chosen == "nccl" and not use_cuda:
        raise ConfigError("distributed.backend=nccl needs GPUs; use gloo (or auto) on CPU")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs = {"device_id": where} if chosen == "nccl" else {}
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None and attempt != "0":
            kwargs.update(store=_attempt_store(rank, world_size, attempt, timeout), rank=rank, world_size=world_size)
        dist.init_process_group(chosen, timeout=timeout, **kwargs)
    return DistEnv(rank, world_size, local_rank, local_world_size, where, chosen)
