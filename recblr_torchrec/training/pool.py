"""Training processes sharing the visible GPUs until a deadline: what the experiment scripts
(``scripts/paper_table.py``, ``scripts/tune.py``, ``scripts/recipe_table.py``) run their runs with.

Each run is one ``launchers/train.py`` command with its own output directory, started when a slot
is free on the GPU that holds the fewest of the pool's runs. At the deadline the runs still going
get SIGTERM (then SIGKILL after 20 s): each keeps its last checkpoint, and the launcher resumes it
when the same command runs again, so a long plan advances over several bounded calls.
"""

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

TORCHRUN_VARIABLES = frozenset(
    {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK"}
    | {"ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT"}
)


@dataclass
class Run:
    """One training process: ``name`` for the log lines, ``out`` its output directory (its
    ``train.log`` goes there), ``command`` the argv."""

    name: str
    out: str
    command: List[str]


def visible_gpus() -> List[str]:
    """The GPUs runs are spread over: $CUDA_VISIBLE_DEVICES's list, else every GPU torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def stop(processes: Sequence[subprocess.Popen]) -> None:
    """SIGTERM to all, then SIGKILL to any left after 20 s."""
    for process in processes:
        process.send_signal(signal.SIGTERM)
    end = time.monotonic() + 20
    for process in processes:
        try:
            process.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_pool(
    runs: Sequence[Run],
    parallel: int,
    deadline: float,
    cwd: str,
    on_exit: Optional[Callable[[Run, int], None]] = None,
    min_start_s: float = 60.0,
) -> Tuple[List[str], bool]:
    """Runs ``runs``, ``parallel`` at a time, until ``deadline`` (``time.monotonic()``); none starts
    with less than ``min_start_s`` left. ``on_exit(run, returncode)`` is called as each ends.
    Returns the names of the runs that failed and whether every run ended before the deadline.
    Paths in the commands must be absolute or relative to ``cwd``, where the runs start."""
    queue = list(runs)
    gpus = visible_gpus()
    running: Dict[str, Tuple[Run, subprocess.Popen, Optional[str], object]] = {}
    try:
        return _advance(queue, gpus, running, parallel, deadline, cwd, on_exit, min_start_s)
    finally:  # an error or an interrupt here leaves no run behind
        stop([process for _, process, _, _ in running.values() if process.poll() is None])


def _child_env(gpu: Optional[str]) -> Dict[str, str]:
    """This process's environment for a run, without torchrun's variables (a run started from a
    rank of a torchrun job is a process of its own, not a rank of that job), on ``gpu``."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC_")}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def _advance(queue, gpus, running, parallel, deadline, cwd, on_exit, min_start_s) -> Tuple[List[str], bool]:
    """:func:`run_pool`'s loop; ``running`` (name -> run, process, GPU, log) is the caller's to clean up."""
    failed: List[str] = []
    while queue or running:
        for name, (run, process, _, log) in list(running.items()):
            if process.poll() is not None:
                log.close()
                del running[name]
                print(f"[{name}] exited with {process.returncode}", flush=True)
                if process.returncode != 0:
                    failed.append(name)
                if on_exit is not None:
                    on_exit(run, process.returncode)
        if time.monotonic() > deadline:
            stop([process for _, process, _, _ in running.values()])
            for name, (_, _, _, log) in running.items():
                log.close()
                print(f"[{name}] out of time; the next call resumes it", flush=True)
            return failed, False
        while queue and len(running) < parallel and deadline - time.monotonic() > min_start_s:
            run = queue.pop(0)
            gpu = None
            if gpus:  # the GPU with the fewest of this pool's runs on it
                load = {g: sum(1 for _, _, used, _ in running.values() if used == g) for g in gpus}
                gpu = min(gpus, key=lambda g: load[g])
            os.makedirs(run.out, exist_ok=True)
            log = open(os.path.join(run.out, "train.log"), "a")
            print(f"[{run.name}] gpu {gpu}: {' '.join(run.command)}", flush=True)
            process = subprocess.Popen(run.command, cwd=cwd, env=_child_env(gpu), stdout=log, stderr=subprocess.STDOUT)
            running[run.name] = (run, process, gpu, log)
        if queue and not running and deadline - time.monotonic() <= min_start_s:
            return failed, False
        time.sleep(1)
    return failed, True
