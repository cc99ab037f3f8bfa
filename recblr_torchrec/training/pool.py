"""Training processes sharing the visible GPUs until a deadline: what the experiment scripts
(``scripts/paper_table.py``, ``scripts/tune.py``, ``scripts/recipe_table.py``) run their runs with.

Each run is one ``launchers/train.py`` command with its own output directory, started when a slot
is free on the GPU that holds the fewest of the pool's runs. At the deadline the runs still going
get SIGTERM (then SIGKILL after 20 s): each keeps its last checkpoint, and the launcher resumes it
when the same command runs again, so a long plan advances over several bounded calls. A run that
fails before the deadline is started again the same way, from its last checkpoint, up to
``retries`` times: a crash that a run did not cause (a node's hiccup, or under MPS another client's
GPU fault, which ends every client of the GPU) then costs the epochs since that checkpoint, while
a run that fails again, at the same place, is reported as failed.

Without MPS, the processes sharing a GPU take turns on it: one process's kernels at a time. With
``mps=True`` (the scripts' ``--mps``) the pool starts a CUDA MPS control daemon of its own and runs
every process as its client, so the small kernels of runs sharing a GPU run side by side.
"""

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..config import resolve_data_dir
from ..errors import ConfigError

TORCHRUN_VARIABLES = frozenset(
    {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK"}
    | {"ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT"}
)
MPS_CONTROL = "nvidia-cuda-mps-control"


@dataclass
class Run:
    """One training process: ``name`` for the log lines, ``out`` its output directory (its
    ``train.log`` goes there), ``command`` the argv."""

    name: str
    out: str
    command: List[str]


def count(text: str, least: int = 1) -> int:
    """An argparse type: a whole number of at least ``least`` (argparse names it in its error)."""
    value = int(text)
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} must be >= {least}")
    return value


def times(text: str) -> int:
    """An argparse type: how many times, 0 or more."""
    return count(text, least=0)


def add_pool_arguments(parser: argparse.ArgumentParser, unit: str = "runs") -> None:
    """The options of the experiment scripts: their data, and how their ``unit`` share the machine
    (:func:`resolve_paths` completes them after parsing)."""
    parser.add_argument("--data-dir", help="the data directory (default: $RECBLR_DATA_DIR)")
    parser.add_argument(
        "--parallel", type=count, default=1, help=f"{unit} at a time (>= 1), spread over the visible GPUs"
    )
    parser.add_argument("--budget-minutes", type=float, default=9.0, help="this call's wall-time limit")
    parser.add_argument(
        "--mps",
        action="store_true",
        help=f"run the {unit} as clients of a CUDA MPS daemon of their own (needs {MPS_CONTROL}), so that the "
        f"kernels of {unit} sharing a GPU run side by side instead of in turns",
    )
    parser.add_argument(
        "--retries",
        type=times,
        default=1,
        help="times a failed run is started again, resuming from its last checkpoint (0: never)",
    )


def resolve_paths(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """``args.data_dir`` resolved (``--data-dir``, else $RECBLR_DATA_DIR; a usage error without
    either), and it and the path options ``names`` made absolute: the runs start in the repo root."""
    args.data_dir = resolve_data_dir(args.data_dir)
    if not args.data_dir:
        parser.error("pass --data-dir or set RECBLR_DATA_DIR")
    for name in ("data_dir", *names):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))


@contextlib.contextmanager
def mps_daemon() -> Iterator[Dict[str, str]]:
    """A CUDA MPS control daemon of the pool's own, its pipe and log folders in a new temporary
    folder; yields the variables that make a process its client, and quits it on exit (after the
    pool's processes have ended)."""
    control = shutil.which(MPS_CONTROL)
    if control is None:
        raise ConfigError(
            f"--mps needs {MPS_CONTROL} (it comes with the NVIDIA driver) on PATH, and none is there: add the "
            "driver's bin folder to PATH, or leave --mps off"
        )
    root = tempfile.mkdtemp(prefix="recblr-mps-")
    client = {
        "CUDA_MPS_PIPE_DIRECTORY": os.path.join(root, "pipe"),
        "CUDA_MPS_LOG_DIRECTORY": os.path.join(root, "log"),
    }
    for folder in client.values():
        os.makedirs(folder)
    env = {**os.environ, **client}
    # The daemon keeps the descriptors it was started with: a file, not a pipe that would never close.
    with open(os.path.join(root, "start.log"), "w+") as out:
        code = subprocess.run([control, "-d"], env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        out.seek(0)
        said = " ".join(out.read().split())
    if code != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(
            f"{control} -d exited with {code} ({said}): leave --mps off, or end the MPS daemon already running here"
        )
    try:
        yield client
    finally:
        try:
            subprocess.run([control], input="quit\n", env=env, text=True, stdout=subprocess.DEVNULL, timeout=60)
        except subprocess.TimeoutExpired:  # the pool's own result or error matters more than a slow quit
            print(f"{control}: no answer to quit within 60 s; its daemon may still run", flush=True)
        shutil.rmtree(root, ignore_errors=True)


def visible_gpus() -> List[str]:
    """The GPUs runs are spread over: $CUDA_VISIBLE_DEVICES's list, else every GPU torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def pool_hardware(parallel: int, mps: bool) -> str:
    """The hardware a pool of runs trained on, for a results JSON's provenance."""
    import torch

    if not torch.cuda.is_available():
        return "CPU"
    gpus = torch.cuda.device_count()
    shared = f"{gpus} x {torch.cuda.get_device_name(0)}, up to {parallel} runs sharing each"
    return shared + " through CUDA MPS" if mps else shared


def run_pool_of_args(runs: Sequence[Run], args: argparse.Namespace, cwd: str) -> Tuple[List[str], bool]:
    """:func:`run_pool` as the options of :func:`add_pool_arguments` in ``args`` say, for this
    call's ``--budget-minutes`` from now."""
    deadline = time.monotonic() + 60 * args.budget_minutes
    return run_pool(runs, args.parallel, deadline, cwd, mps=args.mps, retries=args.retries)


def report_pool(failed: Sequence[str], finished: bool) -> None:
    """Prints how a pool's call ended: the runs that failed, and whether any is left to run."""
    if failed:
        print(f"runs failed: {', '.join(failed)}; see train.log in their folders")
    print("all runs finished" if finished else "more to run: call again")


def pool_provenance(args: argparse.Namespace, script: str, argv: Sequence[str], root: str) -> Dict[str, object]:
    """A results JSON's provenance for ``script``'s call with ``argv`` (``args.commit``: the code's
    commit, where the checkout has no git metadata)."""
    from ..results import provenance

    command = f"python {script} " + " ".join(argv)
    return provenance(pool_hardware(args.parallel, args.mps), command, root, args.commit)


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
    mps: bool = False,
    retries: int = 1,
) -> Tuple[List[str], bool]:
    """Runs ``runs``, ``parallel`` at a time, until ``deadline`` (``time.monotonic()``); none starts
    with less than ``min_start_s`` left. A run that fails is started again (it resumes from its
    last checkpoint) up to ``retries`` times; ``on_exit(run, returncode)`` is called as each ends
    for good (done, or failed with no retry left).
    ``mps``: the runs are clients of an MPS daemon of the pool's own (module docstring).
    Returns the names of the runs that failed and whether every run ended before the deadline.
    Paths in the commands must be absolute or relative to ``cwd``, where the runs start."""
    if retries < 0:
        raise ConfigError(f"retries={retries}: pass 0 (a failed run stays failed) or more")
    queue = list(runs)
    gpus = visible_gpus()
    running: Dict[str, Tuple[Run, subprocess.Popen, Optional[str], object]] = {}
    with mps_daemon() if mps and queue else contextlib.nullcontext({}) as client:
        try:
            return _advance(queue, gpus, running, parallel, deadline, cwd, on_exit, min_start_s, client, retries)
        finally:  # an error or an interrupt here leaves no run behind
            stop([process for _, process, _, _ in running.values() if process.poll() is None])


def _child_env(gpu: Optional[str], extra: Dict[str, str]) -> Dict[str, str]:
    """This process's environment for a run, without torchrun's variables (a run started from a
    rank of a torchrun job is a process of its own, not a rank of that job), on ``gpu``, with
    ``extra`` (the MPS client's variables) added."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC_")}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return {**env, **extra}


def _advance(
    queue, gpus, running, parallel, deadline, cwd, on_exit, min_start_s, extra, retries
) -> Tuple[List[str], bool]:
    """:func:`run_pool`'s loop; ``running`` (name -> run, process, GPU, log) is the caller's to clean up."""
    failed: List[str] = []
    retried: Counter[str] = Counter()  # name -> times started again
    while queue or running:
        for name, (run, process, _, log) in list(running.items()):
            if process.poll() is not None:
                log.close()
                del running[name]
                code = process.returncode
                if code != 0 and retried[name] < retries:
                    retried[name] += 1
                    queue.append(run)
                    print(
                        f"[{name}] exited with {code}; it starts again from its last checkpoint "
                        f"(retry {retried[name]} of {retries}; its train.log has the error)",
                        flush=True,
                    )
                    continue
                print(f"[{name}] exited with {code}", flush=True)
                if code != 0:
                    failed.append(name)
                if on_exit is not None:
                    on_exit(run, code)
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
            process = subprocess.Popen(
                run.command, cwd=cwd, env=_child_env(gpu, extra), stdout=log, stderr=subprocess.STDOUT
            )
            running[run.name] = (run, process, gpu, log)
        if queue and not running and deadline - time.monotonic() <= min_start_s:
            return failed, False
        time.sleep(1)
    return failed, True
