import importlib.util
import os
import sys

import pytest
import torch

# Triton kernels run on CPU through the interpreter; the variable must be set before any kernel
# is defined, so it is set here, before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def shared_data_dir() -> str:
    """$RECBLR_DATA_DIR, else ../shared/data beside the checkout (as CI lays it out)."""
    candidate = os.environ.get("RECBLR_DATA_DIR") or os.path.join(ROOT, os.pardir, "shared", "data")
    if not os.path.isdir(candidate):
        raise RuntimeError(f"dataset folder {candidate} not found; set RECBLR_DATA_DIR to the shared data folder")
    return os.path.abspath(candidate)


@pytest.fixture(scope="session")
def data_dir() -> str:
    return shared_data_dir()


@pytest.fixture(scope="session")
def golden_path() -> str:
    path = os.path.join(os.path.dirname(shared_data_dir()), "golden", "recblr_public_golden.pt")
    if not os.path.isfile(path):
        raise RuntimeError(f"golden vectors {path} not found beside the data folder")
    return path


@pytest.fixture
def script():
    """Loads one of the repo's scripts, by name, as a module: ``script("tune")``."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
