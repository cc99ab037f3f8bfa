"""The distributed trainer: what launchers/train.py runs under torchrun / TorchX.

Same data, model, loss, metrics and outputs as the local ``Trainer``; the differences are the
sharded collections (DMP), the fused sparse optimizer beside the dense one, each rank's slice
of every global batch, metrics merged over ranks, DCP checkpoints (also mid-epoch, every
``train.checkpoint_every`` steps) and, on GPU, TrainPipelineSparseDist.
"""

import json
import os
import time
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..config import RunConfig
from ..data import SampleBatches, training_samples
from ..data.batches import Batch
from ..evaluation import evaluate
from ..modules import RecBLR
from ..training.checkpoint import restore_rng, rng_state
from ..training.task import NextItemTask
from ..training.trainer import (
    METRICS_JSON,
    Trainer,
    _format_table,
    apply_matmul_precision,
    evaluation_users,
    load_data,
    seed_everything,
    training_candidates,
)
from . import checkpoint
from .env import DistEnv
from .sharding import build_optimizer, shard_model

FAIL_AT_STEP_ENV = "RECBLR_FAIL_AT_STEP"  # tests: crash rank 1 once at this global step


def _no_candidates(targets: np.ndarray, key: int) -> Tuple[np.ndarray, None]:
    return np.empty(0, dtype=np.int64), None


class DistributedTrainer(Trainer):
    """One rank of a distributed run. ``config.train.batch_size`` is the global batch."""

    def __init__(self, config: RunConfig, output_dir: str, data_dir: Optional[str], env: DistEnv):
        if config.train.micro_batch_size:
            raise ValueError(
                "train.micro_batch_size is for local runs: the fused sparse optimizer updates the tables in "
                "every backward, so micro-batches would not give the whole batch's update; set it to 0"
            )
        if config.train.cuda_graphs:
            raise ValueError(
                "train.cuda_graphs is for single-process runs (a sharded step's collectives and input "
                "distribution are not captured here); set train.cuda_graphs=false"
            )
        self.config, self.output_dir, self.env = config, output_dir, env
        self.device = env.device
        seed_everything(config.train.seed)  # identical dense initialisation on every rank
        self.data = load_data(config, data_dir)
        t, e, max_len = config.train, config.eval, config.data.max_len
        rank, world = env.rank, env.world_size
        self.train_batches = SampleBatches(
            self.data,
            training_samples(self.data, max_len, t.protocol),
            t.batch_size,
            shuffle=True,
            seed=t.seed,
            rank=rank,
            world_size=world,
            candidates=training_candidates(config, self.data, distributed=True),
            user_buckets=config.context.user_buckets,
        )
        self.eval_batches = {
            split: SampleBatches(
                self.data,
                evaluation_users(self.data, max_len, split, e.max_users),
                e.batch_size * world,
                shuffle=False,
                rank=rank,
                world_size=world,
                candidates=_no_candidates,
                user_buckets=config.context.user_buckets,
            )
            for split in ("valid", "test")
        }
        meta = torch.device("meta")
        model = RecBLR(self.data.num_items + 1, config.model, meta, candidate_feature=True, context=config.context)
        # The table has a row for every item id of this data and the samplers add every target to
        # the candidates, so the loss's per-step target check (a host sync) is skipped.
        task = NextItemTask(model, world, check_targets=False, label_smoothing=t.label_smoothing)
        self.dmp = shard_model(task, config.distributed, t, env)
        self.model = self.dmp.module.model
        if t.compile != "off":
            self.model.compile_encoder(t.compile)
        apply_matmul_precision(t.precision)
        self.optimizer = build_optimizer(self.dmp, t)
        self.state: Dict[str, Any] = {"epoch": 0, "best": -1.0, "best_epoch": 0, "bad_epochs": 0}
        self.state.update(stopped_early=False, step=0, batch=0, loss_sum=0.0, examples=0, seconds=0.0)
        self.history: list = []
        self.fail_at_step = int(os.environ.get(FAIL_AT_STEP_ENV, "0"))
        self.stop_at_step = 0  # tests: every rank stops (as if killed) after this global step
        if env.is_main:
            os.makedirs(output_dir, exist_ok=True)
        pipeline = config.distributed.pipeline
        self.use_pipeline = pipeline == "sparse_dist" or (pipeline == "auto" and env.device.type == "cuda")

    def evaluate(self, split: str) -> Dict[str, float]:
        e = self.config.eval
        loader = self.loader(self.eval_batches[split])
        return evaluate(self.model, loader, self.device, e.ks, e.item_chunk_size, process_group=dist.group.WORLD)

    # Checkpoints ---------------------------------------------------------------------------

    def _tensor_state(self) -> Dict[str, Any]:
        return {"model": self.dmp.state_dict(), "optimizer": self.optimizer.state_dict()}

    def _objects(self) -> Dict[str, Any]:
        return {
            "progress": {
                "state": self.state,
                "history": self.history,
                "config": self.config.to_dict(),
                "world_size": self.env.world_size,
            },
            f"rank{self.env.rank}": {"rng": rng_state(self.device), "loss_sum": self.state["loss_sum"]},
        }

    def save_checkpoint(self) -> str:
        return checkpoint.save(
            self._tensor_state(), self._objects(), checkpoint.dcp_dir(self.output_dir), f"step-{self.state['step']:09d}"
        )

    def resume(self) -> bool:
        path = checkpoint.latest_checkpoint(checkpoint.dcp_dir(self.output_dir))
        if path is None:
            return False
        dense = self.optimizer._optims[1][1]  # the dense optimizer's state exists only after a step
        if not dense.state:
            dense.init_state()  # a zero-gradient step: creates the state, leaves the weights as they are
        state = self._tensor_state()
        objects = checkpoint.load(state, ["progress", f"rank{self.env.rank}"], path)
        saved = objects["progress"]["config"]
        for section in ("data", "model"):
            if saved[section] != self.config.to_dict()[section]:
                raise ValueError(
                    f"{self.output_dir} holds a run with a different {section} config ({saved[section]}); "
                    "use another --output-dir or the same config"
                )
        self.dmp.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.state, self.history = objects["progress"]["state"], objects["progress"]["history"]
        mine = objects.get(f"rank{self.env.rank}")
        if mine is None or objects["progress"].get("world_size", self.env.world_size) != self.env.world_size:
            # Restarted on a different number of ranks (e.g. fewer nodes): tables and optimizer
            # states are resharded by DCP and the global batches are the same, but per-rank RNG
            # streams and loss sums cannot carry over; reseed from (seed, step, rank).
            self.state["loss_sum"] = 0.0
            seed_everything(hash((self.config.train.seed, self.state["step"], self.env.rank)) % 2**31)
            return True
        self.state["loss_sum"] = mine["loss_sum"]
        restore_rng(mine["rng"], self.device)
        return True

    def _save(self, improved: bool) -> None:
        self.save_checkpoint()
        if improved:
            root = os.path.join(self.output_dir, "checkpoints", "dcp-best")
            checkpoint.save({"model": self.dmp.state_dict()}, {}, root, f"step-{self.state['step']:09d}", keep=1)

    # Training ------------------------------------------------------------------------------

    def train_step(self, batch: Batch) -> float:
        """One update on this rank's slice, moved to the rank's device first; returns its loss share
        (the shares sum to the global mean)."""
        batch = batch.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, _ = self.dmp(batch)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach()) / self.env.world_size

    def _steps(self, loader) -> Iterator[float]:
        """This rank's loss share of each step: plain steps, or TrainPipelineSparseDist (which
        overlaps the next batches' copy to the GPU and input all-to-all with this step)."""
        if not self.use_pipeline:
            for batch in loader:
                yield self.train_step(batch)
            return
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        pipeline = TrainPipelineSparseDist(self.dmp, self.optimizer, self.device)
        iterator = iter(loader)
        try:
            while True:
                try:
                    with self.autocast():  # forward and backward both run inside progress()
                        stats = pipeline.progress(iterator)
                except StopIteration:
                    return
                yield float(stats[0]) / self.env.world_size
        finally:
            pipeline.detach()  # the sharded modules' own forwards back, for evaluation

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        self.dmp.train()
        s = self.state
        if s.get("in_epoch") != epoch:  # a fresh epoch, not one resumed mid-way
            s.update(in_epoch=epoch, batch=0, loss_sum=0.0, examples=0, seconds=0.0)
        self.train_batches.set_epoch(epoch, s["batch"])
        loader = self.loader(self.train_batches)
        every = self.config.train.checkpoint_every
        start = time.perf_counter() - s["seconds"]
        bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, mininterval=2.0, disable=not self.env.is_main)
        for share in self._steps(bar):
            s["loss_sum"] += share
            s["examples"] += self.train_batches.global_batch_size(s["batch"])
            s["batch"] += 1
            s["step"] += 1
            s["seconds"] = time.perf_counter() - start
            if self.fail_at_step and s["step"] == self.fail_at_step and self.env.rank == 1 and _first_attempt():
                raise RuntimeError(f"{FAIL_AT_STEP_ENV}={self.fail_at_step}: simulated crash of rank 1")
            if every and s["batch"] % every == 0 and s["batch"] < self.train_batches.batches_per_epoch:
                self.save_checkpoint()
            if s["step"] == self.stop_at_step:
                raise Interrupted(f"stopped after step {s['step']}")
            if s["batch"] == self.config.train.max_steps_per_epoch:
                break
        total = torch.tensor([s["loss_sum"]], dtype=torch.float64, device=self.device)  # NCCL: on the GPU
        dist.all_reduce(total)
        steps = max(s["batch"], 1)
        seconds = time.perf_counter() - start
        s["in_epoch"] = None
        return {"train_loss": float(total) / steps, "seconds": seconds, "examples_per_second": s["examples"] / seconds}

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def _announce_resume(self) -> None:
        s = self.state
        where = f"epoch {s['epoch']}" + (f", batch {s['batch']} of epoch {s['in_epoch']}" if s.get("in_epoch") else "")
        print(f"resuming {self.output_dir} after {where} (step {s['step']})", flush=True)

    def finish(self) -> Dict[str, Any]:
        """Evaluates the best checkpoint on valid and test (all ranks); rank 0 writes metrics.json."""
        best = checkpoint.latest_checkpoint(os.path.join(self.output_dir, "checkpoints", "dcp-best"))
        if best is None:
            raise RuntimeError(f"no best checkpoint in {self.output_dir}; train at least one epoch")
        state = {"model": self.dmp.state_dict()}
        checkpoint.load(state, [], best)
        self.dmp.load_state_dict(state["model"])
        results = {"valid": self.evaluate("valid"), "test": self.evaluate("test")}
        rss = [0.0] * self.env.world_size
        dist.all_gather_object(rss, round(peak_rss_mb(), 1))
        gpu = [0.0] * self.env.world_size
        if self.device.type == "cuda":
            dist.all_gather_object(gpu, round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1))
        summary = self.summary(
            results,
            world_size=self.env.world_size,
            backend=self.env.backend,
            peak_rss_mb_per_rank=rss,
            peak_gpu_mb_per_rank=gpu,
        )
        if self.env.is_main:
            with open(os.path.join(self.output_dir, METRICS_JSON), "w") as f:
                json.dump(summary, f, indent=2)
            print(_format_table(results), flush=True)
            print(f"peak memory per rank: host {rss} MB, GPU {gpu} MB", flush=True)
        return summary


class Interrupted(RuntimeError):
    """Raised by ``stop_at_step``: the run stops as if killed (tests of resuming)."""


def _first_attempt() -> bool:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (Linux ru_maxrss is in KB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_distributed(config: RunConfig, output_dir: str, data_dir: Optional[str] = None) -> Dict[str, Any]:
    """The launcher's distributed path: join the process group, train (or resume), evaluate."""
    from .env import init_distributed

    dc = config.distributed
    env = init_distributed(dc.backend, dc.timeout_s, config.train.device)
    try:
        trainer = DistributedTrainer(config, output_dir, data_dir, env)
        trainer.fit()
        return trainer.finish()
    finally:
        dist.destroy_process_group()
