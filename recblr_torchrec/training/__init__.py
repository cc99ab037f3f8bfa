"""Local training: loop, losses, checkpoints, and the per-epoch history."""

from .losses import full_softmax_loss
from .trainer import Trainer, next_item_loss, train

__all__ = ["Trainer", "full_softmax_loss", "next_item_loss", "train"]
