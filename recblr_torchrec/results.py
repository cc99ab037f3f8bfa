"""What a recorded result carries: the versions and commit of the code that produced it, when,
where and by which command (every ``benchmarks/results/*.json``, every export manifest), and the
mean ± standard deviation over seeds that the results tables show."""

import datetime
import json
import os
import platform
import statistics
import subprocess
from typing import Any, Dict, Iterable, Optional

import torch

from . import __version__

OPTIONAL_PACKAGES = ("triton", "torchrec", "fbgemm_gpu")


def versions() -> Dict[str, str]:
    """Python, torch, this package, and triton / torchrec / fbgemm_gpu where installed."""
    found = {"python": platform.python_version(), "torch": torch.__version__, "recblr_torchrec": __version__}
    for name in OPTIONAL_PACKAGES:
        try:
            found[name] = __import__(name).__version__
        except Exception:  # not installed, or without a version attribute
            pass
    return found


def git_commit(root: str) -> str:
    """The commit checked out at ``root``; ``unknown (no git metadata)`` where there is none."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    except OSError:
        return "unknown (no git metadata)"
    return done.stdout.strip() or "unknown (no git metadata)"


def provenance(hardware: str, command: str, root: str, commit: Optional[str] = None) -> Dict[str, Any]:
    """A results JSON's ``provenance``: hardware, versions, commit (``commit``, else ``root``'s),
    the date (UTC) and the command."""
    return {
        "hardware": hardware,
        "versions": versions(),
        "commit": commit or git_commit(root),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def spread(values: Iterable[float]) -> Dict[str, Optional[float]]:
    """``{"mean", "std"}`` over seeds, to 4 decimals (std None for one value), as the tables print them."""
    values = list(values)
    return {
        "mean": round(statistics.mean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else None,
    }


def write_results(path: str, result: Dict[str, Any]) -> None:
    """Writes a results JSON as the repo keeps them (one-space indent, a final newline), making its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
