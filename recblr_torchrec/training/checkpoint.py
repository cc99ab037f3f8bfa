"""Local checkpoints: written atomically every epoch, so a crashed run resumes where it stopped."""

import os
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

LAST = "last.pt"
BEST = "best.pt"


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def save_atomic(obj: Dict[str, Any], path: str) -> None:
    """torch.save to a temporary name then rename: a crash never leaves a truncated file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state(device: torch.device) -> Dict[str, Any]:
    """The generators a resumed run must continue: torch's CPU one, numpy's, Python's and, for a
    CUDA ``device``, that device's (the dropout of GPU runs draws there; each rank has its own)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and device.type == "cuda":  # absent in CPU runs' checkpoints
        torch.cuda.set_rng_state(state["cuda"], device)


def load_checkpoint(path: str) -> Optional[Dict[str, Any]]:
    """The checkpoint at ``path``, or None when there is none."""
    if not os.path.isfile(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a corrupt file must not be silently retrained over
        raise RuntimeError(
            f"checkpoint {path} cannot be read ({error}); move it away to start over, or restore it"
        ) from error
