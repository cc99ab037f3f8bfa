"""Local training (one process, CPU or one GPU): Adam, full-catalog softmax, early stopping.

Every epoch writes a checkpoint; starting again with the same output directory resumes from it.
"""

import json
import os
import random
import time
from dataclasses import asdict
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ..config import RunConfig
from ..data import SampleBatches, SequenceData, evaluation_samples, load_sequences, make_loader, training_samples
from ..data.batches import Batch, CandidateFn, Samples
from ..data.negatives import FullCatalog, SampledCandidates, item_frequencies
from ..data.synthetic import synthetic_sequences
from ..evaluation import evaluate
from ..modules import RecBLR
from .checkpoint import BEST, LAST, checkpoint_dir, load_checkpoint, restore_rng, rng_state, save_atomic
from .graphs import GraphedStep
from .history import plot_history, write_history
from .losses import full_softmax_loss
from .optimizers import optimizer_factory
from .task import candidate_loss, encoder_rows, target_rows

METRICS_JSON = "metrics.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    return device


def resolve_data_path(path: str, data_dir: Optional[str]) -> str:
    if os.path.isabs(path):
        return path
    if data_dir is None:
        raise ValueError(
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
        d.format,
        d.min_user_interactions,
        d.min_item_interactions,
        d.cache_dir or None,
        d.tie_order,
    )
    return data.head(d.max_users)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluation_users(data: SequenceData, max_len: int, split: str, max_users: int) -> Samples:
    """The evaluation samples of ``split``, only the first ``max_users`` users when it is > 0."""
    samples = evaluation_samples(data, max_len, split)
    if max_users <= 0 or max_users >= len(samples):
        return samples
    return Samples(samples.starts[:max_users], samples.lengths[:max_users], samples.users[:max_users], False)


def apply_matmul_precision(precision: str) -> None:
    """The float32 matmul precision of ``train.precision``: TF32 for ``tf32``, full float32 otherwise
    (under ``bf16`` the autocast matmuls are bfloat16 either way)."""
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")


def training_candidates(config: RunConfig, data: SequenceData, distributed: bool = False) -> Optional[CandidateFn]:
    """The candidate set each training batch carries: sampled, or (distributed) the whole catalog.

    Local full-softmax runs carry none: the loss reads the unsharded table directly.
    """
    t = config.train
    if t.loss == "sampled":
        return SampledCandidates(item_frequencies(data), t.num_negatives, t.negative_sampler, t.seed)
    return FullCatalog(data.num_items + 1) if distributed else None


def next_item_loss(model: RecBLR, batch: Batch, check_targets: bool = True, label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy over the catalog at every position that carries a target.

    A batch carrying its candidate set (sampled softmax) is scored against those candidates.
    ``check_targets=False`` skips the loss's check of the targets (a host sync on GPU): their
    bounds, or, sampled, their presence among the candidates. The trainer passes it: its table has
    a row for every item id of its data, and its sampler adds every target to the candidates.
    ``label_smoothing``: ``train.label_smoothing`` (:func:`full_softmax_loss`; full softmax only).
    """
    if batch.candidates() is not None:
        return candidate_loss(model, batch, check_targets, label_smoothing)[0]
    rows = encoder_rows(batch, target_rows(batch))
    hidden = model(batch.item_history, batch.context, rows)
    every = rows is None  # all positions: the fillers of a graphed batch carry target 0
    targets = batch.targets if every else batch.targets[rows]
    return full_softmax_loss(
        hidden,
        targets,
        model.item_table(),
        check_targets=check_targets,
        ignore_padding=every,
        label_smoothing=label_smoothing,
    )


def _format_table(results: Dict[str, Dict[str, float]]) -> str:
    names = list(next(iter(results.values())))
    lines = ["| split | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for split, metrics in results.items():
        lines.append(f"| {split} | " + " | ".join(f"{metrics[n]:.4f}" for n in names) + " |")
    return "\n".join(lines)


class Trainer:
    """Owns one run: data, model, optimizer, checkpoints and the output directory."""

    def __init__(self, config: RunConfig, output_dir: str, data_dir: Optional[str] = None):
        self.config = config
        self.output_dir = output_dir
        self.device = resolve_device(config.train.device)
        seed_everything(config.train.seed)
        self.data = load_data(config, data_dir)
        t, e = config.train, config.eval
        max_len = config.data.max_len
        samples = training_samples(self.data, max_len, t.protocol)
        candidates = training_candidates(config, self.data)
        buckets = config.context.user_buckets
        if t.cuda_graphs and self.device.type != "cuda":
            raise ValueError(
                f"train.cuda_graphs=true needs a CUDA device, not {self.device}; set train.cuda_graphs=false"
            )
        self.train_batches = SampleBatches(
            self.data,
            samples,
            t.batch_size,
            True,
            t.seed,
            candidates=candidates,
            user_buckets=buckets,
            pad_quantum=t.graph_quantum if t.cuda_graphs else 0,
        )
        self.eval_batches = {
            split: SampleBatches(
                self.data,
                evaluation_users(self.data, max_len, split, e.max_users),
                e.batch_size,
                False,
                user_buckets=buckets,
            )
            for split in ("valid", "test")
        }
        sampled = t.loss == "sampled"
        self.model = RecBLR(
            self.data.num_items + 1, config.model, candidate_feature=sampled, context=config.context
        ).to(self.device)
        if t.cuda_graphs:  # the SASRec-style encoder pads to a bound, not to a length the host reads
            self.model.static_padding(max(max_len, self.train_batches.pad[1]))  # fillers have >= 2 positions
        if t.compile != "off":
            self.model.compile_encoder(t.compile)
        apply_matmul_precision(t.precision)
        self.optimizer = optimizer_factory(t)(self.model.parameters())
        self.graphed = GraphedStep(self.update) if t.cuda_graphs else None
        self.state: Dict[str, Any] = {"epoch": 0, "best": -1.0, "best_epoch": 0, "bad_epochs": 0}
        self.state["stopped_early"] = False
        self.history: list = []
        os.makedirs(output_dir, exist_ok=True)

    def loader(self, batches: SampleBatches):
        """A DataLoader over ``batches`` with this run's workers (pinned memory on CUDA)."""
        return make_loader(batches, self.config.train.num_workers, pin_memory=self.device.type == "cuda")

    def evaluate(self, split: str) -> Dict[str, float]:
        e = self.config.eval
        return evaluate(self.model, self.loader(self.eval_batches[split]), self.device, e.ks, e.item_chunk_size)

    def resume(self) -> bool:
        ckpt = load_checkpoint(os.path.join(checkpoint_dir(self.output_dir), LAST))
        if ckpt is None:
            return False
        saved = ckpt["config"]
        for section in ("data", "model"):
            if saved[section] != asdict(getattr(self.config, section)):
                raise ValueError(
                    f"{self.output_dir} holds a run with a different {section} config ({saved[section]}); "
                    "use another --output-dir or the same config"
                )
        t = self.config.train
        if saved["train"]["optimizer"] != t.optimizer:  # its state (moments, sums) is another optimizer's
            raise ValueError(
                f"{self.output_dir} was trained with train.optimizer={saved['train']['optimizer']}, not "
                f"{t.optimizer}; resume with the same optimizer or use another --output-dir"
            )
        self.model.load_state_dict(ckpt["model"])
        optimizer = ckpt["optimizer"]
        for group in optimizer["param_groups"]:  # load_state_dict would keep the saved settings:
            group.update(lr=t.lr, weight_decay=t.weight_decay)  # a resumed run takes its config's
            if "capturable" in group:  # and may switch train.cuda_graphs
                group["capturable"] = t.cuda_graphs
        self.optimizer.load_state_dict(optimizer)
        self.state, self.history = ckpt["state"], ckpt["history"]
        restore_rng(ckpt["rng"], self.device)
        return True

    def _save(self, improved: bool) -> None:
        folder = checkpoint_dir(self.output_dir)
        ckpt = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": self.state,
            "history": self.history,
            "rng": rng_state(self.device),
            "config": self.config.to_dict(),
            "num_embeddings": self.model.num_embeddings,
        }
        if improved:
            best = {k: ckpt[k] for k in ("model", "config", "num_embeddings")}
            save_atomic({**best, "epoch": self.state["epoch"]}, os.path.join(folder, BEST))
        save_atomic(ckpt, os.path.join(folder, LAST))

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast for ``train.precision=bf16``; a disabled context for fp32. Without its
        cache of cast weights under CUDA graphs (PyTorch's rule for autocast inside a capture)."""
        t = self.config.train
        bf16 = t.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not t.cuda_graphs)

    def train_step(self, batch: Batch) -> Tensor:
        """One optimizer update on ``batch``, moved to the run's device first (replayed from a CUDA
        graph with ``train.cuda_graphs``); returns the mean loss as a 0-dim tensor on the device
        (reading it is the caller's host sync, not every step's)."""
        batch = batch.to(self.device, non_blocking=True)
        return self.update(batch) if self.graphed is None else self.graphed(batch)

    def update(self, batch: Batch) -> Tensor:
        """One eager optimizer update on ``batch``, accumulated over micro-batches: no host sync on
        the GPU, so a CUDA graph can capture it."""
        self.optimizer.zero_grad(set_to_none=True)
        parts = batch.split(self.config.train.micro_batch_size)
        num_targets = batch.num_targets if len(parts) > 1 else 0
        loss_sum = torch.zeros((), device=self.device)
        smoothing = self.config.train.label_smoothing
        for part in parts:
            weight = part.num_targets / num_targets if len(parts) > 1 else 1.0
            with self.autocast():  # the table was sized from this data: every target id has a row
                loss = next_item_loss(self.model, part, check_targets=False, label_smoothing=smoothing) * weight
            loss.backward()
            loss_sum += loss.detach()
        self.optimizer.step()
        return loss_sum

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        self.model.train()
        self.train_batches.set_epoch(epoch)
        loader = self.loader(self.train_batches)
        total_loss, steps, examples = torch.zeros((), device=self.device), 0, 0
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, mininterval=2.0, dynamic_ncols=True)
        for batch in bar:
            total_loss += self.train_step(batch)  # summed on the device; read at log steps only
            steps += 1
            examples += len(batch) - self.train_batches.fillers_per_batch
            if steps % self.config.train.log_every == 0 or steps == 1:
                rate = examples / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{total_loss.item() / steps:.4f}", ex_per_s=f"{rate:.0f}")
        mean_loss = total_loss.item() / max(steps, 1)
        seconds = time.perf_counter() - start
        return {"train_loss": mean_loss, "seconds": seconds, "examples_per_second": examples / seconds}

    is_main = True  # the process that writes the run's files and prints (rank 0 when distributed)

    def _announce_resume(self) -> None:
        print(f"resuming {self.output_dir} after epoch {self.state['epoch']}", flush=True)

    def _out_of_time(self) -> bool:
        budget = self.config.train.time_budget_s
        return budget > 0 and sum(row["seconds"] for row in self.history) >= budget

    def _finished(self) -> bool:
        """Early-stopped, at max_epochs, or past the time budget."""
        return self.state["stopped_early"] or self.state["epoch"] >= self.config.train.max_epochs or self._out_of_time()

    def fit(self) -> None:
        e = self.config.eval
        if self.resume() and self.is_main:
            self._announce_resume()
        while not self._finished():
            epoch = self.state["epoch"] + 1
            stats = self.train_epoch(epoch)
            self.state.update(epoch=epoch)
            self.history.append({"epoch": epoch, **stats})
            validate = epoch % e.every == 0 or self._finished()
            improved = validate and self._validate(epoch)
            self._save(improved)
            if not self.is_main:
                continue
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

    def _validate(self, epoch: int) -> bool:
        """Validates, records the metrics in the history and the early-stopping state; True if best so far."""
        valid = self.evaluate("valid")
        self.history[-1].update({f"valid_{k}": v for k, v in valid.items()})
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
        """Evaluates the best checkpoint on valid and test; writes metrics.json."""
        best = load_checkpoint(os.path.join(checkpoint_dir(self.output_dir), BEST))
        if best is None:
            raise RuntimeError(f"no best checkpoint in {self.output_dir}; train at least one epoch")
        self.model.load_state_dict(best["model"])
        results = {"valid": self.evaluate("valid"), "test": self.evaluate("test")}
        summary = self.summary(results)
        with open(os.path.join(self.output_dir, METRICS_JSON), "w") as f:
            json.dump(summary, f, indent=2)
        print(_format_table(results), flush=True)
        return summary


def train(config: RunConfig, output_dir: str, data_dir: Optional[str] = None) -> Dict[str, Any]:
    """Trains (or resumes) a run and evaluates its best checkpoint; returns metrics.json's content."""
    trainer = Trainer(config, output_dir, data_dir)
    trainer.fit()
    return trainer.finish()
