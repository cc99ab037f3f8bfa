"""Export a trained RecBLR for serving.

    python launchers/export.py --checkpoint RUN_DIR_OR_CHECKPOINT --output-dir DIR

--checkpoint is a checkpoint file (checkpoints/best.pt) or a training run's --output-dir (its
best checkpoint is taken). Writes DIR/scorer.pt, DIR/step.pt (TorchScript: load with
torch.jit.load and nothing but torch), DIR/manifest.json and, from the run folder's item id map,
DIR/ids.pt and DIR/item_ids.tsv (the data file's item ids in and out); with --aoti-batch B also
DIR/scorer_aoti.pt2 (torch.export + AOTInductor, batch B, top --aoti-k); see docs/serving.md.
"""

import argparse
import sys

from recblr_torchrec.errors import run_command
from recblr_torchrec.serving import export


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or training run folder")
    parser.add_argument("--output-dir", required=True, help="where scorer.pt, step.pt, ids.pt and manifest.json go")
    parser.add_argument(
        "--aoti-batch",
        type=int,
        default=None,
        help="also write scorer_aoti.pt2 (torch.export + AOTInductor) for this batch size",
    )
    parser.add_argument("--aoti-k", type=int, default=100, help="top-k width of scorer_aoti.pt2 (default 100)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also RECBLR_DEBUG=1)")
    args = parser.parse_args(argv)
    manifest = export(args.checkpoint, args.output_dir, aoti_batch=args.aoti_batch, aoti_k=args.aoti_k)
    print(
        f"exported {manifest['checkpoint']['path']} (epoch {manifest['checkpoint']['epoch']}, "
        f"{manifest['num_items']} items, state {manifest['state']['columns']} floats per user) to {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
