"""The sharded training step with its dense part replayed from a CUDA graph.

TorchRec's sharded lookups cannot be captured: the input distribution reads the batch's lengths on
the host to size its all-to-all, and TrainPipelineSparseDist runs it for the next batch on a side
stream while the current one trains. Everything after the lookups can: the encoder, the loss, their
backward to the looked-up rows and to the dense parameters, the dense gradients' all-reduce and the
dense optimizer, about a thousand kernel launches a step that the host otherwise issues one by one.
So a sharded step has three parts:

1. the lookups, eager, driven by the pipeline (its input distribution overlapped as before);
2. :class:`DenseStep`: from the looked-up rows to their gradients, the dense update included,
   one replay of a CUDA graph per batch shape (``training.graphs.GraphedStep``), or eager;
3. the lookups' backward, eager: the rows' gradients go back through the output all-to-all into
   FBGEMM's fused optimizer, which updates the tables.

Parts 2 and 3 meet in an autograd function whose forward runs part 2 and whose backward hands its
row gradients to the lookups, so the pipeline's own ``backward()`` runs part 3 unchanged. The model
is called past DistributedDataParallel (whose gradient hooks stay idle when its forward is not
called); the dense gradients are summed over the ranks in one flat all-reduce and divided by the
world size, as DDP averages them, in a process group of their own (a captured all-reduce never
meets the pipeline's all-to-alls on one communicator). The pipeline's optimizer is
:class:`TablesOnly`: the fused table optimizer's ``zero_grad``/``step`` (they set its learning
rate), the dense update being in part 2. Tables the dense optimizer trains (``data_parallel``)
would get their gradients after it ran: such a model keeps the whole pipelined step.
"""

from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..data.batch import Batch
from ..training.graphs import GraphedStep
from ..training.task import NextItemTask, dense_loss


def tables_trained_densely(task: NextItemTask, optimizer) -> List[Tensor]:
    """The lookup tables' parameters that ``optimizer``'s dense half trains (replicated tables:
    ``data_parallel``, or a ``dense`` compute kernel); empty when FBGEMM's fused optimizer trains
    every table, as the dense step needs."""
    model = task.model
    lookups = [m for m in (model.item_embeddings, model.context_embeddings) if m is not None]
    in_lookups = {id(p) for module in lookups for p in module.parameters()}
    _, dense = split_optimizer(optimizer)
    return [p for group in dense.param_groups for p in group["params"] if id(p) in in_lookups]


def split_optimizer(optimizer) -> Tuple[object, torch.optim.Optimizer]:
    """(the fused table optimizer, the dense one) of ``sharding.build_optimizer``'s CombinedOptimizer."""
    optimizers = dict(optimizer._optims)
    return optimizers["sparse"], optimizers["dense"]


class TablesOnly:
    """The optimizer TrainPipelineSparseDist drives when the dense update is part of the dense step:
    only the fused table optimizer's ``zero_grad`` and ``step`` (they read its learning rate; the
    tables themselves are updated in backward)."""

    def __init__(self, optimizer):
        self.tables, _ = split_optimizer(optimizer)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.tables.zero_grad()

    def step(self, closure: Optional[Callable] = None) -> None:
        self.tables.step()


class _Handover(torch.autograd.Function):
    """Forward: the dense step (its own forward and backward); backward: the rows' gradients it
    computed, to the lookups (module docstring)."""

    @staticmethod
    def forward(ctx, step: "DenseStep", batch: Batch, offsets: Tensor, *rows: Tensor):
        loss, stats, *grads = step.run(batch, offsets, *rows)
        ctx.grads = grads
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_stats: Optional[Tensor]):
        grads = [grad * grad_loss for grad in ctx.grads]
        ctx.grads = None
        return (None, None, None, *grads)


class DenseStep:
    """Part 2 of the sharded step (module docstring) for ``task``, with ``optimizer``'s dense half.

    Call it as ``_AfterLookup`` does (``task.dense_step``): ``(batch, history rows, offsets,
    candidate rows or None, pooled context or None) -> (loss, stats)``, the loss differentiable
    with respect to the looked-up rows only. ``graphed``: replay from CUDA graphs
    (``train.cuda_graphs``); else the same step runs eagerly. ``autocast``: the run's autocast
    context factory.
    """

    def __init__(
        self,
        task: NextItemTask,
        optimizer,
        world_size: int,
        autocast: Callable,
        graphed: bool,
        process_group: Optional[dist.ProcessGroup] = None,
    ):
        self.task = task
        _, self.dense = split_optimizer(optimizer)
        self.params: List[Tensor] = [p for group in self.dense.param_groups for p in group["params"]]
        owners = {id(p): (module, name) for module in task.model.modules() for name, p in module._parameters.items()}
        self.slots = [owners[id(p)] for p in self.params]  # where each dense parameter is registered
        if tables_trained_densely(task, optimizer):
            raise ValueError(
                "the dense optimizer trains lookup tables (data_parallel or a dense compute kernel): their gradients "
                "arrive after the dense step; run such a model through its whole pipelined step instead"
            )
        self.world_size = world_size
        self.process_group = process_group
        self.autocast = autocast
        self.graphed = GraphedStep(self._step) if graphed else None
        # which optional rows this model's lookups return: candidates, pooled context
        self.layout = (task.model.candidate_feature, task.model.context_embeddings is not None)

    def __call__(
        self, batch: Batch, history: Tensor, offsets: Tensor, candidates: Optional[Tensor], pooled: Optional[Tensor]
    ) -> Tuple[Tensor, Tensor]:
        rows = [t for t in (history, candidates, pooled) if t is not None]
        return _Handover.apply(self, batch, offsets, *rows)

    def run(self, batch: Batch, offsets: Tensor, *rows: Tensor) -> Tuple[Tensor, ...]:
        return self._step(batch, offsets, *rows) if self.graphed is None else self.graphed(batch, offsets, *rows)

    def _step(self, batch: Batch, offsets: Tensor, *rows: Tensor) -> Tuple[Tensor, ...]:
        """(loss, stats, gradient of each of ``rows``), the dense parameters updated."""
        with torch.enable_grad():  # an autograd function's forward runs without
            leaves = [row.detach().requires_grad_() for row in rows]
            history, *rest = leaves
            candidates = rest.pop(0) if self.layout[0] else None
            pooled = rest.pop(0) if self.layout[1] else None
            # The forward reads aliases of the dense parameters (same storage, fresh autograd leaves): DDP
            # keeps each parameter's gradient accumulator alive, made on the default stream, which a capture
            # may not make wait on it; the gradients reach the parameters below instead
            aliases = [param.detach().requires_grad_() for param in self.params]
            for (module, name), alias in zip(self.slots, aliases):
                module._parameters[name] = alias
            try:
                with self.autocast():
                    loss, stats = dense_loss(self.task, batch, history, offsets, candidates, pooled)
            finally:
                for (module, name), param in zip(self.slots, self.params):
                    module._parameters[name] = param
            grads = torch.autograd.grad(loss, aliases + leaves, allow_unused=True)
        for param, grad in zip(self.params, grads):
            param.grad = grad
        self._average_gradients()
        self.dense.step()
        rows_grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads[len(self.params) :])]
        return (loss.detach(), stats, *rows_grads)

    def _average_gradients(self) -> None:
        """The dense gradients summed over the ranks and divided by their number (DDP's average)."""
        if self.world_size == 1:
            return
        # zeros for a parameter without a gradient: every rank reduces the same buffer
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.process_group)
        flat.div_(self.world_size)
        for param, reduced in zip(self.params, _unflatten_dense_tensors(flat, grads)):
            if param.grad is not None:
                param.grad.copy_(reduced)

    def stats(self) -> dict:
        """The graphs' counters (``GraphedStep.stats``); empty when eager."""
        return {} if self.graphed is None else self.graphed.stats()
