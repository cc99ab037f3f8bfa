"""Where a run's model lives and how its steps are spread over processes.

This is all that differs between a one-process run and a DistributedModelParallel run; the
:class:`~recblr_torchrec.training.trainer.Trainer` is the same for both. A :class:`Placement`
answers: where the item table is built and whether the loss reads the catalog through the batch
(sharded tables), how the model is wrapped, which optimizers exist, how a step's batches are sliced
(``rank`` of ``world_size``), how metrics are reduced (``process_group``, :meth:`all_reduce`,
:meth:`gather`), how the steps of an epoch run (:meth:`steps`) and which checkpoint layout holds the
run (:meth:`checkpoints`).

:class:`LocalPlacement` is one process on one device; ``recblr_torchrec.distributed.placement``
has the sharded one. :func:`placement_for` picks between them from the environment.
"""

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..checkpoint import LocalCheckpoints
from ..config import RunConfig, TrainConfig
from ..data.batch import Batch
from ..distributed.env import launched_by_torchrun
from ..errors import ConfigError
from ..modules import SequenceRecommender
from .optimizers import graph_lr, optimizer_factory

if TYPE_CHECKING:
    from typing import Protocol

    from .trainer import Trainer

    class Placement(Protocol):
        """What the Trainer asks of a placement (the two implementations are the documentation)."""

        device: torch.device
        rank: int
        world_size: int
        is_main: bool
        backend: str
        process_group: Optional[dist.ProcessGroup]
        table_device: Optional[torch.device]
        catalog_in_batch: bool
        loss_dtype: torch.dtype
        notice: str  # a line the run prints at start ("" for none)
        captures_steps: bool  # whether train.cuda_graphs can capture its training step

        def check(self, config: RunConfig) -> None: ...
        def wrap(self, task: nn.Module, config: RunConfig) -> nn.Module: ...
        def recommender(self, module: nn.Module) -> SequenceRecommender: ...
        def optimizer(self, module: nn.Module, train: TrainConfig) -> Any: ...
        def model_state(self, module: nn.Module) -> Dict[str, Any]: ...
        def load_model_state(self, module: nn.Module, state: Dict[str, Any]) -> None: ...
        def optimizer_template(self, optimizer: Any) -> Dict[str, Any]: ...
        def load_optimizer(self, optimizer: Any, state: Dict[str, Any], train: TrainConfig) -> None: ...
        def checkpoints(self, output_dir: str) -> Any: ...
        def steps(self, loader: Iterable[Batch], trainer: "Trainer") -> Iterator[Tensor]: ...
        def all_reduce(self, tensor: Tensor) -> Tensor: ...
        def gather(self, value: Any) -> List[Any]: ...
        def barrier(self) -> None: ...
        def close(self) -> None: ...


def resolve_execution(config: RunConfig, placement: "Placement") -> RunConfig:
    """The config with ``train.precision: auto`` and ``train.cuda_graphs: auto`` made concrete where
    the run executes: bf16 on a CUDA device that supports it, else fp32; CUDA graphs on a CUDA device,
    in a placement that captures steps, for settings that can be captured (``graph_blockers``)."""
    t = config.train
    cuda = placement.device.type == "cuda"
    changes = {}
    if t.precision == "auto":
        changes["precision"] = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if t.cuda_graphs == "auto":
        changes["cuda_graphs"] = "on" if cuda and placement.captures_steps and not t.graph_blockers() else "off"
    return dataclasses.replace(config, train=dataclasses.replace(t, **changes)) if changes else config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    return device


class LocalPlacement:
    """One process, CPU or one GPU: the unsharded model on the run's device, any torch optimizer."""

    rank, world_size, is_main = 0, 1, True
    backend = "none"
    process_group: Optional[dist.ProcessGroup] = None
    table_device: Optional[torch.device] = None  # the recommender is built on the CPU, then moved
    catalog_in_batch = False  # the full-softmax loss reads the unsharded table directly
    loss_dtype = torch.float32  # the epoch's loss sum, on the device like each step's loss
    notice = ""  # nothing to say at start about where the tables live
    captures_steps = True  # on a CUDA device

    def __init__(self, device: torch.device):
        self.device = device

    def check(self, config: RunConfig) -> None:
        """Refuses what this placement cannot run, naming the fix."""
        if config.train.cuda_graphs == "on" and self.device.type != "cuda":
            raise ConfigError(
                f"train.cuda_graphs=on needs a CUDA device, not {self.device}; set train.cuda_graphs=auto or off"
            )

    def wrap(self, task: nn.Module, config: RunConfig) -> nn.Module:
        return task.to(self.device)

    def recommender(self, module: nn.Module) -> SequenceRecommender:
        return module.model

    def optimizer(self, module: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
        return optimizer_factory(train)(self.recommender(module).parameters())

    def model_state(self, module: nn.Module) -> Dict[str, Tensor]:
        return self.recommender(module).state_dict()

    def load_model_state(self, module: nn.Module, state: Dict[str, Tensor]) -> None:
        self.recommender(module).load_state_dict(state)

    def optimizer_template(self, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
        return {}  # a checkpoint file holds the whole state: nothing to load into

    def load_optimizer(self, optimizer: torch.optim.Optimizer, state: Dict[str, Any], train: TrainConfig) -> None:
        """The saved moments, with this run's learning rate and decay (load_state_dict alone would
        keep the saved ones) and Adam's ``capturable`` as ``train.cuda_graphs`` needs it."""
        capturable = train.cuda_graphs == "on"
        for group in state["param_groups"]:
            group.update(lr=train.lr, weight_decay=train.weight_decay)
            if "capturable" in group:
                group["capturable"] = capturable
        optimizer.load_state_dict(state)
        for group in optimizer.param_groups:  # a graphed step reads its learning rate from the device
            if capturable and "capturable" in group:
                group["lr"] = graph_lr(train.lr, self.device)

    def checkpoints(self, output_dir: str) -> LocalCheckpoints:
        return LocalCheckpoints(output_dir)

    def steps(self, loader: Iterable[Batch], trainer: "Trainer") -> Iterator[Tensor]:
        """Each step's loss (a 0-dim tensor on the device: reading it is the caller's sync)."""
        for batch in loader:
            yield trainer.train_step(batch)

    def all_reduce(self, tensor: Tensor) -> Tensor:
        return tensor

    def gather(self, value: Any) -> List[Any]:
        return [value]

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


def placement_for(config: RunConfig) -> "Placement":
    """The sharded placement under torchrun / TorchX (it joins their process group), else one process."""
    if launched_by_torchrun():
        from ..distributed.placement import ShardedPlacement

        return ShardedPlacement.join(config)
    return LocalPlacement(resolve_device(config.train.device))
