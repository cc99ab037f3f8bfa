"""The one training loop, for a one-process run and for a DistributedModelParallel run alike.

A :class:`Trainer` owns a run: data, model, the next-item task, optimizers, checkpoints, early
stopping, the history and the output folder. What differs between placements (where the model
lives, how batches are sliced, how metrics are reduced, which optimizers and checkpoint layout
exist) is its ``placement`` (``training.placement``). Checkpoints are written at every epoch end
and every ``train.checkpoint_every`` steps; starting again with the same output folder resumes
from the newest readable one, mid-epoch included, to the same result as an uninterrupted run.
"""

import contextlib
import json
import os
import resource
import shutil
import time
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import (
    Loss,
    Precision,
    RunConfig,
    config_from_dict,
    differing_settings,
    learned_settings,
    settings_hash,
)
from ..data import SampleBatches, SequenceData, evaluation_samples, load_sequences, make_loader, training_samples
from ..data.batch import Batch
from ..data.ids import write_id_maps
from ..data.loader import CandidateFn
from ..data.negatives import FullCatalog, SampledCandidates, item_frequencies, no_candidates
from ..data.samples import Samples
from ..data.synthetic import synthetic_sequences
from ..errors import ConfigError, RunFolderError
from ..evaluation import evaluate
from ..modules import SequenceRecommender
from .averaging import WeightAverage
from .graphs import GraphedStep
from .history import METRICS_JSON, Board, plot_history, read_metrics, write_history
from .optimizers import RateSchedule
from .placement import LocalPlacement, placement_for, resolve_device, resolve_execution

if TYPE_CHECKING:
    from .placement import Placement
from .seeding import restore_rng, rng_state, seed_everything
from .task import NextItemTask

RESOLVED_CONFIG_JSON = "resolved_config.json"
FAIL_AT_STEP_ENV = "RECBLR_FAIL_AT_STEP"  # tests: crash rank 1 once at this global step


def resolve_data_path(path: str, data_dir: Optional[str]) -> str:
    if os.path.isabs(path):
        return path
    if data_dir is None:
        raise ConfigError(
            f"data.path={path} is relative but no data directory is set; pass --data-dir DIR or set "
            "RECBLR_DATA_DIR (for example ../shared/data)"
        )
    return os.path.join(data_dir, path)


def load_data(config: RunConfig, data_dir: Optional[str]) -> SequenceData:
    d = config.data
    if d.format == "synthetic":
        return synthetic_sequences(d.synthetic)
    data = load_sequences(
        resolve_data_path(d.path, data_dir),
        d.format.value,
        d.min_user_interactions,
        d.min_item_interactions,
        d.cache_dir or None,
        d.tie_order.value,
    )
    return data.head(d.max_users)


def evaluation_users(data: SequenceData, max_len: int, split: str, max_users: int) -> Samples:
    """The evaluation samples of ``split``, only the first ``max_users`` users when it is > 0."""
    samples = evaluation_samples(data, max_len, split)
    if max_users <= 0 or max_users >= len(samples):
        return samples
    return Samples(samples.starts[:max_users], samples.lengths[:max_users], samples.users[:max_users], False)


def apply_matmul_precision(precision: Precision) -> None:
    """The float32 matmul precision of ``train.precision``: TF32 for ``tf32``, full float32 otherwise
    (under ``bf16`` the autocast matmuls are bfloat16 either way)."""
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")


def training_candidates(config: RunConfig, data: SequenceData, catalog_in_batch: bool) -> Optional[CandidateFn]:
    """The candidate set each training batch carries: sampled, or the whole catalog where the loss
    looks it up through the batch (sharded tables); else none (the loss reads the table directly)."""
    t = config.train
    if t.loss is Loss.SAMPLED:
        return SampledCandidates(item_frequencies(data), t.num_negatives, t.negative_sampler.value, t.seed)
    return FullCatalog(data.num_items + 1) if catalog_in_batch else None


def format_table(results: Dict[str, Dict[str, float]]) -> str:
    names = list(next(iter(results.values())))
    lines = ["| split | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for split, metrics in results.items():
        lines.append(f"| {split} | " + " | ".join(f"{metrics[n]:.4f}" for n in names) + " |")
    return "\n".join(lines)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (Linux ru_maxrss is in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


EVAL_CACHE_IDS = 1 << 26  # 512 MiB of int64 ids: larger evaluation splits are streamed by the loader


class Interrupted(RuntimeError):
    """Raised at ``Trainer.stop_at_step``: the run stops as if killed (tests of resuming)."""


def _first_attempt() -> bool:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0


class Trainer:
    """Owns one run (module docstring). ``config.train.batch_size`` is the global batch."""

    def __init__(
        self,
        config: RunConfig,
        output_dir: str,
        data_dir: Optional[str] = None,
        placement: Optional["Placement"] = None,
        resume_other_settings: bool = False,
    ):
        """``placement``: where the model lives (default: one process on ``train.device``).
        ``resume_other_settings``: continue a run folder whose checkpoint was trained with other
        settings (``--resume``) instead of refusing it."""
        self.output_dir = output_dir
        self.placement = p = placement or LocalPlacement(resolve_device(config.train.device))
        self.device = p.device
        self.config = config = resolve_execution(config, p)  # precision and CUDA graphs: auto made concrete
        p.check(config)
        t, e, max_len = config.train, config.eval, config.data.max_len
        seed_everything(t.seed)  # identical dense initialisation on every rank
        self.data = load_data(config, data_dir)
        candidate_feature = t.loss is Loss.SAMPLED or p.catalog_in_batch  # the table also serves the candidates
        self.train_batches = SampleBatches(
            self.data,
            training_samples(self.data, max_len, t.protocol, t.window_context),
            t.batch_size,
            shuffle=True,
            seed=t.seed,
            rank=p.rank,
            world_size=p.world_size,
            candidates=training_candidates(config, self.data, p.catalog_in_batch),
            user_buckets=config.context.user_buckets,
            pad_quantum=t.graph_quantum if t.cuda_graphs == "on" else 0,
        )
        self.eval_batches = {
            split: SampleBatches(
                self.data,
                evaluation_users(self.data, max_len, split, e.max_users),
                e.batch_size * p.world_size,
                shuffle=False,
                rank=p.rank,
                world_size=p.world_size,
                candidates=no_candidates if candidate_feature else None,
                user_buckets=config.context.user_buckets,
            )
            for split in ("valid", "test")
        }
        model = SequenceRecommender(
            self.data.num_items + 1, config.model, p.table_device, candidate_feature, config.context
        )
        # The table has a row for every item id of this data and the samplers add every target to
        # the candidates, so the loss's per-step target check (a host sync) is skipped.
        self.task = NextItemTask(model, p.world_size, check_targets=False, label_smoothing=t.label_smoothing)
        self.module = p.wrap(self.task, config)
        self.model: SequenceRecommender = p.recommender(self.module)
        self.model.set_kernels(config.model.recblr.kernels, self.device)
        if t.cuda_graphs == "on":  # the SASRec-style encoder pads to a bound, not to a length the host reads
            self.model.static_padding(max(max_len, self.train_batches.pad[1]))  # fillers have >= 2 positions
        if t.compile != "off":
            self.model.compile_encoder(t.compile)
        apply_matmul_precision(t.precision)
        self.optimizer = p.optimizer(self.module, t)
        steps = self.train_batches.batches_per_epoch
        steps = min(steps, t.max_steps_per_epoch or steps)
        self.schedule = RateSchedule(self.optimizer, t, steps)
        self.last_epoch = t.epochs(steps)
        self.average = WeightAverage(self.model, t.ema_decay) if t.ema_decay else None
        self.graphed = GraphedStep(self.update) if t.cuda_graphs == "on" else None
        self.checkpoints = p.checkpoints(output_dir)
        self.state: Dict[str, Any] = {"epoch": 0, "best": -1.0, "best_epoch": 0, "bad_epochs": 0}
        self.state.update(stopped_early=False, step=0, batch=0, in_epoch=None, examples=0, seconds=0.0)
        self.loss_sum = torch.zeros((), dtype=p.loss_dtype, device=self.device)  # this epoch's, this rank's
        self.history: list = []
        self.fail_at_step = int(os.environ.get(FAIL_AT_STEP_ENV, "0"))
        self.stop_at_step = 0  # tests: every rank stops (as if killed) after this global step
        self.resumed_from: Optional[str] = None  # the checkpoint resume() loaded
        self.resume_other_settings = resume_other_settings
        self.epochs_trained = 0  # by this process's fit()
        self.eval_cache: Dict[str, list] = {}  # split -> its batches on the device (evaluate)
        self.loaders: Dict[int, DataLoader] = {}  # id(SampleBatches) -> its loader (loader)

    @property
    def is_main(self) -> bool:
        """The process that writes the run's files and prints (rank 0 when distributed)."""
        return self.placement.is_main

    def resolved_config(self) -> Dict[str, Any]:
        """The config with what the run resolved from it: device, placement, each kernel's implementation."""
        p = self.placement
        resolved = {"device": str(self.device), "world_size": p.world_size, "backend": p.backend}
        if p.notice:
            resolved["placement"] = p.notice
        resolved["kernels"] = self.model.kernels_in_use()
        return {"config": self.config.to_dict(), "resolved": resolved}

    def _write_json(self, name: str, content: Dict[str, Any]) -> None:
        with open(os.path.join(self.output_dir, name), "w") as f:
            json.dump(content, f, indent=2)

    def loader(self, batches: SampleBatches, keep: bool = True) -> DataLoader:
        """The DataLoader over ``batches`` with this run's workers (pinned memory on CUDA). ``keep``:
        one per ``batches`` for the whole run, so that its workers start once (``make_loader``);
        otherwise a loader for one pass, whose workers end with it."""
        loader = self.loaders.get(id(batches)) if keep else None
        if loader is None:
            loader = make_loader(batches, self.config.train.num_workers, pin_memory=self.device.type == "cuda")
            if keep:
                self.loaders[id(batches)] = loader
        return loader

    def evaluate(self, split: str) -> Dict[str, float]:
        """The split's metrics. Its batches are the same at every validation: built once and kept on
        the device when they hold at most ``EVAL_CACHE_IDS`` item ids (no loader, no copies after)."""
        e = self.config.eval
        batches = self.eval_cache.get(split)
        if batches is None:
            source = self.eval_batches[split]
            once = int(source.samples.lengths.sum()) <= EVAL_CACHE_IDS  # read once, kept on the device
            batches = self.loader(source, keep=not once)
            if once:
                batches = self.eval_cache[split] = [batch.to(self.device) for batch in batches]
        return evaluate(self.model, batches, self.device, e.ks, e.item_chunk_size, self.placement.process_group)

    # Checkpoints -------------------------------------------------------------------------

    def _rank_key(self) -> str:
        return f"rank{self.placement.rank}"

    def save_checkpoint(self, improved: bool = False) -> None:
        p = self.placement
        tensors = {"model": p.model_state(self.module), "optimizer": self.optimizer.state_dict()}
        if self.average is not None:
            tensors["average"] = self.average.state_dict()
        progress = {"state": self.state, "history": self.history, "config": self.config.to_dict()}
        progress["settings_hash"] = settings_hash(self.config)
        progress.update(world_size=p.world_size, num_embeddings=self.model.num_embeddings)
        mine = {"rng": rng_state(self.device), "loss_sum": float(self.loss_sum)}
        self.checkpoints.save(tensors, {"progress": progress, self._rank_key(): mine}, improved, self.state["step"])

    def resume(self) -> bool:
        """Loads the newest readable checkpoint of the output folder; False when it has none."""
        p = self.placement

        def template() -> Dict[str, Any]:  # built only when there is a checkpoint (it may create optimizer state)
            return {"model": p.model_state(self.module), "optimizer": p.optimizer_template(self.optimizer)}

        objects = ["progress", self._rank_key(), "average"]
        loaded = self.checkpoints.load(template, objects, check=self._check_same_run)
        if loaded is None:
            return False
        progress = loaded["progress"]
        self.resumed_from = loaded["path"]
        try:
            p.load_model_state(self.module, loaded["model"])
            p.load_optimizer(self.optimizer, loaded["optimizer"], self.config.train)
            if self.average is not None:  # a run continued with an average it did not have starts it here
                self.average.load_state_dict(loaded.get("average"))
        except (RuntimeError, ValueError, KeyError) as error:  # other shapes or another optimizer's state
            raise RunFolderError(
                f"{self.output_dir} cannot continue with these settings ({type(error).__name__}: "
                f"{' '.join(str(error).split())[:200]}); start over with --overwrite or use another --output-dir"
            ) from error
        self.state = {**self.state, **progress["state"]}
        # this run's patience decides whether the early stop still holds (a raised patience continues)
        self.state["stopped_early"] = self.state["bad_epochs"] >= self.config.train.patience
        self.history = progress["history"]
        mine = loaded.get(self._rank_key())
        if mine is None or progress.get("world_size", p.world_size) != p.world_size:
            # Restarted on a different number of ranks (e.g. fewer nodes): tables and optimizer
            # states are resharded by DCP and the global batches are the same, but per-rank RNG
            # streams and loss sums cannot carry over; reseed from (seed, step, rank).
            self.loss_sum.zero_()
            seed_everything(hash((self.config.train.seed, self.state["step"], p.rank)) % 2**31)
            return True
        self.loss_sum.fill_(mine["loss_sum"])
        restore_rng(mine["rng"], self.device)
        return True

    def _check_same_run(self, objects: Dict[str, Any]) -> None:
        """Refuses to resume a checkpoint (its ``progress``) trained with settings that change what is
        learned or measured (all but the execution and continuation keys: ``config.learned_settings``),
        unless ``resume_other_settings``; says in one line what differs when it goes on anyway."""
        saved = config_from_dict(objects["progress"]["config"])
        differences = differing_settings(learned_settings(saved), learned_settings(self.config))
        if not differences:
            return
        if not self.resume_other_settings:
            raise RunFolderError(
                f"{self.output_dir} holds a run with other settings: {', '.join(differences)}; continue it anyway "
                "with --resume, start over with --overwrite, or use another --output-dir"
            )
        if self.is_main:
            print(f"continuing {self.output_dir} with other settings: {', '.join(differences)}", flush=True)

    # Training ----------------------------------------------------------------------------

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast for ``train.precision=bf16``; a disabled context for fp32. Without its
        cache of cast weights under CUDA graphs (PyTorch's rule for autocast inside a capture)."""
        t = self.config.train
        bf16 = t.precision == "bf16"
        graphs = t.cuda_graphs == "on"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not graphs)

    def train_step(self, batch: Batch) -> Tensor:
        """One optimizer update on ``batch`` (this rank's slice), moved to the run's device first
        (replayed from a CUDA graph with ``train.cuda_graphs``); returns its loss as a 0-dim tensor
        on the device, ``world_size`` times this rank's share of the global batch's mean (reading
        it is the caller's host sync, not every step's)."""
        batch = batch.to(self.device, non_blocking=True)
        return self.update(batch) if self.graphed is None else self.graphed(batch)

    def update(self, batch: Batch) -> Tensor:
        """One eager optimizer update on ``batch``, accumulated over micro-batches: no host sync on
        the GPU, so a CUDA graph can capture it."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for part in batch.split(self.config.train.micro_batch_size):
            with self.autocast():
                loss, stats = self.module(part)
            loss.backward()
            loss_sum += stats[0]
        self.optimizer.step()
        return loss_sum

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        self.module.train()
        s, t = self.state, self.config.train
        if s.get("in_epoch") != epoch:  # a fresh epoch, not one resumed mid-way
            s.update(in_epoch=epoch, batch=0, examples=0, seconds=0.0)
            self.loss_sum.zero_()
        self.train_batches.set_epoch(epoch, s["batch"])
        loader = self.loader(self.train_batches)
        world = self.placement.world_size
        start = time.perf_counter() - s["seconds"]
        bar = tqdm(
            loader,
            desc=f"epoch {epoch}",
            leave=False,
            mininterval=2.0,
            dynamic_ncols=True,
            disable=None if self.is_main else True,  # None: no bar when stderr is a file, not a terminal
        )
        self.schedule.apply(s["step"])
        for loss in self.placement.steps(bar, self):
            self.loss_sum += loss.double() / world  # summed on the device; read at log steps only
            s["examples"] += self.train_batches.global_batch_size(s["batch"])
            s["batch"] += 1
            s["step"] += 1
            if self.average is not None:
                self.average.update(s["step"])
            self.schedule.apply(s["step"])
            s["seconds"] = time.perf_counter() - start
            if self.fail_at_step and s["step"] == self.fail_at_step and self.placement.rank == 1 and _first_attempt():
                raise RuntimeError(f"{FAIL_AT_STEP_ENV}={self.fail_at_step}: simulated crash of rank 1")
            if t.checkpoint_every and s["batch"] % t.checkpoint_every == 0:
                if s["batch"] < self.train_batches.batches_per_epoch:  # the epoch's end saves anyway
                    self.save_checkpoint()
            if s["step"] == self.stop_at_step:
                raise Interrupted(f"stopped after step {s['step']}")
            if self.is_main and (s["batch"] % t.log_every == 0 or s["batch"] == 1):
                rate = s["examples"] / s["seconds"]
                bar.set_postfix(loss=f"{float(self.loss_sum) * world / s['batch']:.4f}", ex_per_s=f"{rate:.0f}")
            if s["batch"] == t.max_steps_per_epoch:
                break
        total = self.placement.all_reduce(self.loss_sum.clone())
        seconds = time.perf_counter() - start
        s["in_epoch"] = None
        mean_loss = float(total) / max(s["batch"], 1)
        stats = {"train_loss": mean_loss, "seconds": seconds, "examples_per_second": s["examples"] / seconds}
        if self.model.score_scale is not None:  # model.learn_temperature: the value the epoch ended with
            stats["temperature"] = self.model.temperature()
        return stats

    def _announce_resume(self) -> None:
        s = self.state
        where = f"epoch {s['epoch']}" + (f", batch {s['batch']} of epoch {s['in_epoch']}" if s.get("in_epoch") else "")
        print(f"resuming {self.output_dir} after {where} (step {s['step']}) from {self.resumed_from}", flush=True)

    def _out_of_time(self) -> bool:
        budget = self.config.train.time_budget_s
        return budget > 0 and sum(row["seconds"] for row in self.history) >= budget

    def _finished(self) -> bool:
        """Early-stopped, at its last epoch (train.max_epochs or max_steps), or past the time budget."""
        return self.state["stopped_early"] or self.state["epoch"] >= self.last_epoch or self._out_of_time()

    def banner(self) -> str:
        """What the run is about to do, in two lines: data and model, then device and folder."""
        c, t, d = self.config, self.config.train, self.data
        source = "synthetic" if c.data.format == "synthetic" else c.data.path
        model = f"{c.model.encoder} d={c.model.embedding_dim} x{c.model.encoder_config.num_layers} layers"
        execution = [str(t.precision)] + (["CUDA graphs"] if t.cuda_graphs == "on" else [])
        execution += [f"compiled ({t.compile})"] if t.compile != "off" else []
        world = f", {self.placement.world_size} processes" if self.placement.world_size > 1 else ""
        return (
            f"run {c.name}: {source} ({d.num_users:,} users, {d.num_items:,} items, {len(d.items):,} interactions), "
            f"{model}, {t.protocol} protocol, {t.loss} softmax\n"
            f"on {self.device} ({', '.join(execution)}{world}), into {self.output_dir}"
        )

    def fit(self) -> None:
        e = self.config.eval
        resumed = self.resume()
        if self.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            self._write_json(RESOLVED_CONFIG_JSON, self.resolved_config())
            write_id_maps(self.data, self.output_dir)
            print(self.banner(), flush=True)
            if self.placement.notice:
                print(self.placement.notice, flush=True)
            if resumed:
                self._announce_resume()
        board = Board(self.output_dir) if self.is_main and not self._finished() else None
        while not self._finished():
            epoch = self.state["epoch"] + 1
            stats = self.train_epoch(epoch)
            self.epochs_trained += 1
            self.state.update(epoch=epoch)
            self.history.append({"epoch": epoch, **stats})
            validate = epoch % e.every == 0 or self._finished()
            improved = validate and self._validate(epoch)
            self.save_checkpoint(improved)
            if board is None:
                continue
            board.epoch(self.history[-1], float(self.optimizer.param_groups[-1]["lr"]))  # the dense optimizer's
            write_history(self.history, self.output_dir)
            if validate and (epoch % (10 * e.every) == 0 or self._finished()):
                plot_history(self.history, self.output_dir, [e.valid_metric, f"HR@{e.ks[0]}"])
            line = f"epoch {epoch}: loss {stats['train_loss']:.4f}, {stats['examples_per_second']:.0f} ex/s, "
            line += f"{stats['seconds']:.1f} s"
            if validate:
                best = self.state["best"]
                line += f", valid {e.valid_metric} {self.history[-1]['valid_' + e.valid_metric]:.4f}"
                line += " (best)" if improved else f" (best {best:.4f} at {self.state['best_epoch']})"
            print(line, flush=True)
            if self.state["stopped_early"]:
                print(
                    f"early stopping: no better valid {e.valid_metric} in {self.state['bad_epochs']} validations "
                    f"(train.patience={self.config.train.patience}); best {self.state['best']:.4f} at epoch "
                    f"{self.state['best_epoch']}",
                    flush=True,
                )
        if board is not None:
            board.close()

    def _validate(self, epoch: int) -> bool:
        """Validates, records the metrics in the history and the early-stopping state; True if best so far."""
        start = time.perf_counter()
        with self.average.applied() if self.average is not None else contextlib.nullcontext():
            valid = self.evaluate("valid")
        self.history[-1].update({f"valid_{k}": v for k, v in valid.items()})
        self.history[-1]["valid_seconds"] = time.perf_counter() - start
        score = valid[self.config.eval.valid_metric]
        improved = score > self.state["best"]
        if improved:
            self.state.update(best=score, best_epoch=epoch, bad_epochs=0)
        else:
            self.state["bad_epochs"] += 1
        self.state["stopped_early"] = self.state["bad_epochs"] >= self.config.train.patience
        return improved

    def summary(self, results: Dict[str, Dict[str, float]], **extra: Any) -> Dict[str, Any]:
        """metrics.json's content: the split metrics, the run's progress and size, ``extra``, the config."""
        return {
            **results,
            "best_epoch": self.state["best_epoch"],
            "epochs": self.state["epoch"],
            "train_seconds": sum(row["seconds"] for row in self.history),
            "num_users": self.data.num_users,
            "num_items": self.data.num_items,
            **extra,
            "config": self.config.to_dict(),
        }

    def finish(self) -> Dict[str, Any]:
        """Evaluates the best checkpoint on valid and test (valid alone with ``eval.test: false``;
        every rank); writes metrics.json."""
        p = self.placement
        best = self.checkpoints.load_best({"model": p.model_state(self.module)})
        p.load_model_state(self.module, best["model"])
        splits = ("valid", "test") if self.config.eval.test else ("valid",)
        results = {split: self.evaluate(split) for split in splits}
        rss = p.gather(round(peak_rss_mb(), 1))
        gpu = p.gather(
            round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1) if self.device.type == "cuda" else 0.0
        )
        summary = self.summary(
            results, world_size=p.world_size, backend=p.backend, peak_rss_mb_per_rank=rss, peak_gpu_mb_per_rank=gpu
        )
        if self.is_main:
            self._write_json(METRICS_JSON, summary)
            print(
                f"best epoch {summary['best_epoch']} of {summary['epochs']}, evaluated on {' and '.join(splits)}:",
                flush=True,
            )
            print(format_table(results), flush=True)
            if p.world_size > 1:
                print(f"peak memory per rank: host {rss} MB, GPU {gpu} MB", flush=True)
        return summary

    def finished_results(self) -> Optional[Dict[str, Any]]:
        """metrics.json of a run that was already finished when this process started (nothing
        trained now), printed again; None when it must be evaluated."""
        summary = None if self.epochs_trained else read_metrics(self.output_dir)
        if summary is None:
            return None
        if summary.get("epochs") != self.state["epoch"] or (self.config.eval.test and "test" not in summary):
            return None  # trained further, or finished without the test split that is now asked for
        if self.is_main:
            print(
                f"{self.output_dir} is finished (best epoch {summary['best_epoch']} of {summary['epochs']}); "
                "its results, not retrained (to go on, raise the limit that ended it: "
                "train.max_epochs, max_steps, patience or time_budget_s):",
                flush=True,
            )
            print(format_table({split: summary[split] for split in ("valid", "test") if split in summary}), flush=True)
        return summary


def train(
    config: RunConfig,
    output_dir: str,
    data_dir: Optional[str] = None,
    resume_other_settings: bool = False,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Trains (or resumes) a run and evaluates its best checkpoint; returns metrics.json's content.
    A run that was already finished is not trained again: its results are printed.

    ``resume_other_settings``: continue a run folder trained with other settings (``--resume``);
    ``overwrite``: empty the run folder first (``--overwrite``). Under torchrun / TorchX the run
    is sharded over their processes (``placement_for``)."""
    placement = placement_for(config)
    try:
        if overwrite:
            if placement.is_main and os.path.isdir(output_dir):
                shutil.rmtree(output_dir)
            placement.barrier()
        trainer = Trainer(config, output_dir, data_dir, placement, resume_other_settings)
        trainer.fit()
        return trainer.finished_results() or trainer.finish()
    finally:
        placement.close()
