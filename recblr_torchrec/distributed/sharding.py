"""DistributedModelParallel with planner constraints from the config, fused sparse + dense optimizers.

Gradient scale: DDP averages the dense gradients over ranks and TorchRec's all-to-all backward
divides the tables' gradients by the world size too (``comm_ops`` gradient division, on by
default), so both parts average. Each rank's loss is therefore world_size times its share of
the global batch's mean (``NextItemTask(world_size=...)``): the average of those is the
single-process gradient, and one step on 2 ranks equals one local step on the same global
batch (tested).
"""

from typing import Dict, List

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
from ..training.optimizers import ADAGRAD_EPS, optimizer_factory
from .env import DistEnv

_FUSED = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
}


def fused_params(dc: DistributedConfig, train: TrainConfig, device: torch.device) -> Dict[str, object]:
    """The fused (in-backward) optimizer of the sharded tables."""
    if dc.sparse_optimizer == "adam" and device.type != "cuda":
        raise ValueError(
            "distributed.sparse_optimizer=adam: TorchRec has no fused Adam on CPU; "
            "use sgd, adagrad or rowwise_adagrad there"
        )
    params: Dict[str, object] = {
        "optimizer": _FUSED[dc.sparse_optimizer],
        "learning_rate": dc.sparse_lr or train.lr,
        "weight_decay": train.weight_decay,
    }
    if dc.sparse_optimizer in ("adagrad", "rowwise_adagrad"):
        params["eps"] = ADAGRAD_EPS
    if train.weight_decay > 0:
        params.update(_table_weight_decay(dc.sparse_optimizer, train, device))
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
        raise ValueError(
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


def shard_model(module: nn.Module, dc: DistributedConfig, train: TrainConfig, env: DistEnv) -> DistributedModelParallel:
    """Plans (constraints from the config) and shards ``module``'s collections over the ranks.

    ``module``'s collections should be built on ``torch.device("meta")``: DMP materialises only
    each rank's shards. Dense parameters are replicated (DDP).
    """
    params = fused_params(dc, train, env.device)
    sharders: List = [EmbeddingCollectionSharder(params), EmbeddingBagCollectionSharder(params)]
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
