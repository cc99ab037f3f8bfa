"""``train.ema_decay``: an exponential moving average of the model's weights, the weights a run
validates, keeps as its best model and serves.

After every optimizer update each averaged weight moves towards the trained one:
``average = decay_n * average + (1 - decay_n) * weight`` with ``decay_n = min(ema_decay,
(1 + n) / (10 + n))`` at update ``n``, so the first updates are not outweighed by the
initialisation. The average lives beside the model (a second copy of its parameters, on the same
device) and is updated outside any captured CUDA graph, in place; validating swaps it into the
parameters' own storage and back, so graphs captured on those tensors stay valid. Training
checkpoints hold it (resuming continues it); the best model's file holds it as the model.
"""

import contextlib
from typing import Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn


class WeightAverage:
    """The moving average of ``model``'s parameters (module docstring)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        named = list(model.named_parameters())
        self.names: List[str] = [name for name, _ in named]
        self.params: List[Tensor] = [param.detach() for _, param in named]  # views of the trained storage
        self.average: List[Tensor] = [param.clone() for param in self.params]

    def rate(self, updates: int) -> float:
        """The decay applied at update ``updates`` (1-based): ``ema_decay``, less while the run is young."""
        return min(self.decay, (1.0 + updates) / (10.0 + updates))

    @torch.no_grad()
    def update(self, updates: int) -> None:
        """Moves the average towards the current weights; ``updates``: optimizer steps so far."""
        torch._foreach_lerp_(self.average, self.params, 1.0 - self.rate(updates))

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the parameters' storage inside the block (the average holds the
        trained ones meanwhile); exchanged back after it."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        """Exchanges weights and average in place, one tensor at a time (at most one extra tensor held)."""
        for param, average in zip(self.params, self.average):
            trained = param.clone()
            param.copy_(average)
            average.copy_(trained)

    def state_dict(self) -> Dict[str, Tensor]:
        """The averaged parameters by name: a training checkpoint's ``average``; laid over the model's
        state dict, the best model's weights (``checkpoint.LocalCheckpoints.save``)."""
        return {name: average for name, average in zip(self.names, self.average)}

    @torch.no_grad()
    def load_state_dict(self, state: Optional[Dict[str, Tensor]]) -> None:
        """The saved average; ``None`` (a checkpoint without one) starts it from the current weights."""
        if state is None:
            torch._foreach_copy_(self.average, self.params)
            return
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"the averaged weights lack {', '.join(missing[:3])}")
        for name, average in zip(self.names, self.average):
            average.copy_(state[name])
