"""The dense optimizer (and the local table's), chosen by ``train.optimizer``."""

from typing import Callable, Iterable

import torch

from ..config import TrainConfig

ADAGRAD_EPS = 1e-10  # torch.optim.Adagrad's default; the fused Adagrad is given the same


def optimizer_factory(train: TrainConfig) -> Callable[[Iterable], torch.optim.Optimizer]:
    """``params -> optimizer`` for ``train.optimizer`` (adam, adamw, adagrad or sgd) at ``train.lr``
    with ``train.weight_decay`` (added to the gradient, except for adamw: decoupled).

    With ``train.cuda_graphs`` Adam and AdamW are built ``capturable`` (step counts on the device).
    """
    name, lr, decay = train.optimizer, train.lr, train.weight_decay
    capturable = train.cuda_graphs
    if name == "adam":
        return lambda params: torch.optim.Adam(params, lr=lr, weight_decay=decay, capturable=capturable)
    if name == "adamw":
        return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=decay, capturable=capturable)
    if name == "adagrad":
        return lambda params: torch.optim.Adagrad(params, lr=lr, weight_decay=decay, eps=ADAGRAD_EPS)
    if name == "sgd":
        return lambda params: torch.optim.SGD(params, lr=lr, weight_decay=decay)
    raise ValueError(f"train.optimizer={name!r}; choose adam, adamw, adagrad or sgd")
