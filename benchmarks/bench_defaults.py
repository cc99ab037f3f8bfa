"""Process wall time of a whole training run (start to metrics.json): the config as shipped against
the same config pinned to fp32 eager, one run after the other on one machine; with the times at
which each run printed its banner, its first epoch's line and its final table.

    python benchmarks/bench_defaults.py --data-dir DATA --config configs/beauty/recblr-paper.yaml \
        --out benchmarks/results/defaults_beauty_h100.json

Each variant runs ``launchers/train.py`` in a fresh run folder, alone; the data cache is built
before the first, so neither pays it. The shipped variant runs first (it pays the cold Triton
and CUDA caches). Recorded per variant: process wall seconds, training seconds, validations and
their mean seconds, epochs, the best epoch, test metrics, and the precision and CUDA-graph setting
the run resolved; and the wall-time ratio shipped / fp32 eager.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from recblr_torchrec.results import versions
from recblr_torchrec.training.history import read_history, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"shipped": [], "fp32_eager": ["train.precision=fp32", "train.cuda_graphs=false"]}


def run_variant(config: str, data_dir: str, cache: str, settings: list, folder: str) -> dict:
    command = [sys.executable, os.path.join(ROOT, "launchers", "train.py"), "--config", config]
    command += ["--data-dir", data_dir, "--output-dir", folder, "--set", f"data.cache_dir={cache}", *settings]
    start = time.perf_counter()
    marks, lines = {}, []  # when the banner, the first epoch's line and the final table appeared
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            for mark, prefix in (
                ("banner_s", "run "),
                ("first_epoch_line_s", "epoch 1:"),
                ("final_table_s", "best epoch"),
            ):
                if line.startswith(prefix) and mark not in marks:
                    marks[mark] = round(time.perf_counter() - start, 2)
        stderr = process.stderr.read()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    metrics, rows = read_metrics(folder), read_history(folder)
    validations = [row["valid_seconds"] for row in rows if row.get("valid_seconds")]
    return {
        "settings": settings,
        "process_wall_s": round(wall, 2),
        "train_s": round(metrics["train_seconds"], 2),
        "validations": len(validations),
        "valid_s_mean": round(sum(validations) / max(len(validations), 1), 4),
        "epochs": metrics["epochs"],
        "best_epoch": metrics["best_epoch"],
        "test": metrics["test"],
        "precision": metrics["config"]["train"]["precision"],
        "cuda_graphs": metrics["config"]["train"]["cuda_graphs"],
        "first_epoch_train_s": round(rows[0]["seconds"], 2),
        "later_epoch_train_s_median": round(sorted(row["seconds"] for row in rows[1:])[len(rows[1:]) // 2], 3)
        if len(rows) > 1
        else None,
        **marks,
        "stdout_tail": lines[-12:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "beauty", "recblr-paper.yaml"))
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", required=True, help="the results JSON")
    parser.add_argument("--commit", default="", help="the code's commit, recorded in the JSON")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from recblr_torchrec.config import load_config
    from recblr_torchrec.training.trainer import load_data

    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        load_data(
            load_config(args.config, [f"data.cache_dir={cache}"]), args.data_dir
        )  # built once, outside the timings
        runs = {
            name: run_variant(args.config, args.data_dir, cache, s, os.path.join(tmp, name))
            for name, s in VARIANTS.items()
        }
    result = {
        "what": "process wall time of a whole training run, start to metrics.json, each variant alone",
        "config": os.path.relpath(args.config, ROOT),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "versions": versions(),
        "commit": args.commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "runs": runs,
        "wall_ratio_shipped_over_fp32_eager": round(
            runs["shipped"]["process_wall_s"] / runs["fp32_eager"]["process_wall_s"], 3
        ),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for name, run in runs.items():
        print(
            f"{name}: {run['process_wall_s']:.1f} s wall, {run['train_s']:.1f} s training, {run['validations']} "
            f"validations of {run['valid_s_mean']:.3f} s, {run['epochs']} epochs, test NDCG@10 "
            f"{run['test']['NDCG@10']:.4f} ({run['precision']}, CUDA graphs {run['cuda_graphs']})"
        )


if __name__ == "__main__":
    main()
