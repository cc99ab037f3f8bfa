"""The tuned recipe (docs/training.md#the-tuned-recipe) as rules: the settings shared by every
dataset, and the ones a dataset's statistics decide.

A new dataset's tuned config is its paper config plus :func:`recipe_settings` of its statistics
(``scripts/recipe_config.py`` writes it); ``configs/<dataset>/recblr-tuned.yaml`` are those files
for the shipped datasets, and a test holds them to these rules.
"""

from typing import Any, Dict

from ..data.loader import batches_per_epoch
from ..data.samples import training_samples
from ..data.sequences import SequenceData
from ..errors import DataError

# The validation-only search's trial t000, the same on every dataset.
SHARED_SETTINGS: Dict[str, Any] = {
    "model.recblr.embedding_dim": 128,
    "model.recblr.num_layers": 4,
    "model.recblr.expand": 1,
    "train.protocol": "all_positions",
    "train.optimizer": "adamw",
    "train.weight_decay": 0.01,
    "train.lr": 0.00277,
    "train.warmup_steps": 200,
    "train.lr_schedule": "cosine",
    "train.max_epochs": 200,
    "train.patience": 20,
    "train.window_context": 0,
}

# Mean items per user under which a dataset gets the short-history regularisation.
SHORT_HISTORY = 50
SHORT_HISTORY_REGULARISATION = {"model.recblr.dropout": 0.5, "train.label_smoothing": 0.3, "model.item_dropout": 0.2}
LONG_HISTORY_REGULARISATION = {"model.recblr.dropout": 0.3, "train.label_smoothing": 0.2, "model.item_dropout": 0.0}

# Batches: the largest power of two up to MAX_BATCH that still gives MIN_UPDATES_PER_EPOCH updates
# (batches, the last one partial) an epoch, so that a dataset of few users is not starved of updates.
MAX_BATCH = 512
MIN_UPDATES_PER_EPOCH = 32

# The maximum length is this many times the paper config's.
LENGTH_FACTOR = 2


def batch_size(windows: int) -> int:
    """The recipe's batch for ``windows`` training windows an epoch: the largest power of two up
    to ``MAX_BATCH`` with at least ``MIN_UPDATES_PER_EPOCH`` batches an epoch (1 if none has)."""
    if windows < 1:
        raise DataError(f"a dataset with {windows} training windows has nothing to train on; check its data file")
    batch = MAX_BATCH
    while batch > 1 and batches_per_epoch(windows, batch) < MIN_UPDATES_PER_EPOCH:
        batch //= 2
    return batch


def dataset_statistics(data: SequenceData, paper_max_len: int) -> Dict[str, Any]:
    """What the rules read from ``data`` (the dataset as its paper config loads it), given the
    paper config's ``data.max_len``: users, mean sequence length, the recipe's maximum length and
    its training windows an epoch."""
    max_len = LENGTH_FACTOR * paper_max_len
    return {
        "users": len(data.lengths),
        "mean_length": float(data.lengths.mean()),
        "max_len": max_len,
        "windows": len(training_samples(data, max_len, "all_positions")),
    }


def short_history(statistics: Dict[str, Any]) -> bool:
    """Whether a dataset of these :func:`dataset_statistics` gets the short-history regularisation."""
    return statistics["mean_length"] < SHORT_HISTORY


def recipe_settings(statistics: Dict[str, Any]) -> Dict[str, Any]:
    """Every setting the recipe sets, as dotted keys, for a dataset of these
    :func:`dataset_statistics`."""
    return {
        **SHARED_SETTINGS,
        **(SHORT_HISTORY_REGULARISATION if short_history(statistics) else LONG_HISTORY_REGULARISATION),
        "data.max_len": statistics["max_len"],
        "train.batch_size": batch_size(statistics["windows"]),
    }
