"""Train RecBLR and evaluate it with full ranking.

    python launchers/train.py --config configs/ml-1m/recblr-paper.yaml [--data-dir DIR] [--output-dir DIR]
                              [--set key=value ...]

Writes <output-dir>/metrics.json ({"valid": {...}, "test": {...}, "config": {...}}; no "test" with
eval.test=false), metrics.csv, curves.png and checkpoints/; running it again on the same output
directory resumes the run.

Unchanged under torchrun / TorchX (`torchx run -s local_cwd dist.ddp -j 1x2 --script launchers/train.py
-- --config configs/tiny.yaml`): it finds RANK/WORLD_SIZE in the environment and trains with sharded
tables (DistributedModelParallel, gloo on CPU, NCCL on GPU); see docs/distributed.md.
"""

import argparse
import os
import sys
from typing import List, Optional

from recblr_torchrec.config import add_overrides_argument, load_config, resolve_data_dir
from recblr_torchrec.errors import run_command
from recblr_torchrec.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strip_own_path(argv: List[str]) -> List[str]:
    """Drops this script's path (and a ``--``) repeated in front of the arguments.

    TorchX's short form `torchx run dist.ddp -j 2x8 launchers/train.py ...` passes the path as
    an argument of the script that .torchxconfig names (this one), so it arrives here twice.
    """
    if argv and argv[0].endswith(".py") and os.path.abspath(argv[0]) == os.path.abspath(__file__):
        argv = argv[1:]
    return argv[1:] if argv[:1] == ["--"] else argv


def main(argv: Optional[List[str]] = None) -> int:
    argv = strip_own_path(sys.argv[1:] if argv is None else list(argv))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config",
        default=os.path.join(ROOT, "configs", "tiny.yaml"),
        help="YAML file in configs/ (default: configs/tiny.yaml, the smoke test)",
    )
    parser.add_argument("--data-dir", default=None, help="folder holding the datasets (default: $RECBLR_DATA_DIR)")
    parser.add_argument("--output-dir", default=None, help="run folder (default: runs/<config name>)")
    add_overrides_argument(parser, "e.g. --set train.lr=3e-4 model.recblr.dropout=0.1 (several after one --set)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument(
        "--resume", action="store_true", help="continue a run folder trained with other settings (default: refuse)"
    )
    again.add_argument("--overwrite", action="store_true", help="empty the run folder and start over")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also RECBLR_DEBUG=1)")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    output_dir = args.output_dir or os.path.join("runs", config.name)
    # sharded under torchrun / TorchX
    train(
        config, output_dir, resolve_data_dir(args.data_dir), resume_other_settings=args.resume, overwrite=args.overwrite
    )
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {os.path.join(output_dir, 'metrics.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
