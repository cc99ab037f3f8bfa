"""Per-epoch metrics to CSV and a PNG plot of the curves."""

import csv
import os
from typing import Any, Dict, List

HISTORY_CSV = "metrics.csv"
CURVES_PNG = "curves.png"


def write_history(rows: List[Dict[str, Any]], output_dir: str) -> None:
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))  # epochs without validation lack some
    with open(os.path.join(output_dir, HISTORY_CSV), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


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
