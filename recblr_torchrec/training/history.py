"""A run folder's metrics: per epoch to CSV, a PNG plot of the curves and TensorBoard scalars,
and the final ``metrics.json``; and reading them back."""

import csv
import json
import os
from typing import Any, Dict, List, Optional

HISTORY_CSV = "metrics.csv"
CURVES_PNG = "curves.png"
METRICS_JSON = "metrics.json"


def read_metrics(output_dir: str) -> Optional[Dict[str, Any]]:
    """A run folder's ``metrics.json`` (the final evaluation, written when the run finished), or None."""
    path = os.path.join(output_dir, METRICS_JSON)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_history(rows: List[Dict[str, Any]], output_dir: str) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))  # epochs without validation lack some
    with open(os.path.join(output_dir, HISTORY_CSV), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def read_history(output_dir: str) -> List[Dict[str, Any]]:
    """A run folder's per-epoch rows as :func:`write_history` wrote them (numbers as numbers, an
    epoch without validation without its ``valid_`` keys); empty before the first epoch ends."""
    path = os.path.join(output_dir, HISTORY_CSV)
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        {key: int(value) if key == "epoch" else float(value) for key, value in row.items() if value} for row in rows
    ]


def wall_curve(rows: List[Dict[str, Any]], metric: str) -> List[Dict[str, Any]]:
    """Per epoch of a history: ``epoch``, ``value`` (``valid_<metric>``, None where it did not
    validate), ``seconds`` (its training and validation) and ``wall`` (the seconds up to its end)."""
    wall, curve = 0.0, []
    for row in rows:
        seconds = row["seconds"] + row.get("valid_seconds", 0.0)
        wall += seconds
        curve.append({"epoch": row["epoch"], "value": row.get(f"valid_{metric}"), "seconds": seconds, "wall": wall})
    return curve


def run_progress(output_dir: str, metric: str) -> Optional[Dict[str, Any]]:
    """An unfinished run's progress: epochs, wall time and best validation so far (None before its
    first validation)."""
    curve = wall_curve(read_history(output_dir), metric)
    validated = [point for point in curve if point["value"] is not None]
    if not validated:
        return None
    best = max(validated, key=lambda point: point["value"])
    return {
        "epochs_done": curve[-1]["epoch"],
        "wall_s": round(curve[-1]["wall"], 1),
        f"valid_{metric}_best_so_far": round(best["value"], 4),
        "at_epoch": best["epoch"],
    }


def run_summary(output_dir: str, metric: str) -> Optional[Dict[str, Any]]:
    """A finished run's test metrics, best validation and its validation curve against wall time
    (``[wall, value]`` per validated epoch); None while it has no ``metrics.json``."""
    summary = read_metrics(output_dir)
    if summary is None:
        return None
    curve = wall_curve(read_history(output_dir), metric)
    best_epoch = summary["best_epoch"]
    return {
        "test": summary["test"],
        "valid_best": summary["valid"][metric],
        "best_epoch": best_epoch,
        "epochs": summary["epochs"],
        "train_seconds": round(summary["train_seconds"], 1),
        "wall_to_best_s": round(next(p["wall"] for p in curve if p["epoch"] == best_epoch), 1),
        "valid_curve": [[round(p["wall"], 2), p["value"]] for p in curve if p["value"] is not None],
        "precision": summary["config"]["train"]["precision"],
        "cuda_graphs": summary["config"]["train"]["cuda_graphs"],
    }


def epochs_to(output_dir: str, metric: str, target: float) -> Optional[int]:
    """The first epoch whose validation reaches ``target`` (None: none has yet)."""
    curve = wall_curve(read_history(output_dir), metric)
    return next((p["epoch"] for p in curve if p["value"] is not None and p["value"] >= target), None)


def plot_history(rows: List[Dict[str, Any]], output_dir: str, valid_metrics: List[str]) -> None:
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [row["train_loss"] for row in rows], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="training loss")
    for name in valid_metrics:
        validated = [row for row in rows if f"valid_{name}" in row]
        xs, ys = [row["epoch"] for row in validated], [row[f"valid_{name}"] for row in validated]
        right.plot(xs, ys, marker="o", label=name)
    right.set(xlabel="epoch", ylabel="validation metric", title="validation (full ranking)")
    right.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, CURVES_PNG), dpi=100)
    plt.close(fig)


TENSORBOARD = "tensorboard"


class Board:
    """TensorBoard scalars of a run, in ``<run>/tensorboard``: per epoch the training loss,
    examples per second, learning rate and a learned score temperature, and every validation
    metric (``valid/NDCG@10``, ...)."""

    def __init__(self, output_dir: str):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where a run writes

        self.writer = SummaryWriter(os.path.join(output_dir, TENSORBOARD))

    def epoch(self, row: Dict[str, Any], lr: float) -> None:
        epoch = row["epoch"]
        self.writer.add_scalar("train/loss", row["train_loss"], epoch)
        self.writer.add_scalar("train/examples_per_second", row["examples_per_second"], epoch)
        self.writer.add_scalar("train/lr", lr, epoch)
        if "temperature" in row:  # a learned score temperature
            self.writer.add_scalar("train/temperature", row["temperature"], epoch)
        for key, value in row.items():
            if key.startswith("valid_"):
                self.writer.add_scalar(f"valid/{key[len('valid_') :]}", value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
