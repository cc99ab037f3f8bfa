"""A budgeted hyper-parameter search that selects on validation alone, resumable from its log.

Trials are sampled from a search space (the encoder's default below, or ``--space FILE``), each a
``launchers/train.py`` run of the base config with the trial's ``--set`` overrides, with
``eval.test=false`` (the test split is never evaluated) and a training-time budget
(``train.time_budget_s``, evaluation not counted; early stopping still applies). Successive
halving (``--method halving``): every trial trains for the first budget, the best ``1/eta`` by
best validation metric continue (the same run folder, a raised budget) to the next, and so on;
``--method random`` trains every trial to the last budget. ``--parallel`` trials share the visible
GPUs at a time (small models share one well).

Everything goes to ``<out>/tune.json``: the space, every trial's overrides, and per rung its
validation curve (the metric after each validated epoch, with the seconds spent), best value and
epoch. A trial that exits with an error is run again (``--retries`` times, from its checkpoint);
then it is left out of the ranking, its exit status and the end of its log kept. A call stops at
``--budget-minutes``; the next call with the same ``--out`` continues from the log (trials still
running resume from their checkpoints). The best trial's overrides are printed and written to
``<out>/best.txt``, ready for ``--set``. Every search with the same ``--seed`` draws the same
trials from a space of the same keys: give searches that should explore differently their own
seeds.

    python scripts/tune.py --config configs/beauty/recblr-all-positions.yaml --data-dir DATA \\
        --out runs/tune/beauty-recblr --trials 27 --budgets 40 120 360 --eta 3 --parallel 9

One recipe for several datasets: run one search per dataset with the same ``--space`` and
``--seed`` (so trial ``t003`` is the same settings everywhere; a ``scale`` entry the same factor
of each base), then rank the trials across them::

    python scripts/tune.py --rank runs/tune/beauty runs/tune/ml-1m --out runs/tune/recipe

Only trials with a result in ``--rung`` (default 0, the only rung of ``--method random``) of
every search compete; a trial's score is the mean over the searches of its best validation value
there over the median of the competing trials in that search (so each dataset weighs the same,
whatever its scale). Halving promotes each search's own trials, so later rungs rarely share
trials. The ranking goes to ``<out>/ranking.json`` and the winner's overrides of each search to
``<out>/best.txt``.

A space file maps a dotted key (or several joined by ``,``, sampled together) to a list of
choices, ``{log_uniform: [low, high]}`` or ``{scale: [factors]}`` (one factor of the base config's
values, rounded for integers)::

    model.recblr.embedding_dim: [64, 128, 256]
    train.lr: {log_uniform: [3.0e-4, 3.0e-3]}
    data.max_len: {scale: [0.5, 1, 2]}
    train.optimizer,train.weight_decay: [[adam, 0.0], [adamw, 0.1]]
"""

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import yaml

from recblr_torchrec.config import add_overrides_argument, dotted, load_config
from recblr_torchrec.training.history import read_history, wall_curve
from recblr_torchrec.training.pool import Run, add_pool_arguments, resolve_paths, run_pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG = "tune.json"

# Training keys both encoders search; the protocol and its batch are drawn together (a batch of
# windows for all positions; the paper's 2,048 prefixes), as are the schedule and its length.
TRAIN_SPACE: Dict[str, Any] = {
    "train.lr": {"log_uniform": [3e-4, 3e-3]},
    "train.lr_schedule,train.max_epochs": [["constant", 400], ["cosine", 50], ["cosine", 100], ["cosine", 200]],
    "train.warmup_steps": [0, 200],
    "train.optimizer,train.weight_decay": [["adam", 0.0], ["adamw", 0.01], ["adamw", 0.1]],
    "train.protocol,train.batch_size": [
        ["all_positions", 64],
        ["all_positions", 128],
        ["all_positions", 256],
        ["all_positions", 512],
        ["prefixes", 2048],
    ],
    "train.label_smoothing": [0.0, 0.1, 0.2, 0.3],
    "data.max_len": {"scale": [0.5, 1, 2]},
}
SPACES: Dict[str, Dict[str, Any]] = {
    "recblr": {
        "model.recblr.embedding_dim": [64, 128, 256],
        "model.recblr.num_layers": [1, 2, 3, 4],
        "model.recblr.expand": [1, 2],
        "model.recblr.dropout": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        **TRAIN_SPACE,
    },
    "sasrec": {
        "model.sasrec.embedding_dim": [64, 128, 256],
        "model.sasrec.num_layers": [1, 2, 3, 4],
        "model.sasrec.num_heads": [1, 2, 4],
        "model.sasrec.dropout": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        **{key: value for key, value in TRAIN_SPACE.items() if key != "data.max_len"},
        "data.max_len,model.sasrec.max_positions": {"scale": [0.5, 1, 2]},  # positions cover the length
    },
}


def sample(space: Dict[str, Any], base: Dict[str, Any], rng: random.Random) -> List[str]:
    """One trial's ``key=value`` overrides drawn from ``space`` (``base``: the base config, dotted)."""
    overrides = []
    for spec_key, spec in space.items():
        keys = spec_key.split(",")
        if isinstance(spec, dict) and "log_uniform" in spec:
            low, high = spec["log_uniform"]
            values = [float(f"{math.exp(rng.uniform(math.log(low), math.log(high))):.3g}")]
        elif isinstance(spec, dict) and "scale" in spec:  # one factor for every key of the entry
            factor = rng.choice(spec["scale"])
            values = [max(1, round(base[k] * factor)) if isinstance(base[k], int) else base[k] * factor for k in keys]
        elif isinstance(spec, list) and spec:
            choice = rng.choice(spec)
            values = list(choice) if len(keys) > 1 else [choice]
        else:
            raise ValueError(f"search space entry {spec_key}: {spec!r}; give a list, log_uniform or scale")
        if len(values) != len(keys):
            raise ValueError(f"search space entry {spec_key}: {spec!r} must give {len(keys)} values at a time")
        overrides += [
            f"{key}={json.dumps(value) if isinstance(value, list) else value}" for key, value in zip(keys, values)
        ]
    return overrides


def read_curve(out: str, metric: str) -> Optional[Dict[str, Any]]:
    """A trial's validation curve from its per-epoch history (None before its first validation)."""
    history = read_history(out)
    curve = [
        {"epoch": p["epoch"], "value": p["value"], "seconds": p["seconds"]}
        for p in wall_curve(history, metric)
        if p["value"] is not None
    ]
    if not curve:
        return None
    best = max(curve, key=lambda point: point["value"])
    return {
        "curve": curve,
        "best": best["value"],
        "best_epoch": best["epoch"],
        "epochs": history[-1]["epoch"],
        "train_seconds": sum(row["seconds"] for row in history),
    }


def _tail(path: str, lines: int = 20) -> List[str]:
    """The last lines of a failed trial's log, kept in the search log beside its settings."""
    with open(path, errors="replace") as f:
        return [line.rstrip("\n") for line in f.readlines()[-lines:]]


def rung_results(log: Dict[str, Any], rung: int) -> Dict[str, float]:
    """The best value of each trial of a search with a result in ``rung``."""
    return {t["id"]: t["rungs"][str(rung)]["best"] for t in log["trials"] if "curve" in t["rungs"].get(str(rung), {})}


class Search:
    """The log and the halving rule (module docstring)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.path = os.path.join(args.out, LOG)
        if os.path.isfile(self.path):
            with open(self.path) as f:
                self.log = json.load(f)
            self._check_same_search()
            return
        base = load_config(args.config, args.overrides)
        if args.space:
            with open(args.space) as f:
                space = yaml.safe_load(f)
        else:
            space = SPACES[str(base.model.encoder)]
        rng = random.Random(args.seed)
        flat = dotted(base.to_dict())
        trials = []
        for index in range(args.trials):
            overrides = sample(space, flat, rng)
            load_config(args.config, args.overrides + overrides)  # a bad space fails before any run
            trials.append({"id": f"t{index:03d}", "overrides": overrides, "rungs": {}})
        budgets = args.budgets if args.method == "halving" else args.budgets[-1:]
        self.log = {
            "config": args.config,
            "overrides": args.overrides,
            "method": args.method,
            "budgets_s": budgets,
            "eta": args.eta,
            "seed": args.seed,
            "metric": base.eval.valid_metric,
            "space": space,
            "trials": trials,
        }
        self.save()

    def _check_same_search(self) -> None:
        given = {"config": self.args.config, "overrides": self.args.overrides, "method": self.args.method}
        differs = [
            f"{key}={value!r} (the log has {self.log[key]!r})" for key, value in given.items() if self.log[key] != value
        ]
        if differs:
            raise SystemExit(
                f"{self.path} holds another search: {', '.join(differs)}; use another --out or the log's settings"
            )
        kept = {"trials": len(self.log["trials"]), "eta": self.log["eta"], "seed": self.log["seed"]}
        ignored = [
            f"--{key} {getattr(self.args, key)}" for key, value in kept.items() if getattr(self.args, key) != value
        ]
        if ignored:
            print(f"continuing {self.path}: its {', '.join(kept)} stand; {', '.join(ignored)} ignored", flush=True)

    def save(self) -> None:
        os.makedirs(self.args.out, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.log, f, indent=1)
        os.replace(tmp, self.path)

    def trial_dir(self, trial: Dict[str, Any]) -> str:
        return os.path.join(self.args.out, "trials", trial["id"])

    def alive(self, rung: int) -> List[Dict[str, Any]]:
        """The trials that train in ``rung``: all in the first, then the best ``ceil(n / eta)``
        of the previous rung by best validation value."""
        trials = self.log["trials"]
        if rung == 0:
            return trials
        previous = [t for t in self.alive(rung - 1) if "curve" in t["rungs"].get(str(rung - 1), {})]
        previous.sort(key=lambda t: t["rungs"][str(rung - 1)]["best"], reverse=True)
        return previous[: math.ceil(len(previous) / self.log["eta"])]

    def command(self, trial: Dict[str, Any], budget: float) -> List[str]:
        command = [sys.executable, os.path.join(ROOT, "launchers", "train.py"), "--config", self.log["config"]]
        command += ["--output-dir", self.trial_dir(trial)]
        if self.args.data_dir:
            command += ["--data-dir", self.args.data_dir]
        for item in self.log["overrides"] + trial["overrides"] + ["eval.test=false", f"train.time_budget_s={budget}"]:
            command += ["--set", item]
        return command

    def _todo(self, rung: int) -> List[Dict[str, Any]]:
        """The trials of ``rung`` without a result, failed ones while they have retries left."""
        todo = []
        for trial in self.alive(rung):
            entry = trial["rungs"].get(str(rung))
            if entry is None or ("failed" in entry and entry.get("attempts", 1) <= self.args.retries):
                todo.append(trial)
        return todo

    def run(self, deadline: float) -> bool:
        """Advances the search until ``deadline``; True when every rung is done."""
        for rung, budget in enumerate(self.log["budgets_s"]):
            todo = self._todo(rung)  # the pool starts a failed trial again itself (--retries)
            if todo:
                by_id = {t["id"]: t for t in todo}

                def record(run: Run, code: int, rung: int = rung, by_id: Dict[str, Any] = by_id) -> None:
                    trial = by_id[run.name.split()[0]]
                    result = read_curve(run.out, self.log["metric"])
                    if code != 0:  # the pool ran it again --retries times: left out; the log keeps why
                        attempts = trial["rungs"].get(str(rung), {}).get("attempts", 0) + 1 + self.args.retries
                        tail = _tail(os.path.join(run.out, "train.log"))
                        result = {"failed": code, "attempts": attempts, "best": -1.0, "log_tail": tail}
                    if result is not None:
                        trial["rungs"][str(rung)] = result
                        self.save()

                runs = [Run(f"{t['id']} rung {rung}", self.trial_dir(t), self.command(t, budget)) for t in todo]
                failed, finished = run_pool(
                    runs,
                    self.args.parallel,
                    deadline,
                    ROOT,
                    on_exit=record,
                    mps=self.args.mps,
                    retries=self.args.retries,
                )
                if failed:
                    print(f"trials failed: {', '.join(failed)}; the end of each log is in {self.path}", flush=True)
                if not finished:
                    return False
            print(f"rung {rung} ({budget:g} s): {self.standings(rung)}", flush=True)
        return True

    def standings(self, rung: int) -> str:
        done = [t for t in self.log["trials"] if "curve" in t["rungs"].get(str(rung), {})]
        done.sort(key=lambda t: t["rungs"][str(rung)]["best"], reverse=True)
        return ", ".join(f"{t['id']} {t['rungs'][str(rung)]['best']:.4f}" for t in done[:5])

    def best(self) -> Optional[Tuple[Dict[str, Any], int]]:
        """The trial with the best validation value in the last rung any trial reached, and that rung."""
        for rung in reversed(range(len(self.log["budgets_s"]))):
            bests = rung_results(self.log, rung)
            if bests:
                winner = max(bests, key=lambda trial: bests[trial])
                return next(t for t in self.log["trials"] if t["id"] == winner), rung
        return None


def rank_across(outs: List[str], rung: int = 0) -> Dict[str, Any]:
    """The trials of searches that drew the same trials, by their mean relative best validation
    value in ``rung`` (module docstring)."""
    logs = []
    for out in outs:
        path = os.path.join(out, LOG)
        if not os.path.isfile(path):
            raise SystemExit(f"--rank {out}: no {LOG} there; give the --out folders of the searches")
        with open(path) as f:
            logs.append(json.load(f))
    for out, log in zip(outs, logs):
        if log["seed"] != logs[0]["seed"]:
            raise SystemExit(
                f"--rank: {out} drew other trials than {outs[0]}: sampler seed {log['seed']} against "
                f"{logs[0]['seed']}; rank searches run with the same --space and --seed"
            )
        if log["space"] != logs[0]["space"]:
            raise SystemExit(
                f"--rank: {out} drew other trials than {outs[0]}: another search space; "
                "rank searches run with the same --space and --seed"
            )
        if not rung_results(log, rung):
            raise SystemExit(f"--rank: {out} has no trial with a result in rung {rung} yet; let its search go on")
    results = [rung_results(log, rung) for log in logs]
    common = sorted(set.intersection(*(set(bests) for bests in results)))
    if not common:
        raise SystemExit(
            f"--rank: no trial has a result in rung {rung} of every search (halving promotes each search's own "
            "trials past rung 0: rank --rung 0, or let the searches go on)"
        )
    medians = [statistics.median(bests[trial] for trial in common) for bests in results]
    for out, median in zip(outs, medians):
        if median <= 0:
            raise SystemExit(f"--rank: {out}'s median trial has {logs[0]['metric']} {median}: nothing to scale by")
    searches = [
        {"out": out, "config": log["config"], "rung": rung, "trials": len(common), "median": median}
        for out, log, median in zip(outs, logs, medians)
    ]
    ranking = []
    for trial in common:
        relative = [bests[trial] / median for bests, median in zip(results, medians)]
        ranking.append(
            {
                "id": trial,
                "score": statistics.mean(relative),
                "relative": relative,
                "best": [bests[trial] for bests in results],
                "overrides": [next(t["overrides"] for t in log["trials"] if t["id"] == trial) for log in logs],
            }
        )
    ranking.sort(key=lambda entry: entry["score"], reverse=True)
    return {"metric": logs[0]["metric"], "searches": searches, "ranking": ranking}


def _write_ranking(outs: List[str], out: str, rung: int) -> int:
    result = rank_across(outs, rung)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "ranking.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "best.txt"), "w") as f:
        for search, overrides in zip(result["searches"], result["ranking"][0]["overrides"]):
            f.write(f"{search['config']}: {' '.join(overrides)}\n")
    for entry in result["ranking"][:5]:
        values = ", ".join(f"{value:.4f}" for value in entry["best"])
        print(f"{entry['id']}: score {entry['score']:.4f} (best valid {result['metric']} {values})")
    print(f"best {result['ranking'][0]['id']}; its overrides per search in {os.path.join(out, 'best.txt')}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg == "--rank" or arg.startswith("--rank=") for arg in argv):
        ranker = argparse.ArgumentParser(description="rank the trials of searches that drew the same trials")
        ranker.add_argument("--rank", nargs="+", required=True, help="the searches' --out folders")
        ranker.add_argument("--out", required=True, help="the folder for ranking.json and best.txt")
        ranker.add_argument("--rung", type=int, default=0, help="the rung compared (0: every trial's first budget)")
        ranked = ranker.parse_args(argv)
        return _write_ranking(ranked.rank, ranked.out, ranked.rung)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the base config (a YAML file in configs/)")
    parser.add_argument("--out", required=True, help="the search's folder: tune.json, best.txt, trials/")
    parser.add_argument("--space", help="a YAML search space (default: the encoder's, in this script)")
    parser.add_argument("--method", choices=["halving", "random"], default="halving")
    parser.add_argument("--trials", type=int, default=27)
    parser.add_argument("--budgets", type=float, nargs="+", default=[60.0, 180.0, 540.0], help="seconds per rung")
    parser.add_argument("--eta", type=int, default=3, help="1 in eta trials goes on to the next rung")
    add_pool_arguments(parser, "trials")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    add_overrides_argument(parser, "overrides of the base config for every trial")
    args = parser.parse_args(argv)
    for name in ("trials", "eta"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)} must be >= 1")
    rising = all(a < b for a, b in zip(args.budgets, args.budgets[1:]))
    if not rising or args.budgets[0] <= 0:
        parser.error(f"--budgets {args.budgets} must be positive and strictly rising")
    resolve_paths(parser, args, "config", "out", "space")
    search = Search(args)
    finished = search.run(time.monotonic() + 60 * args.budget_minutes)
    found = search.best()
    if found is not None:
        best, rung = found
        with open(os.path.join(args.out, "best.txt"), "w") as f:
            f.write(" ".join(best["overrides"]) + "\n")
        value = best["rungs"][str(rung)]["best"]
        print(f"best {best['id']}: valid {search.log['metric']} {value:.4f} (rung {rung})")
        print("  --set " + " ".join(best["overrides"]))
    print("search finished" if finished else f"more to run: call again with --out {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
