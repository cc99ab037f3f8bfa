"""Model building blocks: the BD-LRU block, the RecBLR and SASRec-style encoders, and the
sequence recommender (TorchRec item table + an encoder) that trains and serves them."""

from .gated_recurrent import GatedRecurrent
from .recblr import RecBLRConfig, RecBLREncoder, RecBLRLayer, set_kernels
from .recommender import (
    ContextConfig,
    EncoderKind,
    ModelConfig,
    SequenceRecommender,
    init_weights,
    last_positions,
)
from .sasrec import SASRecConfig, SASRecEncoder

__all__ = [
    "ContextConfig",
    "EncoderKind",
    "GatedRecurrent",
    "ModelConfig",
    "RecBLRConfig",
    "RecBLREncoder",
    "RecBLRLayer",
    "SASRecConfig",
    "SASRecEncoder",
    "SequenceRecommender",
    "init_weights",
    "last_positions",
    "set_kernels",
]
