"""Top-k next items for a history, from exported artifacts, in the data file's item ids.

    python launchers/recommend.py --artifacts DIR --history "1193 661 914" --k 10
    python launchers/recommend.py --artifacts DIR --user 42 --data-dir DATA --k 10

DIR is what launchers/export.py wrote (scorer.pt, ids.pt, manifest.json). Items already in the
history are left out unless --keep-seen. --user reads that user's history from the dataset the
model was trained on (the run config in manifest.json; this path imports recblr_torchrec); with
--history only torch is needed. --item-map FILE takes and returns external ids: a TSV whose header
names two columns, the data file's item id then the external id (ML-1M's item_map.tsv.gz maps to
MovieLens movie ids). Errors print one line and exit with status 2 (--debug shows the traceback).
"""

import argparse
import csv
import gzip
import json
import os
import sys
from typing import Dict, List, Tuple

import torch


class RequestError(ValueError):
    """A bad argument, file or id: printed in one line."""


def read_item_map(path: str) -> Tuple[List[str], Dict[str, str]]:
    """(header, {data file's item id: external id}) of a two-column TSV (.gz or plain)."""
    if not os.path.isfile(path):
        raise RequestError(f"--item-map {path} does not exist; pass a TSV of data file item id and external id")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise RequestError(f"--item-map {path} cannot be read ({type(error).__name__}: {error})") from None
    if not rows or len(rows[0]) < 2:
        raise RequestError(f"--item-map {path}:1 must be a header naming two tab-separated columns")
    mapping = {}
    for number, row in enumerate(rows[1:], start=2):
        if len(row) < 2:
            raise RequestError(f"--item-map {path}:{number} is {row!r}; expected 'item id<TAB>external id'")
        mapping[row[0]] = row[1]
    return rows[0][:2], mapping


def script_error(error: Exception) -> str:
    """The message a scripted artifact raised, without TorchScript's traceback."""
    last = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
    for prefix in ("builtins.ValueError: ", "ValueError: ", "RuntimeError: "):
        if last.startswith(prefix):
            return last[len(prefix) :]
    return last


def load_artifacts(folder: str):
    """(manifest, ids.pt, scorer.pt) of an export folder."""
    manifest_path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise RequestError(f"--artifacts {folder} holds no manifest.json; pass the --output-dir of launchers/export.py")
    with open(manifest_path) as f:
        manifest = json.load(f)
    files = manifest.get("files", {})
    if "ids" not in files:
        raise RequestError(
            f"--artifacts {folder} has no item id map (ids.pt): export again from a run folder that holds "
            "item_ids.tsv (training writes it)"
        )
    ids = torch.jit.load(os.path.join(folder, files["ids"]))
    scorer = torch.jit.load(os.path.join(folder, files["scorer"]))
    return manifest, ids, scorer


def user_history(manifest: Dict, user: str, data_dir: str) -> List[str]:
    """The user's items in the data file's ids, oldest first, from the dataset of the run."""
    from recblr_torchrec.config import config_from_dict
    from recblr_torchrec.training.trainer import load_data

    data = load_data(config_from_dict(manifest["run_config"]), data_dir)
    rows = [row for row, token in enumerate(data.user_tokens) if str(token) == user]
    if not rows:
        raise RequestError(
            f"--user {user} is not among the {data.num_users:,} users of {manifest['run_config']['data']['path']} "
            "(after its filtering)"
        )
    row = rows[0]
    return [str(data.item_tokens[i]) for i in data.items[data.offsets[row] : data.offsets[row + 1]]]


def recommend(ids, scorer, history: List[str], k: int, keep_seen: bool, catalog: int) -> List[Tuple[str, float]]:
    """The top ``k`` (item id, score), leaving out the history's items unless ``keep_seen``."""
    seen = set(history)
    wanted = min(catalog, k if keep_seen else k + len(seen))
    try:
        item_ids, lengths = ids.histories([history])
        scores, items = scorer(item_ids, lengths, wanted)
    except (RuntimeError, torch.jit.Error) as error:  # raised inside a scripted artifact
        raise RequestError(script_error(error)) from error
    names = ids.names(items)[0]
    ranked = [(name, float(score)) for name, score in zip(names, scores[0].tolist())]
    return [pair for pair in ranked if keep_seen or pair[0] not in seen][:k]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True, help="the folder launchers/export.py wrote")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--history", help="item ids, oldest first, separated by spaces or commas")
    source.add_argument("--user", help="a user id of the dataset: recommend after that user's whole history")
    parser.add_argument("--data-dir", default=os.environ.get("RECBLR_DATA_DIR"), help="dataset root, for --user")
    parser.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    parser.add_argument("--keep-seen", action="store_true", help="also return items already in the history")
    parser.add_argument("--item-map", help="TSV: data file item id, external id (e.g. ml-1m/item_map.tsv.gz)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also RECBLR_DEBUG=1)")
    args = parser.parse_args(argv)
    try:
        run(args)
    except (RequestError, FileNotFoundError, ValueError) as error:
        if args.debug or os.environ.get("RECBLR_DEBUG") == "1":
            raise
        message = " ".join(str(error).split())
        print(f"error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return 0


def run(args) -> None:
    if args.k < 1:
        raise RequestError(f"--k {args.k} must be at least 1")
    manifest, ids, scorer = load_artifacts(args.artifacts)
    header, external = read_item_map(args.item_map) if args.item_map else (["item_id", "item_id"], {})
    if args.user is not None:
        if not args.data_dir:
            raise RequestError("--user needs the dataset: pass --data-dir DIR or set RECBLR_DATA_DIR")
        history = user_history(manifest, args.user, args.data_dir)
        described = f"user {args.user}'s {len(history)} items"
    else:
        given = args.history.replace(",", " ").split()
        if not given:
            raise RequestError("--history is empty: give at least one item id, oldest first")
        if external:
            to_file = {value: key for key, value in external.items()}
            unknown = [name for name in given if name not in to_file]
            if unknown:
                raise RequestError(f"{header[1]} {unknown[0]} is not in --item-map {args.item_map}")
            given = [to_file[name] for name in given]
        history = given
        described = f"a history of {len(history)} items"
    catalog = int(manifest["num_items"])
    if args.k > catalog:
        raise RequestError(f"--k {args.k} is more than the catalog's {catalog} items")
    ranked = recommend(ids, scorer, history, args.k, args.keep_seen, catalog)
    seen = "seen items kept" if args.keep_seen else "seen items left out"
    print(f"top {len(ranked)} after {described} ({seen}):")
    print(f"rank\t{header[1]}\tscore")
    for rank, (name, score) in enumerate(ranked, start=1):
        print(f"{rank}\t{external.get(name, name) if external else name}\t{score:.4f}")


if __name__ == "__main__":
    sys.exit(main())
