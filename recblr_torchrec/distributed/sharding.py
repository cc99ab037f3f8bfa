"""DistributedModelParallel with planner constraints from the config, fused sparse + dense optimizers.

Gradient scale: DDP averages the dense gradients over ranks and TorchRec's all-to-all backward
divides the tables' gradients by the world size too (``comm_ops`` gradient division, on by
default), so both parts average. Each rank's loss is therefore world_size times its share of
the global batch's mean (``NextItemTask(world_size=...)``): the average of those is the
single-process gradient, and one step on 2 ranks equals one local step on the same global
batch (tested).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from ..config import DistributedConfig, TrainConfig
from ..errors import ConfigError
from ..training.optimizers import ADAGRAD_EPS, optimizer_factory
from .env import DistEnv

_FUSED = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
}
# The fused optimizer that updates a table as each dense optimizer updates a parameter.
_SAME_AS_DENSE = {"sgd": "sgd", "adagrad": "adagrad", "adam": "adam", "adamw": "adam"}
ADAM_EPS = 1e-8  # torch.optim.Adam's default, which the dense optimizer keeps


@dataclass(frozen=True)
class TableTraining:
    """How a sharded run trains its tables (``distributed.sparse_optimizer``).

    ``optimizer``: the fused optimizer of the sharded tables (``sgd``, ``adagrad``,
    ``rowwise_adagrad``, ``adam``), applied in backward at ``learning_rate``; None: the tables are
    replicated on every rank and trained by the dense optimizer, like every other parameter.
    ``notice``: the one line a run prints about it at start.
    """

    optimizer: Optional[str]
    learning_rate: float
    notice: str

    @property
    def sharded(self) -> bool:
        return self.optimizer is not None


def _why_no_fused_match(optimizer: str, train: TrainConfig, device: torch.device) -> Optional[str]:
    """Why no fused optimizer of FBGEMM updates the tables as the dense ``optimizer`` would; None if one does."""
    if optimizer in ("adam", "adamw") and device.type != "cuda":
        return "TorchRec has no fused Adam on CPU"
    if train.weight_decay > 0 and optimizer in ("sgd", "adagrad"):
        return f"FBGEMM's fused {optimizer} has no weight decay"
    if train.weight_decay > 0 and optimizer == "adam":
        return "train.optimizer=adam adds the weight decay to the gradient, FBGEMM's fused Adam decouples it"
    return None


def table_training(dc: DistributedConfig, train: TrainConfig, device: torch.device) -> TableTraining:
    """The tables' training for ``distributed.sparse_optimizer``.

    ``auto`` (the default) trains them as the local run does: the fused optimizer that updates a
    row as the dense optimizer would (Adam and AdamW: FBGEMM's fused Adam, GPU only; SGD,
    Adagrad: their exact fused kernels) at ``train.lr``, or, where FBGEMM has none, the tables
    replicated and trained by the dense optimizer itself. A named optimizer shards the tables with
    it; one that updates them differently from the dense optimizer needs its own learning rate.
    """
    dense = str(train.optimizer)  # a Choice, or a string set after construction
    if dc.sparse_optimizer == "auto":
        same = _SAME_AS_DENSE[dense]
        why = _why_no_fused_match(dense, train, device)
        if why is None:
            notice = f"tables: sharded, updated by FBGEMM's fused {same} at train.lr={train.lr}, as the dense {dense}"
            return TableTraining(same, train.lr, notice)
        notice = (
            f"tables: replicated on every rank and updated by the dense {dense} at train.lr={train.lr} ({why}); "
            "to shard them name a fused optimizer: distributed.sparse_optimizer and distributed.sparse_lr"
        )
        return TableTraining(None, train.lr, notice)
    chosen = str(dc.sparse_optimizer)
    if chosen == "adam" and device.type != "cuda":
        raise ConfigError(
            "distributed.sparse_optimizer=adam: TorchRec has no fused Adam on CPU; use auto (the tables then "
            "train with the dense optimizer), or sgd, adagrad or rowwise_adagrad with distributed.sparse_lr"
        )
    differs = chosen != _SAME_AS_DENSE[dense]
    if differs and not dc.sparse_lr:
        raise ConfigError(
            f"distributed.sparse_optimizer={chosen} updates the tables differently from train.optimizer={dense}: "
            f"give it its own learning rate with distributed.sparse_lr, or use distributed.sparse_optimizer=auto"
        )
    lr = dc.sparse_lr or train.lr
    notice = f"tables: sharded, updated by FBGEMM's fused {chosen} at distributed.sparse_lr={lr}"
    if differs:
        notice += f"; the dense parameters by {dense} at train.lr={train.lr}"
    return TableTraining(chosen, lr, notice)


def fused_params(tables: TableTraining, train: TrainConfig, device: torch.device) -> Dict[str, object]:
    """The fused (in-backward) optimizer's parameters for sharded ``tables``."""
    optimizer = tables.optimizer
    params: Dict[str, object] = {
        "optimizer": _FUSED[optimizer],
        "learning_rate": tables.learning_rate,
        "weight_decay": train.weight_decay,
    }
    if optimizer in ("adagrad", "rowwise_adagrad"):
        params["eps"] = ADAGRAD_EPS
    if optimizer == "adam":  # torch.optim.Adam's defaults
        params.update(eps=ADAM_EPS, beta1=0.9, beta2=0.999)
    if train.weight_decay > 0:
        params.update(_table_weight_decay(optimizer, train, device))
    return params


def _table_weight_decay(sparse_optimizer: str, train: TrainConfig, device: torch.device) -> Dict[str, object]:
    """What the fused table optimizer needs to apply ``train.weight_decay`` to the tables too.

    FBGEMM's fused SGD and Adagrad have no weight decay, and its CPU kernels ignore it (measured:
    a CPU row-wise Adagrad step is the same with and without it; on the H200 the CUDA kernel
    applies both modes), so a decay that would reach the dense part only is refused. Row-wise
    Adagrad takes it as L2 (``adam``/``adagrad``/``sgd``) or decoupled (``adamw``); the fused Adam
    decouples it always.
    """
    if device.type != "cuda" or sparse_optimizer in ("sgd", "adagrad"):
        where = "on CPU " if device.type != "cuda" else ""
        raise ConfigError(
            f"train.weight_decay={train.weight_decay} would not reach the sharded tables: FBGEMM's fused "
            f"{sparse_optimizer} {where}has no weight decay. Use distributed.sparse_optimizer=rowwise_adagrad "
            "or adam on a GPU, or train.weight_decay=0"
        )
    if sparse_optimizer != "rowwise_adagrad":
        return {}
    try:
        from fbgemm_gpu.tbe.config import WeightDecayMode
    except ImportError:  # FBGEMM 1.6 defines it with the training TBE
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode
    mode = WeightDecayMode.DECOUPLE if train.optimizer == "adamw" else WeightDecayMode.L2
    return {"weight_decay_mode": mode}


def sharding_constraints(dc: DistributedConfig) -> Dict[str, ParameterConstraints]:
    """Planner constraints per table from ``distributed.sharding_types`` / ``compute_kernels``."""
    constraints = {}
    for table in sorted(set(dc.sharding_types) | set(dc.compute_kernels)):
        sharding = dc.sharding_types.get(table)
        default_kernel = "dense" if sharding == "data_parallel" else "fused"  # replicated tables train densely
        constraints[table] = ParameterConstraints(
            sharding_types=[sharding] if sharding else None,
            compute_kernels=[dc.compute_kernels.get(table, default_kernel)],
        )
    return constraints


def shard_model(
    module: nn.Module, dc: DistributedConfig, train: TrainConfig, env: DistEnv, tables: Optional[TableTraining] = None
) -> DistributedModelParallel:
    """Plans (constraints from the config) and shards ``module``'s collections over the ranks
    (``tables``: how they train, default :func:`table_training`'s).

    Sharded collections should be built on ``torch.device("meta")``: DMP materialises only each
    rank's shards. Dense parameters, and the collections of replicated tables, are replicated (DDP).
    """
    tables = tables or table_training(dc, train, env.device)
    if tables.sharded:
        params = fused_params(tables, train, env.device)
        sharders: List = [EmbeddingCollectionSharder(params), EmbeddingBagCollectionSharder(params)]
    elif dc.sharding_types or dc.compute_kernels:
        raise ConfigError(
            "distributed.sharding_types and distributed.compute_kernels place sharded tables, but these are "
            f"replicated ({tables.notice}); drop them, or shard the tables with a fused optimizer "
            "(distributed.sparse_optimizer and distributed.sparse_lr)"
        )
    else:
        sharders = []
    planner = EmbeddingShardingPlanner(
        topology=Topology(env.world_size, env.device.type, local_world_size=env.local_world_size),
        constraints=sharding_constraints(dc),
    )
    plan = planner.collective_plan(module, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(module, device=env.device, plan=plan, sharders=sharders)


def build_optimizer(model: DistributedModelParallel, train: TrainConfig) -> CombinedOptimizer:
    """The tables' fused optimizer (applied in backward) beside the dense one, as one KeyedOptimizer."""
    dense_params = dict(in_backward_optimizer_filter(model.named_parameters()))
    dense = KeyedOptimizerWrapper(dense_params, optimizer_factory(train))
    return CombinedOptimizer([("sparse", model.fused_optimizer), ("dense", dense)])


@torch.no_grad()
def copy_into_sharded(model: nn.Module, full_state: Dict[str, torch.Tensor]) -> None:
    """Loads an unsharded state dict (e.g. a local model's) into a sharded model, shard by shard."""
    for name, value in model.state_dict().items():
        source = full_state[name]
        if hasattr(value, "local_shards"):
            for shard in value.local_shards():
                (row, col), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(source[row : row + rows, col : col + cols])
        else:
            value.copy_(source)
