"""Training: the one loop (``trainer``), the placements it runs under (``placement``), the
next-item task that computes every loss (``task``) and the losses' math (``losses``)."""

from .losses import full_softmax_loss, sampled_softmax_loss
from .placement import LocalPlacement
from .task import NextItemTask
from .trainer import Trainer, train

__all__ = ["LocalPlacement", "NextItemTask", "Trainer", "full_softmax_loss", "sampled_softmax_loss", "train"]
