"""Serving: TorchScript artifacts that score whole histories and advance a user's state one event at a time.

``python launchers/export.py --checkpoint RUN_OR_FILE --output-dir DIR`` writes DIR/scorer.pt,
DIR/step.pt and DIR/manifest.json; docs/serving.md describes the contract and the state layout.
"""

from .artifacts import CatalogModule, RecBLRScorer, RecBLRStep
from .export import export, model_from_source, serving_modules

__all__ = [
    "CatalogModule",
    "RecBLRScorer",
    "RecBLRStep",
    "export",
    "model_from_source",
    "serving_modules",
]
