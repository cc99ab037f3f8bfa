"""Model building blocks: the BD-LRU block, the RecBLR encoder and the TorchRec model."""

from .encoder import RecBLRConfig, RecBLREncoder, RecBLRLayer, init_weights, set_scan_backend
from .gated_recurrent import GatedRecurrent
from .recblr import RecBLR, last_positions

__all__ = [
    "GatedRecurrent",
    "RecBLR",
    "RecBLRConfig",
    "RecBLREncoder",
    "RecBLRLayer",
    "init_weights",
    "last_positions",
    "set_scan_backend",
]
