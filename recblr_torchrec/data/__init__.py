"""Data path: source files -> CSR sequences -> samples (protocols, splits) -> jagged ``Batch``."""

from .batch import Batch
from .features import ITEM_CANDIDATES, ITEM_HISTORY, USER_BUCKET
from .loader import SampleBatches, make_batch, make_loader
from .readers import DataFormatError, read_interactions
from .samples import Samples, evaluation_samples, training_samples
from .sequences import SequenceData, build_sequences, load_sequences

__all__ = [
    "ITEM_CANDIDATES",
    "ITEM_HISTORY",
    "USER_BUCKET",
    "Batch",
    "DataFormatError",
    "SampleBatches",
    "Samples",
    "SequenceData",
    "build_sequences",
    "evaluation_samples",
    "load_sequences",
    "make_batch",
    "make_loader",
    "read_interactions",
    "training_samples",
]
