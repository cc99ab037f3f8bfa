"""The dense optimizer (and the local table's), chosen by ``train.optimizer``."""

from typing import Callable, Iterable

import torch
from torch import Tensor

from ..config import TrainConfig

ADAGRAD_EPS = 1e-10  # torch.optim.Adagrad's default; the fused Adagrad is given the same


def optimizer_factory(train: TrainConfig) -> Callable[[Iterable], torch.optim.Optimizer]:
    """``params -> optimizer`` for ``train.optimizer`` (adam, adamw, adagrad or sgd) at ``train.lr``
    with ``train.weight_decay`` (added to the gradient, except for adamw: decoupled).

    With ``train.cuda_graphs=on`` Adam and AdamW are built ``capturable`` (step counts on the
    device) with the learning rate as a tensor on the device (:func:`set_lr` reaches the replays).
    """
    name, lr, decay = train.optimizer, train.lr, train.weight_decay
    capturable = train.cuda_graphs == "on"
    if name in ("adam", "adamw"):
        adam = torch.optim.Adam if name == "adam" else torch.optim.AdamW

        def build(params: Iterable) -> torch.optim.Optimizer:
            params = list(params)
            rate = graph_lr(lr, params[0].device) if capturable else lr
            return adam(params, lr=rate, weight_decay=decay, capturable=capturable)

        return build
    if name == "adagrad":
        return lambda params: torch.optim.Adagrad(params, lr=lr, weight_decay=decay, eps=ADAGRAD_EPS)
    if name == "sgd":
        return lambda params: torch.optim.SGD(params, lr=lr, weight_decay=decay)
    raise ValueError(f"train.optimizer={name!r}; choose adam, adamw, adagrad or sgd")


def graph_lr(lr: float, device: torch.device) -> Tensor:
    """A learning rate that captured CUDA graphs read at each replay: a 0-dim float32 tensor on ``device``."""
    return torch.tensor(lr, dtype=torch.float32, device=device)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets every group's learning rate: in place where it is a tensor (a graphed step reads it)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
