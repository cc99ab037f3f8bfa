"""Runs the paper-table experiments in resumable slices and writes the results table.

Each run is ``launchers/train.py`` with a config and a seed, in its own output directory. A call
works through the plan until its time budget is spent, ``--parallel`` runs at a time spread over
the visible GPUs (the models are small: several runs share a GPU well); runs still going at the
deadline are stopped and resume from their last epoch checkpoint on the next call (the GPU machine
allows 10-minute calls). Finished runs (``metrics.json`` present) are skipped. The table (mean and
standard deviation over seeds, with training wall time and epochs, beside the paper's rows) is
written to ``<runs-dir>/table.md`` after every call.

    python scripts/paper_table.py --data-dir ../shared/data --runs-dir runs/paper --budget-minutes 9 \
        --parallel 8 [--only ML-1M] [--seeds 0 1 2]
"""

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from recblr_torchrec.config import add_overrides_argument
from recblr_torchrec.training.history import METRICS_JSON, read_metrics
from recblr_torchrec.training.pool import Run, add_pool_arguments, resolve_paths, run_pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20", "MRR@20")
# (row name, config, extra overrides); every row runs once per seed.
PLAN: List[Tuple[str, str, List[str]]] = [
    ("ML-1M RecBLR (prefixes, paper)", "configs/ml-1m-item-order/recblr-paper.yaml", []),
    ("ML-1M RecBLR (all_positions)", "configs/ml-1m-item-order/recblr-all-positions.yaml", []),
    ("ML-1M SASRec-style (prefixes)", "configs/ml-1m-item-order/sasrec-paper.yaml", []),
    ("ML-1M RecBLR (all_positions, RecBole's order)", "configs/ml-1m/recblr-all-positions.yaml", []),
    # LRURec's ML-1M sorts same-second ratings by item id; RecBole keeps the file's order.
    # This row emulates RecBole's order (data.tie_order=shuffled_runs; docs/data.md).
    (
        "ML-1M RecBLR (all_positions, shuffled runs)",
        "configs/ml-1m-item-order/recblr-all-positions.yaml",
        ["data.tie_order=shuffled_runs"],
    ),
    # Beyond the paper's size, one change a row (run with --seeds 0 to explore).
    (
        "ML-1M RecBLR d=128 (all_positions)",
        "configs/ml-1m-item-order/recblr-all-positions.yaml",
        ["model.recblr.embedding_dim=128"],
    ),
    (
        "ML-1M RecBLR d=256 (all_positions)",
        "configs/ml-1m-item-order/recblr-all-positions.yaml",
        ["model.recblr.embedding_dim=256"],
    ),
    ("ML-1M RecBLR 4 layers (all_positions)", "configs/ml-1m-item-order/recblr-4-layers.yaml", []),
    # RecBLR's cost is linear in the length: train and evaluate on whole histories (<= 2,277 items).
    (
        "ML-1M RecBLR whole histories (all_positions)",
        "configs/ml-1m-item-order/recblr-all-positions.yaml",
        ["data.max_len=2400"],
    ),
    (
        "ML-1M RecBLR dropout 0.1 (all_positions)",
        "configs/ml-1m-item-order/recblr-all-positions.yaml",
        ["model.recblr.dropout=0.1"],
    ),
    (
        "ML-1M RecBLR dropout 0.3 (all_positions)",
        "configs/ml-1m-item-order/recblr-all-positions.yaml",
        ["model.recblr.dropout=0.3"],
    ),
    ("Beauty RecBLR d=128 (prefixes)", "configs/beauty/recblr-paper.yaml", ["model.recblr.embedding_dim=128"]),
    ("Beauty RecBLR d=256 (prefixes)", "configs/beauty/recblr-paper.yaml", ["model.recblr.embedding_dim=256"]),
    ("Beauty RecBLR 4 layers (prefixes)", "configs/beauty/recblr-4-layers.yaml", []),
    (
        "Beauty RecBLR 4 layers d=128 (prefixes)",
        "configs/beauty/recblr-paper.yaml",
        ["model.recblr.num_layers=4", "model.recblr.embedding_dim=128"],
    ),
    ("Beauty RecBLR lr 2e-3 (prefixes)", "configs/beauty/recblr-paper.yaml", ["train.lr=0.002"]),
    ("Beauty RecBLR dropout 0.3 (prefixes)", "configs/beauty/recblr-paper.yaml", ["model.recblr.dropout=0.3"]),
    ("Beauty RecBLR dropout 0.7 (prefixes)", "configs/beauty/recblr-paper.yaml", ["model.recblr.dropout=0.7"]),
    (
        "Beauty RecBLR (all_positions)",
        "configs/beauty/recblr-paper.yaml",
        ["train.protocol=all_positions", "train.batch_size=256"],
    ),
    ("Beauty RecBLR (prefixes, paper)", "configs/beauty/recblr-paper.yaml", []),
    ("Beauty SASRec-style (prefixes)", "configs/beauty/sasrec-paper.yaml", []),
    # Label smoothing (beyond the paper): the frozen variant, the paper's 2 layers with it, and the
    # Transformer given the same change.
    ("Beauty RecBLR 4 layers, label smoothing 0.3 (prefixes)", "configs/beauty/recblr-label-smoothing.yaml", []),
    ("Beauty RecBLR label smoothing 0.3 (prefixes)", "configs/beauty/recblr-paper.yaml", ["train.label_smoothing=0.3"]),
    (
        "Beauty SASRec-style label smoothing 0.3 (prefixes)",
        "configs/beauty/sasrec-paper.yaml",
        ["train.label_smoothing=0.3"],
    ),
]
# The paper's Table 1, test set, full ranking (docs/results.md).
PAPER = {
    "ML-1M": {
        "SASRec": (0.2993, 0.1692, 0.1294, 0.4053, 0.1958, 0.1367),
        "RecBLR": (0.3285, 0.1901, 0.1478, 0.4336, 0.2161, 0.1547),
    },
    "Beauty": {
        "SASRec": (0.0829, 0.0409, 0.0281, 0.1163, 0.0494, 0.0304),
        "RecBLR": (0.0881, 0.0446, 0.0313, 0.1243, 0.0538, 0.0338),
    },
}


def run_dir(runs_dir: str, row: str, seed: int) -> str:
    slug = "-".join("".join(ch if ch.isalnum() else " " for ch in row.lower()).split())
    return os.path.join(runs_dir, f"{slug}-seed{seed}")


def pending_runs(args: argparse.Namespace, plan: Sequence) -> List[Run]:
    runs = []
    for row, config, overrides in plan:
        for seed in args.seeds:
            out = run_dir(args.runs_dir, row, seed)
            if os.path.isfile(os.path.join(out, METRICS_JSON)):
                continue
            command = [sys.executable, os.path.join(ROOT, "launchers", "train.py"), "--config", config]
            command += ["--data-dir", args.data_dir, "--output-dir", out, "--set", f"train.seed={seed}"]
            for item in overrides + args.overrides:
                command += ["--set", item]
            runs.append(Run(f"{row} seed {seed}", out, command))
    return runs


def run_slice(args: argparse.Namespace, plan: Sequence) -> bool:
    """Advances the plan within the budget; returns True when every run has finished."""
    deadline = time.monotonic() + 60 * args.budget_minutes
    failed, _ = run_pool(pending_runs(args, plan), args.parallel, deadline, ROOT, mps=args.mps, retries=args.retries)
    if failed:
        raise RuntimeError(f"runs failed: {', '.join(failed)}; see train.log in their output directories")
    return not pending_runs(args, plan)


def _cells(values: List[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def summarise(runs_dir: str, plan: Sequence, seeds: Sequence[int]) -> str:
    lines = [
        "| run | seeds | " + " | ".join(METRICS) + " | train time (s) | epochs (best) |",
        "|---|---|" + "---|" * (len(METRICS) + 2),
    ]
    for dataset, rows in PAPER.items():
        for model, values in rows.items():
            lines.append(f"| {dataset} {model} (paper) | - | " + " | ".join(f"{v:.4f}" for v in values) + " | - | - |")
    for row, _, _ in plan:
        found = (read_metrics(run_dir(runs_dir, row, seed)) for seed in seeds)
        done: List[Dict] = [metrics for metrics in found if metrics is not None]
        if not done:
            continue
        cells = [_cells([m["test"][name] for m in done]) for name in METRICS]
        seconds = statistics.mean(m["train_seconds"] for m in done)
        epochs = statistics.mean(m["epochs"] for m in done)
        best = statistics.mean(m["best_epoch"] for m in done)
        lines.append(
            f"| {row} | {len(done)} | " + " | ".join(cells) + f" | {seconds:.0f} | {epochs:.0f} ({best:.0f}) |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "paper"))
    add_pool_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", default=[], help="rows whose name contains one of these")
    add_overrides_argument(
        parser, "overrides applied to every run (several after one --set, as the launcher takes them)"
    )
    args = parser.parse_args(argv)
    resolve_paths(parser, args)
    plan = [entry for entry in PLAN if not args.only or any(word in entry[0] for word in args.only)]
    if not plan:
        parser.error(f"--only {args.only} matches no row; rows: {[row for row, _, _ in PLAN]}")
    finished = run_slice(args, plan)
    table = summarise(args.runs_dir, PLAN, args.seeds)
    os.makedirs(args.runs_dir, exist_ok=True)
    with open(os.path.join(args.runs_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print("all runs finished" if finished else "more to run: call again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
