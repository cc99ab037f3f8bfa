"""Writes a dataset's tuned config: its paper config plus the tuned recipe's settings for its data.

The rules are ``recblr_torchrec.training.recipe`` (docs/training.md#the-tuned-recipe): the settings
shared by every dataset, the regularisation by mean sequence length, the batch by training windows
an epoch, and twice the paper config's maximum length. The written file's header names the
statistics the rules read.

    python scripts/recipe_config.py --paper-config configs/<dataset>/recblr-all-positions.yaml \\
        --data-dir DATA --out configs/<dataset>/recblr-tuned.yaml
"""

import argparse
import os
import sys
import textwrap
from typing import Any, Dict, List, Optional

import yaml

from recblr_torchrec.config import load_config, resolve_data_dir, set_dotted
from recblr_torchrec.data.loader import batches_per_epoch
from recblr_torchrec.errors import ConfigError, UserError
from recblr_torchrec.training.recipe import (
    MAX_BATCH,
    MIN_UPDATES_PER_EPOCH,
    SHORT_HISTORY,
    dataset_statistics,
    recipe_settings,
    short_history,
)
from recblr_torchrec.training.trainer import load_data


def tuned_config_text(
    paper_config: str, out: str, statistics: Dict[str, Any], settings: Dict[str, Any], name: str
) -> str:
    """The YAML of the tuned config at ``out``, based on ``paper_config``: the recipe's ``settings``
    for a dataset of these ``statistics``."""
    short = short_history(statistics)
    batch = settings["train.batch_size"]
    updates = batches_per_epoch(statistics["windows"], batch)
    header = (
        f"The tuned recipe (docs/training.md#the-tuned-recipe) for the data of {os.path.basename(paper_config)},"
        f" written by scripts/recipe_config.py. The data: {statistics['users']:,} users, mean sequence"
        f" {statistics['mean_length']:.1f} items ({'under' if short else 'at least'} {SHORT_HISTORY}: the"
        f" {'short' if short else 'long'}-history regularisation), {statistics['windows']:,} training windows of"
        f" up to {statistics['max_len']} items (batches of {batch}: {updates} updates an"
        f" epoch, the largest batch up to {MAX_BATCH} with at least {MIN_UPDATES_PER_EPOCH})."
    )
    base = os.path.relpath(os.path.realpath(paper_config), os.path.dirname(os.path.realpath(out)))
    body: Dict[str, Any] = {"base": base, "name": name}
    for key, value in settings.items():
        set_dotted(body, key.split("."), value, key)
    comment = "".join(f"# {line}\n" for line in textwrap.wrap(header, 98))
    return comment + yaml.safe_dump(body, sort_keys=False)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper-config", required=True, help="the dataset's paper config (data file and filters)")
    parser.add_argument("--data-dir", help="the data directory (default: $RECBLR_DATA_DIR)")
    parser.add_argument("--out", required=True, help="the tuned config to write")
    parser.add_argument("--name", help="the run name (default: <the paper config's folder>-recblr-tuned)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"--out {args.out} exists; remove it or name another file")
    try:
        paper = load_config(args.paper_config, [])
        if paper.model.encoder != "recblr":
            raise ConfigError(
                f"{args.paper_config} has model.encoder={paper.model.encoder}; the recipe tunes RecBLR: "
                "give the dataset's RecBLR paper config (configs/<dataset>/recblr-all-positions.yaml)"
            )
        statistics = dataset_statistics(load_data(paper, resolve_data_dir(args.data_dir)), paper.data.max_len)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    name = args.name or f"{os.path.basename(os.path.dirname(os.path.abspath(args.paper_config)))}-recblr-tuned"
    settings = recipe_settings(statistics)
    text = tuned_config_text(os.path.abspath(args.paper_config), args.out, statistics, settings, name)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}: batch {settings['train.batch_size']}, length {statistics['max_len']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
