"""The dense optimizer (and the local table's), chosen by ``train.optimizer``."""

from typing import Callable, Iterable

import torch

from ..config import TrainConfig

ADAGRAD_EPS = 1e-10  # torch.optim.Adagrad's default; the fused Adagrad is given the same


def optimizer_factory(train: TrainConfig) -> Callable[[Iterable], torch.optim.Optimizer]:
    """``params -> optimizer`` for ``train.optimizer`` (adam, adagrad or sgd) at ``train.lr``.

    With ``train.cuda_graphs`` Adam is built ``capturable`` (its step count on the device).
    """
    name, lr, decay = train.optimizer, train.lr, train.weight_decay
    if name == "adam":
        capturable = train.cuda_graphs
        return lambda params: torch.optim.Adam(params, lr=lr, weight_decay=decay, capturable=capturable)
    if name == "adagrad":
        return lambda params: torch.optim.Adagrad(params, lr=lr, weight_decay=decay, eps=ADAGRAD_EPS)
    if name == "sgd":
        return lambda params: torch.optim.SGD(params, lr=lr, weight_decay=decay)
    raise ValueError(f"train.optimizer={name!r}; choose adam, adagrad or sgd")
