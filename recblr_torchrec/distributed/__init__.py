"""Distributed training: process groups (``env``), sharded collections with DMP and the planner,
fused sparse + dense optimizers (``sharding``), and the sharded placement the one Trainer runs
under torchrun / TorchX (``placement``). Submodules import TorchRec's distributed stack, so
this package imports only the light ``env``."""

from .env import DistEnv, init_distributed, launched_by_torchrun

__all__ = ["DistEnv", "init_distributed", "launched_by_torchrun"]
