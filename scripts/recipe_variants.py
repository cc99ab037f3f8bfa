"""Variants of the tuned recipe on several datasets and seeds, all in one pool of runs, then one
results JSON that sets each variant beside the recipe's own runs of the same seeds.

A variant is a name and settings over ``configs/<dataset>/recblr-tuned.yaml`` (or over another
config of the dataset's folder), listed in a YAML file::

    datasets: [beauty, video_games]
    seeds: [0, 1, 2, 3, 4]
    variants:
      cosine, temperature 0.07: {model.score_temperature: 0.07}
      SASRec-style, cosine 0.07:            # the long form: its own config, datasets or seeds
        config: sasrec-tuned.yaml
        seeds: [0]
        set: {model.score_temperature: 0.07}

Every run of every variant shares the pool (``--parallel`` at a time; ``--mps``), in resumable
slices of ``--budget-minutes``; finished runs are not trained again, so the same command goes on
where the last call stopped. ``--set`` adds overrides to every run (a quick check).

The reference is the recipe table's JSON (``--reference``, written by ``scripts/recipe_table.py``):
the runs of its row of the variant's config (the tuned RecBLR row for ``recblr-tuned.yaml``, the
SASRec-style row for ``sasrec-tuned.yaml``) and the variant's seeds are the other side of the
comparison (called the recipe's below), and its paper config's test NDCG@10 divides the variant's
(``ndcg10_over_paper_config``). Per variant and
dataset: best validation NDCG@10 and test metrics over the seeds, ``valid_over_recipe`` (its mean
best validation over the recipe's on the same seeds) and the epochs until validation first reaches
the paper config's best (the mean over its seeds: the mark of the table's time to quality). Per
variant, ``higher_on_every_dataset``: whether it validates above
the recipe on each of its datasets, the rule by which a setting joins the recipe
(docs/training.md#the-tuned-recipe). Runs not finished are listed with their progress.

    python scripts/recipe_variants.py --spec scripts/variants/cosine-scores.yaml --data-dir DATA \\
        --runs-dir runs/variants --parallel 24 --mps --out RUNS/variants.json
"""

import argparse
import json
import os
import re
import statistics
import sys
from typing import Any, Dict, List, Optional

import yaml

from recblr_torchrec.config import add_overrides_argument
from recblr_torchrec.errors import ConfigError
from recblr_torchrec.results import spread, write_results
from recblr_torchrec.training.history import METRICS_JSON, epochs_to, run_progress, run_summary
from recblr_torchrec.training.pool import (
    Run,
    add_pool_arguments,
    pool_provenance,
    report_pool,
    resolve_paths,
    run_pool_of_args,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE_CONFIG = "recblr-tuned.yaml"
METRIC = "NDCG@10"
TEST_METRICS = ("NDCG@10", "HR@10")


def folder_name(variant: str) -> str:
    """A variant's folder under each dataset: its name in lower case, runs of other characters as ``-``."""
    return re.sub(r"[^a-z0-9.]+", "-", variant.lower()).strip("-")


def read_spec(path: str) -> List[Dict[str, Any]]:
    """The variants of a spec file, each with its name, config, datasets, seeds and settings."""
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    unknown = set(spec) - {"datasets", "seeds", "variants"}
    if unknown or not spec.get("variants"):
        raise ConfigError(
            f"{path}: a spec has datasets, seeds and variants (a name and its settings each); got {sorted(spec)}"
        )
    variants = []
    for name, body in spec["variants"].items():
        body = dict(body or {})
        long_form = set(body) <= {"config", "datasets", "seeds", "set"} and bool(set(body) & {"config", "set"})
        own = body if long_form else {}  # the short form is the settings alone
        variant = {
            "variant": str(name),
            "config": own.get("config", RECIPE_CONFIG),
            "datasets": list(own.get("datasets", spec.get("datasets", []))),
            "seeds": [int(seed) for seed in own.get("seeds", spec.get("seeds", [0]))],
            "settings": dict(body.get("set", {}) if long_form else body),
        }
        if not variant["datasets"]:
            raise ConfigError(f"{path}: variant {name!r} names no dataset; add datasets: [...] to the spec or to it")
        variants.append(variant)
    return variants


def run_dir(runs_dir: str, dataset: str, variant: str, seed: int) -> str:
    return os.path.join(runs_dir, dataset, folder_name(variant), f"seed{seed}")


def plan(variants: List[Dict[str, Any]], args: argparse.Namespace) -> List[Run]:
    runs = []
    for variant in variants:
        for dataset in variant["datasets"]:
            for seed in variant["seeds"]:
                out = run_dir(args.runs_dir, dataset, variant["variant"], seed)
                if os.path.isfile(os.path.join(out, METRICS_JSON)):
                    continue
                sets = [f"train.seed={seed}"] + [f"{key}={value}" for key, value in variant["settings"].items()]
                sets += args.overrides
                command = [sys.executable, os.path.join(ROOT, "launchers", "train.py"), "--data-dir", args.data_dir]
                command += ["--config", os.path.join("configs", dataset, variant["config"]), "--output-dir", out]
                runs.append(Run(f"{dataset} {variant['variant']} seed {seed}", out, command + ["--set", *sets]))
    return runs


def reference_rows(path: str) -> Dict[str, Dict[str, Any]]:
    """The recipe table's rows by dataset, each under its config's file name (``recblr-tuned.yaml``,
    ``sasrec-tuned.yaml``, ...), the paper config's also under ``paper``."""
    with open(path) as f:
        table = json.load(f)
    rows: Dict[str, Dict[str, Any]] = {}
    for entry in table.get("rows", []):
        by_config = rows.setdefault(entry["dataset"], {})
        by_config[os.path.basename(entry["config"])] = entry
        if entry["row"] == "paper config":
            by_config["paper"] = entry
    return rows


def same_config_side(row: Optional[Dict[str, Any]], seeds: List[int]) -> Optional[Dict[str, Any]]:
    """The best validation and test NDCG@10 of ``row``'s runs of ``seeds`` (None: no such row, or a
    seed not in it)."""
    runs = (row or {}).get("runs", {})
    if not all(str(seed) in runs for seed in seeds):
        return None
    chosen = [runs[str(seed)] for seed in seeds]
    return {
        "valid_best": statistics.mean(run["valid_best"] for run in chosen),
        "test": statistics.mean(run["test"][METRIC] for run in chosen),
    }


def summarise(
    variants: List[Dict[str, Any]], args: argparse.Namespace, reference: Dict[str, Dict[str, Any]]
) -> Dict[str, Any]:
    """Each variant's row per dataset, the variants' verdicts and the runs not finished yet."""
    rows, verdicts, unfinished = [], [], []
    for variant in variants:
        ratios: Dict[str, Optional[float]] = {}
        for dataset in variant["datasets"]:
            done: Dict[int, Dict[str, Any]] = {}
            paper = reference.get(dataset, {}).get("paper")
            mark = statistics.mean(run["valid_best"] for run in paper["runs"].values()) if paper else None
            for seed in variant["seeds"]:
                out = run_dir(args.runs_dir, dataset, variant["variant"], seed)
                run = run_summary(out, METRIC)
                if run is None:
                    so_far = run_progress(out, METRIC)
                    if so_far is not None:
                        unfinished.append({"dataset": dataset, "variant": variant["variant"], "seed": seed, **so_far})
                    continue
                if mark is not None:
                    run["epochs_to_paper_valid_best"] = epochs_to(out, METRIC, mark)
                done[seed] = run
            if not done:
                ratios[dataset] = None
                continue
            runs = list(done.values())
            entry: Dict[str, Any] = {
                "dataset": dataset,
                "variant": variant["variant"],
                "config": f"configs/{dataset}/{variant['config']}",
                "settings": variant["settings"],
                "seeds": sorted(done),
                "valid_best": spread(run["valid_best"] for run in runs),
                "metrics": {name: spread(run["test"][name] for run in runs) for name in TEST_METRICS},
                "best_epoch": round(statistics.mean(run["best_epoch"] for run in runs), 1),
            }
            if mark is not None:
                reached = [run["epochs_to_paper_valid_best"] for run in runs]
                entry["paper_valid_best"] = round(mark, 4)
                entry["seeds_reaching_paper_valid_best"] = sum(epoch is not None for epoch in reached)
                if all(epoch is not None for epoch in reached):
                    entry["mean_epochs_to_paper_valid_best"] = round(statistics.mean(reached), 1)
            recipe = same_config_side(reference.get(dataset, {}).get(variant["config"]), sorted(done))
            mean_valid = statistics.mean(run["valid_best"] for run in runs)
            ratio = mean_valid / recipe["valid_best"] if recipe is not None and recipe["valid_best"] > 0 else None
            if ratio is not None:
                entry["recipe_valid_best"] = round(recipe["valid_best"], 4)
                entry["recipe_NDCG@10"] = round(recipe["test"], 4)
                entry["valid_over_recipe"] = round(ratio, 3)
            ratios[dataset] = ratio
            if paper is not None and paper["metrics"][METRIC]["mean"] > 0:
                entry["ndcg10_over_paper_config"] = round(
                    statistics.mean(run["test"][METRIC] for run in runs) / paper["metrics"][METRIC]["mean"], 3
                )
            entry["runs"] = {str(seed): run for seed, run in done.items()}
            rows.append(entry)
        known = [ratio for ratio in ratios.values() if ratio is not None]
        verdicts.append(
            {
                "variant": variant["variant"],
                "datasets": variant["datasets"],
                "mean_valid_over_recipe": round(statistics.mean(known), 3) if known else None,
                "higher_on_every_dataset": bool(ratios) and all(r is not None and r > 1.0 for r in ratios.values()),
            }
        )
    return {"variants": rows, "verdicts": verdicts, "unfinished": unfinished}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="the variants (a YAML file; see above)")
    parser.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "variants"))
    parser.add_argument(
        "--reference",
        default=os.path.join(ROOT, "benchmarks", "results", "recipe_h100.json"),
        help="the recipe table's JSON: the recipe's runs and the paper config's test metrics",
    )
    add_pool_arguments(parser)
    parser.add_argument("--out", help="the results JSON (default: <runs-dir>/variants.json)")
    parser.add_argument("--commit", help="the code's commit, where the checkout has no git metadata")
    add_overrides_argument(parser, "overrides for every run (for a quick check; the variants' runs use none)")
    args = parser.parse_args(argv)
    resolve_paths(parser, args, "runs_dir", "out", "reference", "spec")
    if not os.path.isfile(args.reference):
        parser.error(
            f"--reference {args.reference} not found: pass the recipe table's JSON (scripts/recipe_table.py --out)"
        )
    variants = read_spec(args.spec)
    failed, finished = run_pool_of_args(plan(variants, args), args, ROOT)
    result = {
        "provenance": pool_provenance(args, "scripts/recipe_variants.py", argv, ROOT),
        "what": "variants of the tuned recipe against the recipe's runs of the same seeds in "
        f"{os.path.relpath(args.reference, ROOT)}: best validation NDCG@10 and test metrics over seeds; "
        "valid_over_recipe: mean best validation over the recipe's; ndcg10_over_paper_config: test NDCG@10 over "
        "the paper config's; epochs_to_paper_valid_best: the first epoch whose validation reaches the paper "
        "config's mean best; higher_on_every_dataset: the rule by which a setting joins the recipe",
        "finished": finished and not failed and not plan(variants, args),
        **summarise(variants, args, reference_rows(args.reference)),
    }
    out = args.out or os.path.join(args.runs_dir, "variants.json")
    write_results(out, result)
    for verdict in result["verdicts"]:
        print(
            f"{verdict['variant']}: validation {verdict['mean_valid_over_recipe']} of the recipe's on average; "
            f"higher on every dataset: {verdict['higher_on_every_dataset']}"
        )
    report_pool(failed, result["finished"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
