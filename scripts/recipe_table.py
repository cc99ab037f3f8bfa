"""The tuned recipe against the paper config: seeds of each row trained, then one results JSON.

Per dataset three rows: the paper config (``configs/<dataset>/recblr-all-positions.yaml``: the
paper's hyper-parameters with a loss at every position), the tuned RecBLR
(``recblr-tuned.yaml``) and the tuned SASRec-style baseline (``sasrec-tuned.yaml``), each over
``--seeds``, every row with the same execution settings (the shipped defaults: bf16 and CUDA
graphs on a GPU). Runs share the visible GPUs, ``--parallel`` at a time (with ``--mps``, as
clients of an MPS daemon, their kernels side by side), in resumable slices of ``--budget-minutes``
(``recblr_torchrec.training.pool``); finished runs are not trained again. ``--rows`` trains some
rows only, ``--datasets`` some datasets: the others are kept from the results JSON already at
``--out``, each with its provenance (a kept row also stands until its replacement has every seed;
the file's other notes are kept as they are). A tuned row timed against a kept paper-config row
says so (``paper_config_measured_apart``): its time ratio compares runs of different calls.

For each row the JSON holds every metric's mean and standard deviation over the seeds, the wall
time to the best epoch (training and validation of every epoch up to it), and, for the tuned rows,
the time to quality: the wall time until validation first reaches the paper config's best
validation metric (mean over its seeds), over the paper config's wall time to its best epoch.
Runs stopped before they finished are listed under ``unfinished`` with their progress (epochs,
wall time, best validation so far).

    python scripts/recipe_table.py --data-dir DATA --runs-dir runs/recipe --parallel 16 \\
        --out benchmarks/results/recipe_h100.json [--datasets beauty video_games] [--seeds 0 1 2 3 4]
"""

import argparse
import json
import os
import statistics
import sys
from typing import Any, Dict, List, Optional, Tuple

from recblr_torchrec.config import add_overrides_argument
from recblr_torchrec.results import spread, write_results
from recblr_torchrec.training.history import METRICS_JSON, run_progress, run_summary
from recblr_torchrec.training.pool import (
    Run,
    add_pool_arguments,
    pool_provenance,
    report_pool,
    resolve_paths,
    run_pool_of_args,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ("ml-1m", "beauty", "video_games")
ROWS = (
    ("paper config", "recblr-all-positions.yaml"),
    ("tuned RecBLR", "recblr-tuned.yaml"),
    ("tuned SASRec-style", "sasrec-tuned.yaml"),
)
METRICS = ("HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20", "MRR@20")


def slug(row: str) -> str:
    return row.replace(" ", "-").lower()


def run_dir(runs_dir: str, dataset: str, row: str, seed: int) -> str:
    return os.path.join(runs_dir, dataset, slug(row), f"seed{seed}")


def plan(args: argparse.Namespace) -> List[Run]:
    runs = []
    for dataset in args.datasets:
        for row, config in ROWS:
            if slug(row) not in args.rows:
                continue
            for seed in args.seeds:
                out = run_dir(args.runs_dir, dataset, row, seed)
                if os.path.isfile(os.path.join(out, METRICS_JSON)):
                    continue
                command = [sys.executable, os.path.join(ROOT, "launchers", "train.py")]
                command += ["--config", os.path.join("configs", dataset, config), "--data-dir", args.data_dir]
                command += ["--output-dir", out, "--set", f"train.seed={seed}"]
                for item in args.overrides:
                    command += ["--set", item]
                runs.append(Run(f"{dataset} {row} seed {seed}", out, command))
    return runs


def time_to(curve: List[List[float]], target: float) -> Optional[float]:
    """The wall time at which the validation curve first reaches ``target`` (None: never)."""
    return next((wall for wall, value in curve if value >= target), None)


def summarise_row(
    dataset: str, row: str, config: str, done: Dict[int, Dict[str, Any]], paper: Optional[Dict[str, Any]]
) -> Dict[str, Any]:
    """One row of the table from its finished runs (``run_summary``, by seed); ``paper``: the paper
    config's row of the dataset, for the tuned rows' ratios (None: no ratios)."""
    runs = list(done.values())
    entry: Dict[str, Any] = {
        "dataset": dataset,
        "row": row,
        "config": f"configs/{dataset}/{config}",
        "seeds": sorted(done),
        "metrics": {name: spread([run["test"][name] for run in runs]) for name in METRICS},
        "valid_best": spread([run["valid_best"] for run in runs]),
        "wall_to_best_s": round(statistics.mean(run["wall_to_best_s"] for run in runs), 1),
        "best_epoch": round(statistics.mean(run["best_epoch"] for run in runs), 1),
    }
    if paper is not None:
        target = statistics.mean(run["valid_best"] for run in paper["runs"].values())  # unrounded
        reach = [time_to(run["valid_curve"], target) for run in runs]
        reached = statistics.mean(reach) if all(t is not None for t in reach) else None
        entry["time_to_paper_valid_best_s"] = None if reached is None else round(reached, 1)
        entry["seeds_reaching_paper_valid_best"] = sum(t is not None for t in reach)
        if reached is not None:
            entry["time_to_quality_ratio"] = round(reached / paper["wall_to_best_s"], 3)
        if "provenance" in paper:  # kept from an earlier JSON: another call, perhaps another load or GPU
            entry["paper_config_measured_apart"] = True
        ndcg = [statistics.mean(r["test"]["NDCG@10"] for r in rs) for rs in (runs, paper["runs"].values())]
        entry["ndcg10_over_paper_config"] = round(ndcg[0] / ndcg[1], 3)
    entry["runs"] = {str(seed): run for seed, run in done.items()}
    return entry


def kept_rows(earlier: Dict[str, Any]) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """The rows of an earlier results JSON by (dataset, row), each with its own provenance."""
    return {
        (entry["dataset"], entry["row"]): {**entry, "provenance": entry.get("provenance", earlier.get("provenance"))}
        for entry in earlier.get("rows", [])
    }


def summarise(
    args: argparse.Namespace, metric: str = "NDCG@10", kept: Optional[Dict[Tuple[str, str], Dict[str, Any]]] = None
) -> Dict[str, List[Dict[str, Any]]]:
    """The finished rows, and the runs not finished yet with their progress. A row of ``kept`` (an
    earlier JSON's) stands for a row not trained here, or trained here on fewer than every seed."""
    rows, unfinished = [], []
    for dataset in DATASETS:
        paper: Optional[Dict[str, Any]] = None
        for row, config in ROWS:
            earlier = (kept or {}).get((dataset, row))
            done = {}
            if dataset in args.datasets and slug(row) in args.rows:
                for seed in args.seeds:
                    out = run_dir(args.runs_dir, dataset, row, seed)
                    run = run_summary(out, metric)
                    if run is not None:
                        done[seed] = run
                        continue
                    so_far = run_progress(out, metric)
                    if so_far is not None:
                        unfinished.append({"dataset": dataset, "row": row, "seed": seed, **so_far})
            if earlier is not None and len(done) < len(args.seeds):  # kept until every seed is trained again
                entry = earlier
            elif done:
                entry = summarise_row(dataset, row, config, done, None if row == ROWS[0][0] else paper)
            else:
                continue
            if row == ROWS[0][0]:
                paper = entry
            rows.append(entry)
    return {"rows": rows, "unfinished": unfinished}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "recipe"))
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    names = [slug(row) for row, _ in ROWS]
    parser.add_argument("--rows", nargs="+", choices=names, default=names, help="the rows to train (default: all)")
    add_pool_arguments(parser)
    parser.add_argument("--out", help="the results JSON (default: <runs-dir>/recipe.json)")
    parser.add_argument("--commit", help="the code's commit, where the checkout has no git metadata")
    add_overrides_argument(parser, "overrides for every run (for a quick check; the table's rows use none)")
    args = parser.parse_args(argv)
    resolve_paths(parser, args, "runs_dir", "out")
    out = args.out or os.path.join(args.runs_dir, "recipe.json")
    earlier: Dict[str, Any] = {}
    partial = set(args.rows) != set(names) or set(args.datasets) != set(DATASETS)
    if partial and os.path.isfile(out):
        with open(out) as f:
            earlier = json.load(f)
    kept = kept_rows(earlier)
    missing = [f"{d} {r}" for d in args.datasets for r, _ in ROWS if slug(r) not in args.rows and (d, r) not in kept]
    if missing:
        print(f"not in {out}, so not in the table: {', '.join(missing)}", flush=True)
    failed, finished = run_pool_of_args(plan(args), args, ROOT)
    result = {
        "provenance": pool_provenance(args, "scripts/recipe_table.py", argv, ROOT),
        "what": "test metrics (full ranking) over seeds, paper config against the tuned recipe and the tuned "
        "SASRec-style baseline; wall times include validation; time_to_quality_ratio: the tuned row's time to "
        "the paper config's best validation NDCG@10 over the paper config's time to its best epoch",
        "finished": finished and not failed and not plan(args),
        **summarise(args, kept=kept),
    }
    result.update({key: value for key, value in earlier.items() if key not in result})  # e.g. progress notes
    write_results(out, result)
    for row in result["rows"]:
        print(f"{row['dataset']} {row['row']}: test NDCG@10 {row['metrics']['NDCG@10']}, seeds {row['seeds']}")
    report_pool(failed, result["finished"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
