"""Whole training steps replayed as CUDA graphs (``train.cuda_graphs``).

The training step on an H200 is bound by the host: ~1,200 operators (kernel launches and the Python
of autograd, the TorchRec lookup and Adam) take longer than the GPU's work (docs/benchmarks.md).
A CUDA graph records the step's kernels once (forward, backward and the optimizer update) and
replays them with one launch. That needs a step without host syncs (the trainer's is, see
``Trainer.update``) and fixed shapes: batches padded to a few position counts
(``SampleBatches(pad_quantum=...)``), one graph for each shape that repeats. An all-positions
batch's target count varies inside a shape: its padded batches take the loss at every position and
the loss ignores the fillers' padding targets (``full_softmax_loss(..., ignore_padding=True)``).

``GraphedStep(step)`` wraps ``step(batch, *tensors) -> loss`` (zero_grad, forward, backward and
``optimizer.step()``; the optimizer built with ``capturable=True``); ``tensors`` are further inputs
(the sharded step's looked-up rows, ``distributed.dense_step``) and the result may be a tuple of
tensors. Each replay's results are copies (the next replay overwrites the graph's). For a batch of a new shape it
runs ``step`` eagerly ``warmup`` times (real updates, on a side stream as CUDA graphs require);
at the next batch of that shape it captures ``step`` on a copy of the batch and replays it. Later
batches of that shape are copied into the captured copy and replayed. Shapes beyond
``max_graphs`` stay eager. If a capture fails (an op that syncs or allocates pinned memory, say),
the step warns once, names the error, and runs eagerly from then on. The graphs share one memory
pool (they never run at once, and each writes its gradients and activations before reading them),
so it holds about one step's activations plus each graph's gradients and loss, whatever the number
of graphs; eager steps of other shapes allocate from the ordinary pool beside it.

Example::

    >>> task = NextItemTask(model, check_targets=False)                       # doctest: +SKIP
    >>> optimizer = torch.optim.Adam(model.parameters(), capturable=True)    # doctest: +SKIP
    >>> def step(batch):
    ...     optimizer.zero_grad(set_to_none=True)
    ...     loss, _ = task(batch)
    ...     loss.backward()
    ...     optimizer.step()
    ...     return loss.detach()
    >>> graphed = GraphedStep(step)                                             # doctest: +SKIP
    >>> for batch in loader:                                                    # doctest: +SKIP
    ...     total += graphed(batch.to("cuda", non_blocking=True))
"""

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..data.batch import Batch

StepFn = Callable[..., Union[Tensor, Tuple[Tensor, ...]]]


def _kjt_tensors(kjt: Optional[KeyedJaggedTensor]) -> List[Tensor]:
    """The tensors a step reads from a KeyedJaggedTensor: values, lengths, offsets and weights."""
    if kjt is None:
        return []
    tensors = [kjt.values(), kjt.lengths(), kjt.offsets()]
    weights = kjt.weights_or_none()
    return tensors + ([weights] if weights is not None else [])


def batch_tensors(batch: Batch) -> List[Tensor]:
    """Every tensor of ``batch`` in a fixed order (a captured copy is refilled in this order)."""
    tensors = _kjt_tensors(batch.item_history) + [batch.targets, batch.user_ids] + _kjt_tensors(batch.context)
    return tensors + [t for t in (batch.candidate_log_q, batch.target_rows, batch.target_total) if t is not None]


def batch_signature(batch: Batch) -> Hashable:
    """What a captured graph depends on: every tensor's shape and dtype, and the host-side ints and
    keys the step reads (the KeyedJaggedTensors' keys and per-key lengths; the global target count
    unless the batch carries it as a tensor, ``Batch.target_total``)."""
    tensors = tuple((tuple(t.shape), t.dtype, t.device) for t in batch_tensors(batch))
    kjts = tuple(
        (tuple(k.keys()), tuple(k.length_per_key()), k.weights_or_none() is None)
        for k in (batch.item_history, batch.context)
        if k is not None
    )
    flags = (batch.candidate_log_q is None, batch.target_rows is None, batch.context is None)
    total = batch.global_targets if batch.target_total is None else None
    return tensors, kjts, flags, total


def _copy_kjt(kjt: Optional[KeyedJaggedTensor]) -> Optional[KeyedJaggedTensor]:
    if kjt is None:
        return None
    weights = kjt.weights_or_none()
    return KeyedJaggedTensor(
        keys=kjt.keys(),
        values=kjt.values().clone(),
        weights=None if weights is None else weights.clone(),
        lengths=kjt.lengths().clone(),
        offsets=kjt.offsets().clone(),
        length_per_key=list(kjt.length_per_key()),
    )


def copy_batch(batch: Batch) -> Batch:
    """A copy of ``batch`` with its own tensors (lengths and offsets both materialised)."""
    return Batch(
        item_history=_copy_kjt(batch.item_history),
        targets=batch.targets.clone(),
        user_ids=batch.user_ids.clone(),
        candidate_log_q=None if batch.candidate_log_q is None else batch.candidate_log_q.clone(),
        global_targets=batch.global_targets,
        context=_copy_kjt(batch.context),
        target_rows=None if batch.target_rows is None else batch.target_rows.clone(),
        filler_rows=batch.filler_rows,
        target_total=None if batch.target_total is None else batch.target_total.clone(),
    )


def _signature(batch: Batch, tensors: Sequence[Tensor]) -> Hashable:
    return batch_signature(batch), tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    statics: List[Tensor]  # the captured copy's tensors and the further inputs', in the order replays refill them
    result: Union[Tensor, Tuple[Tensor, ...]]  # written by each replay

    @torch.no_grad()
    def replay(self, batch: Batch, tensors: Sequence[Tensor]) -> Union[Tensor, Tuple[Tensor, ...]]:
        for static, new in zip(self.statics, batch_tensors(batch) + list(tensors)):
            static.copy_(new, non_blocking=True)
        self.graph.replay()
        if isinstance(self.result, Tensor):  # the next replay overwrites the results
            return self.result.clone()
        return tuple(t.clone() for t in self.result)


class GraphedStep:
    """``step(batch) -> loss`` replayed from CUDA graphs, one per repeating batch shape (module docs).

    Counters for reports: ``replays``, ``eager_steps``, ``captures``; ``failure`` holds the error
    that turned graphs off, if any.
    """

    def __init__(self, step: StepFn, warmup: int = 2, max_graphs: int = 8):
        if warmup < 1:
            raise ValueError(f"warmup={warmup}: a shape needs at least one eager step before its capture")
        self.step = step
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graphs: Dict[Hashable, _Captured] = {}
        self.seen: Dict[Hashable, int] = {}
        self.replays = self.eager_steps = self.captures = 0
        self.failure: Optional[str] = None
        self._stream: Optional[torch.cuda.Stream] = None
        self._pool: Optional[Tuple[int, int]] = None

    def __call__(self, batch: Batch, *tensors: Tensor) -> Union[Tensor, Tuple[Tensor, ...]]:
        key = _signature(batch, tensors)
        captured = self.graphs.get(key)
        if captured is not None:
            self.replays += 1
            return captured.replay(batch, tensors)
        self.seen[key] = self.seen.get(key, 0) + 1
        can_capture = self.failure is None and len(self.graphs) < self.max_graphs
        if can_capture and self.seen[key] > self.warmup:
            captured = self._capture(batch, tensors)
            if captured is not None:
                self.graphs[key] = captured
                self.replays += 1
                return captured.replay(batch, tensors)
        self.eager_steps += 1
        if not can_capture:
            return self.step(batch, *tensors)
        return self._on_side_stream(lambda: self.step(batch, *tensors))

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _on_side_stream(self, fn: Callable[[], Any]) -> Any:
        """``fn`` on the side stream that captures use (their warm-up must run there), ordered
        after the current stream's work and before its next; its results marked as used by the
        current stream (their memory is not reused on the side stream before that is done)."""
        side, current = self._side_stream(), torch.cuda.current_stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = fn()
        current.wait_stream(side)
        for tensor in [out] if isinstance(out, Tensor) else out:
            tensor.record_stream(current)
        return out

    def _capture(self, batch: Batch, tensors: Sequence[Tensor]) -> Optional[_Captured]:
        inputs = copy_batch(batch)
        statics = [t.detach().clone() for t in tensors]
        graph = torch.cuda.CUDAGraph()
        torch.cuda.current_stream().synchronize()  # the copy and earlier steps done before capture
        generator = torch.cuda.default_generators[torch.cuda.current_device()]
        saved = generator.clone_state() if hasattr(generator, "clone_state") else None
        try:
            # thread_local: the DataLoader's pin-memory thread may call CUDA while this captures
            with torch.cuda.graph(
                graph, pool=self._pool, stream=self._side_stream(), capture_error_mode="thread_local"
            ):
                result = self.step(inputs, *statics)
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager steps
            self.failure = f"{type(error).__name__}: {error}"
            warnings.warn(f"CUDA graph capture failed, training steps stay eager: {self.failure}", stacklevel=3)
            torch.cuda.synchronize()
            if saved is not None:  # a failed capture leaves the generator mid-capture: its state before it
                generator.graphsafe_set_state(saved)
            return None
        self.captures += 1
        if self._pool is None:
            self._pool = graph.pool()
        return _Captured(graph, batch_tensors(inputs) + statics, result)

    def stats(self) -> Dict[str, Any]:
        return {
            "graphs": len(self.graphs),
            "captures": self.captures,
            "replays": self.replays,
            "eager_steps": self.eager_steps,
            "failure": self.failure,
        }
