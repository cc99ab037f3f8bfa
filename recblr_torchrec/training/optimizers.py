"""The dense optimizer (and the local table's), chosen by ``train.optimizer``."""

import math
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
        _set_group_lr(group, lr)


def _set_group_lr(group: dict, lr: float) -> None:
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


class RateSchedule:
    """``train.lr_schedule`` and ``train.warmup_steps``: a factor on each parameter group's own
    configured rate (the dense optimizer's and the tables' fused optimizer's may differ), set
    before every update from the run's global step, so a resumed run continues the curve."""

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig, steps_per_epoch: int):
        self.optimizer = optimizer
        self.base = [float(group["lr"]) for group in optimizer.param_groups]
        self.warmup = train.warmup_steps
        self.cosine = train.lr_schedule == "cosine"
        self.total = train.epochs(steps_per_epoch) * steps_per_epoch

    @property
    def active(self) -> bool:
        """False for the paper's constant rate: nothing is set, nothing launched."""
        return self.cosine or self.warmup > 0

    def factor(self, step: int) -> float:
        """The rate of update ``step`` (0-based) over the configured one."""
        rate = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if self.cosine:
            progress = min(max(step - self.warmup, 0) / max(self.total - self.warmup, 1), 1.0)
            rate *= 0.5 * (1.0 + math.cos(math.pi * progress))
        return rate

    def apply(self, step: int) -> None:
        """Sets every group's rate for update ``step`` (nothing for the constant rate)."""
        if not self.active:
            return
        factor = self.factor(step)
        for group, base in zip(self.optimizer.param_groups, self.base):
            _set_group_lr(group, base * factor)
