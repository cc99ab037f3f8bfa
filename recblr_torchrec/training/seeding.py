"""The random generators of a run: seeded at its start, saved with each checkpoint, restored on resume."""

import random
from typing import Any, Dict

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
