"""The sharded placement: what the one Trainer uses when torchrun / TorchX launch it.

The item table (and the context table) are built on ``meta`` and sharded by
DistributedModelParallel as the planner and ``distributed.sharding_types`` decide, their fused
optimizer running in backward beside the dense optimizer; or, where no fused optimizer updates them
as the dense one would (``distributed.sharding.table_training``), replicated and trained by the
dense optimizer. The dense part is replicated (DDP).
Each rank takes its slice of every global batch, metrics are summed over the process group,
checkpoints are DCP folders, and on GPU TrainPipelineSparseDist overlaps the next batches' copy
and input all-to-all with the current step. A pipelined step runs its dense part (everything after
the lookups, the dense update included) as one ``DenseStep``, replayed from CUDA graphs under
``train.cuda_graphs`` (``dense_step.py``).
"""

from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..checkpoint import ShardedCheckpoints
from ..config import Pipeline, RunConfig, TrainConfig
from ..data.batch import Batch
from ..errors import ConfigError
from ..modules import SequenceRecommender
from .dense_step import DenseStep, TablesOnly, split_optimizer, tables_trained_densely
from .env import DistEnv, init_distributed
from .sharding import build_optimizer, shard_model, table_training

if TYPE_CHECKING:
    from ..training.trainer import Trainer


class ShardedPlacement:
    """One rank of a DistributedModelParallel run (module docstring)."""

    loss_dtype = torch.float64  # the ranks' shares of each step, summed exactly enough to all-reduce

    def __init__(self, env: DistEnv, config: RunConfig):
        self.env = env
        self.device = env.device
        self.rank, self.world_size, self.is_main = env.rank, env.world_size, env.is_main
        self.backend = env.backend
        self.process_group = dist.group.WORLD
        self.tables = table_training(config.distributed, config.train, env.device)
        self.notice = self.tables.notice
        # Sharded tables are materialised by DMP, each rank its shards, and the loss looks the catalog
        # up with the histories through them; replicated ones are built as in one process, read directly.
        self.table_device = torch.device("meta") if self.tables.sharded else None
        self.catalog_in_batch = self.tables.sharded
        pipeline = config.distributed.pipeline
        wanted = pipeline is Pipeline.SPARSE_DIST or (pipeline is Pipeline.AUTO and env.device.type == "cuda")
        self.use_pipeline = wanted and self.tables.sharded  # it overlaps the sharded lookups' input distribution
        # train.cuda_graphs (auto or on) captures the dense part of a pipelined step (distributed/dense_step.py),
        # whose tables all train in FBGEMM's fused optimizer (a replicated one trains with the dense optimizer)
        dc = config.distributed
        replicated = "data_parallel" in dc.sharding_types.values() or "dense" in dc.compute_kernels.values()
        self.captures_steps = self.use_pipeline and env.device.type == "cuda" and not replicated
        self.dense_step: Optional[DenseStep] = None  # built at the first epoch, its graphs kept for the next
        self.whole_steps = replicated  # the pipeline runs whole steps (through DDP and the whole optimizer)
        self.dense_group = None  # the dense step's all-reduce, apart from the pipeline's collectives
        if self.use_pipeline and not replicated and self.world_size > 1:
            self.dense_group = dist.new_group(backend=env.backend)

    @classmethod
    def join(cls, config: RunConfig) -> "ShardedPlacement":
        """Joins the process group torchrun described (gloo on CPU, NCCL on GPU)."""
        dc = config.distributed
        return cls(init_distributed(dc.backend.value, dc.timeout_s, config.train.device), config)

    def check(self, config: RunConfig) -> None:
        """Refuses what a sharded run cannot do, naming the fix."""
        if config.train.micro_batch_size:
            raise ConfigError(
                "train.micro_batch_size is for one-process runs: the fused sparse optimizer updates the tables in "
                "every backward, so micro-batches would not give the whole batch's update; set it to 0"
            )
        if config.train.ema_decay:
            raise ConfigError(
                f"train.ema_decay={config.train.ema_decay} is for one-process runs (the weight average is kept "
                "beside the model, not sharded with its tables); set train.ema_decay=0 for a sharded run"
            )
        if config.train.cuda_graphs == "on" and not self.captures_steps:
            raise ConfigError(
                "train.cuda_graphs=on captures the dense part of a pipelined sharded step on a GPU, but this run "
                f"has {'no pipeline' if self.device.type == 'cuda' else 'no GPU'} ({self.notice}); "
                "set train.cuda_graphs=auto or off"
            )

    def wrap(self, task: nn.Module, config: RunConfig) -> nn.Module:
        return shard_model(task, config.distributed, config.train, self.env, self.tables)

    def recommender(self, module: nn.Module) -> SequenceRecommender:
        return module.module.model

    def optimizer(self, module: nn.Module, train: TrainConfig):
        return build_optimizer(module, train)

    def model_state(self, module: nn.Module) -> Dict[str, Any]:
        return module.state_dict()

    def load_model_state(self, module: nn.Module, state: Dict[str, Any]) -> None:
        module.load_state_dict(state)

    def optimizer_template(self, optimizer) -> Dict[str, Any]:
        """The optimizers' state to load a checkpoint into (DCP loads in place)."""
        _, dense = split_optimizer(optimizer)  # the dense optimizer's state exists only after a step
        if not dense.state:
            dense.init_state()  # a zero-gradient step: creates the state, leaves the weights as they are
        return optimizer.state_dict()

    def load_optimizer(self, optimizer, state: Dict[str, Any], train: TrainConfig) -> None:
        """The saved states as they were (their learning rates included: the fused tables' are set
        when the tables are built)."""
        optimizer.load_state_dict(state)

    def checkpoints(self, output_dir: str) -> ShardedCheckpoints:
        return ShardedCheckpoints(output_dir, self.rank)

    def steps(self, loader: Iterable[Batch], trainer: "Trainer") -> Iterator[Tensor]:
        """Each step's loss on this rank (``world_size`` times its share of the global mean):
        plain steps, or TrainPipelineSparseDist's with the dense part as one ``DenseStep``."""
        if not self.use_pipeline:
            for batch in loader:
                yield trainer.train_step(batch)
            return
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        task = trainer.module.module  # past DDP: the dense step averages the dense gradients itself
        if self.dense_step is None and not self.whole_steps:
            if tables_trained_densely(task, trainer.optimizer):  # the planner replicated a table
                self.whole_steps = True
                if self.is_main:
                    print(
                        "a table is replicated (data_parallel) and trains with the dense optimizer: the pipelined "
                        "steps run whole, eagerly (train.cuda_graphs has no effect)",
                        flush=True,
                    )
            else:
                graphed = trainer.config.train.cuda_graphs == "on"
                self.dense_step = DenseStep(
                    task, trainer.optimizer, self.world_size, trainer.autocast, graphed, self.dense_group
                )
        if self.whole_steps:
            pipeline = TrainPipelineSparseDist(trainer.module, trainer.optimizer, self.device)
        else:
            task.dense_step = self.dense_step
            pipeline = TrainPipelineSparseDist(
                trainer.module, TablesOnly(trainer.optimizer), self.device, custom_model_fwd=task
            )
        iterator = iter(loader)
        try:
            while True:
                try:
                    with trainer.autocast():  # forward and backward both run inside progress()
                        stats = pipeline.progress(iterator)
                except StopIteration:
                    return
                yield stats[0]
        finally:
            pipeline.detach()  # the sharded modules' own forwards back, for evaluation
            task.dense_step = None

    def all_reduce(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor)  # NCCL reduces GPU tensors: the trainer's sums live on the device
        return tensor

    def gather(self, value: Any) -> List[Any]:
        values: List[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        dist.destroy_process_group()
