"""Data path: source files -> CSR sequences -> leave-one-out samples -> jagged ``Batch``."""

from .batches import (
    ITEM_HISTORY,
    Batch,
    SampleBatches,
    Samples,
    evaluation_samples,
    make_batch,
    make_loader,
    training_samples,
)
from .readers import DataFormatError, read_interactions
from .sequences import SequenceData, build_sequences, load_sequences

__all__ = [
    "ITEM_HISTORY",
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
