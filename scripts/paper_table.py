"""Runs the paper-table experiments in resumable slices and writes the results table.

Each run is ``launchers/train.py`` with a config and a seed, in its own output directory. A call
works through the plan until its time budget is spent; a run cut off mid-way resumes from its last
epoch checkpoint on the next call (the GPU machine allows 10-minute calls). Finished runs
(``metrics.json`` present) are skipped. The table (mean and standard deviation over seeds, with
wall time and epochs) is written to ``<runs-dir>/table.md`` after every call.

    python scripts/paper_table.py --data-dir ../shared/data --runs-dir runs/paper --budget-minutes 9
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20", "MRR@20")
# (row name, config, extra overrides); every row runs once per seed.
PLAN = [
    ("ML-1M RecBLR (prefixes)", "configs/ml-1m.yaml", []),
    ("ML-1M RecBLR (all_positions)", "configs/ml-1m.yaml", ["train.protocol=all_positions", "train.batch_size=128"]),
    ("ML-1M SASRec-style (prefixes)", "configs/ml-1m-sasrec.yaml", []),
    ("Beauty RecBLR (prefixes)", "configs/beauty.yaml", []),
]
SEEDS = (0, 1, 2)


def run_dir(runs_dir: str, row: str, seed: int) -> str:
    slug = "".join(ch if ch.isalnum() else "-" for ch in row.lower()).strip("-")
    return os.path.join(runs_dir, f"{slug}-seed{seed}")


def run_slice(args: argparse.Namespace, plan: Sequence) -> bool:
    """Advances the plan within the budget; returns True when every run has finished."""
    deadline = time.monotonic() + 60 * args.budget_minutes
    for row, config, overrides in plan:
        for seed in SEEDS:
            out = run_dir(args.runs_dir, row, seed)
            if os.path.isfile(os.path.join(out, "metrics.json")):
                continue
            remaining = deadline - time.monotonic()
            if remaining < 30:
                return False
            command = [sys.executable, os.path.join(ROOT, "launchers", "train.py"), "--config", config]
            command += ["--data-dir", args.data_dir, "--output-dir", out, "--set", f"train.seed={seed}"]
            for item in overrides + args.set:
                command += ["--set", item]
            print(f"[{row} seed {seed}] {' '.join(command)}", flush=True)
            try:
                subprocess.run(command, cwd=ROOT, timeout=remaining, check=True)
            except subprocess.TimeoutExpired:
                print(f"[{row} seed {seed}] budget spent; the next call resumes it", flush=True)
                return False
    return True


def summarise(runs_dir: str, plan: Sequence) -> str:
    lines = [
        "| run | seeds | " + " | ".join(METRICS) + " | train time (s) | epochs |",
        "|---|---|" + "---|" * (len(METRICS) + 2),
    ]
    for row, _, _ in plan:
        done: List[Dict] = []
        for seed in SEEDS:
            path = os.path.join(run_dir(runs_dir, row, seed), "metrics.json")
            if os.path.isfile(path):
                with open(path) as f:
                    done.append(json.load(f))
        if not done:
            continue
        cells = []
        for name in METRICS:
            values = [m["test"][name] for m in done]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
        seconds = statistics.mean(m["train_seconds"] for m in done)
        epochs = statistics.mean(m["epochs"] for m in done)
        lines.append(f"| {row} | {len(done)} | " + " | ".join(cells) + f" | {seconds:.0f} | {epochs:.0f} |")
    return "\n".join(lines)


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("RECBLR_DATA_DIR"), required=False)
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "paper"))
    parser.add_argument("--budget-minutes", type=float, default=9.0)
    parser.add_argument("--set", action="append", default=[], help="override applied to every run")
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error("pass --data-dir or set RECBLR_DATA_DIR")
    finished = run_slice(args, PLAN)
    table = summarise(args.runs_dir, PLAN)
    os.makedirs(args.runs_dir, exist_ok=True)
    with open(os.path.join(args.runs_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print("all runs finished" if finished else "more to run: call again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
