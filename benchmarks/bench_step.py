"""Times a whole training step and an inference pass of the model on the GPU, against peers.

One run measures, for each batch x length, precision and model:
  recblr            - this project's model: EmbeddingCollection table, RecBLR encoder on the fused
                      Triton BD-LRU and conv kernels (``model.recblr.kernels: triton``), the last layer on
                      the loss rows only;
  recblr-compiled   - the same with ``train.compile: inductor`` (the encoder through torch.compile);
  recblr-graphed    - the same with ``train.cuda_graphs: true``: the whole step (lookup, encoder,
                      loss, backward, capturable Adam) replayed from one CUDA graph;
  recblr-compiled-graphed - both;
  recblr-recompute  - the same with ``model.recblr.recompute_recurrence`` and ``model.recblr.recompute_mix``: the
                      gate projection, the recurrence and the FFN recomputed in backward (memory);
  recblr-reference  - the same model on the PyTorch reference backend (torch ops around the
                      sequential scan, nothing fused);
  sasrec            - the SASRec-style Transformer of the same size on the same table and loss
                      (PyTorch scaled_dot_product_attention; its last block also on the loss rows only);
  sasrec-compiled   - that Transformer's encoder through torch.compile, the peer of recblr-compiled;
  sasrec-graphed, sasrec-compiled-graphed - the Transformer's step from CUDA graphs too (its jagged
                      batch padded to T, not to the longest history: no host read), the peers of
                      recblr-graphed and recblr-compiled-graphed.
A training step is the paper's (RecBole) step: B histories of T items, softmax cross-entropy over
the whole catalog at each history's last position, backward, Adam; the inference pass scores the
whole catalog after each history and takes the top 10. Reported: median milliseconds (CUDA events
over ``--reps`` steps after warm-up), examples per second, and the peak memory allocated by the
step (``torch.cuda.max_memory_allocated``, model and optimizer state included).

``--sweep`` remakes the paper's Figure 4 instead: GPU memory, training time per epoch and inference
time per epoch against the maximum length (synthetic histories of exactly that length, ML-1M's
6,040 users and 3,416 items, ``--sweep-batch`` histories per step; an epoch is
ceil(6040 / batch) steps, timed as that many times the median step). ``--plot RESULT.json``
draws the PNG from a sweep's JSON (no GPU needed).

Usage (GPU; TorchRec staged):
    python benchmarks/bench_step.py --out step.json
    python benchmarks/bench_step.py --sweep --out figure4.json --plot-out figure4.png
    python benchmarks/bench_step.py --plot figure4.json --plot-out figure4.png
"""

import argparse
import json
import math
import statistics
from typing import Callable, Dict, List, Optional

import torch

NUM_ITEMS = 3416  # ML-1M after 5-core filtering; the table has a padding row more
NUM_USERS = 6040
MODELS = {
    "recblr": {"encoder": "recblr", "kernels": "triton"},
    "recblr-compiled": {"encoder": "recblr", "kernels": "triton", "compile": True},
    "recblr-graphed": {"encoder": "recblr", "kernels": "triton", "graphs": True},
    "recblr-compiled-graphed": {"encoder": "recblr", "kernels": "triton", "compile": True, "graphs": True},
    "recblr-recompute": {"encoder": "recblr", "kernels": "triton", "recompute_recurrence": True, "recompute_mix": True},
    "recblr-reference": {"encoder": "recblr", "kernels": "pytorch"},
    "sasrec": {"encoder": "sasrec"},
    "sasrec-compiled": {"encoder": "sasrec", "compile": True},
    "sasrec-graphed": {"encoder": "sasrec", "graphs": True},
    "sasrec-compiled-graphed": {"encoder": "sasrec", "compile": True, "graphs": True},
}
PEERS = ("sasrec", "sasrec-compiled")
SHAPES = [(2048, 200), (256, 2048)]
SWEEP_LENGTHS = [200, 512, 1024, 2048, 4096, 8192, 16384]


def build(model_name: str, steps: int, device: torch.device):
    from recblr_torchrec.modules import ModelConfig, RecBLRConfig, SASRecConfig, SequenceRecommender

    spec = dict(MODELS[model_name])
    compiled, graphs, encoder = spec.pop("compile", False), spec.pop("graphs", False), spec.pop("encoder")
    shared = {"embedding_dim": 64, "num_layers": 2, "dropout": 0.2}
    config = ModelConfig(
        encoder=encoder, recblr=RecBLRConfig(**shared, **spec), sasrec=SASRecConfig(**shared, max_positions=steps)
    )
    model = SequenceRecommender(NUM_ITEMS + 1, config).to(device)
    if graphs:
        model.static_padding(steps)  # as the trainer does under train.cuda_graphs
    if compiled:
        model.compile_encoder("inductor")  # as train.compile=inductor
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, capturable=graphs)  # as optimizer_factory


def make_batch(batch: int, steps: int, device: torch.device, seed: int = 0):
    """B full-length histories of random items; the target after each history's last item."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recblr_torchrec.data import ITEM_HISTORY, Batch

    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(1, NUM_ITEMS + 1, (batch * steps,), generator=gen)
    targets = torch.zeros(batch * steps, dtype=torch.long)
    targets[steps - 1 :: steps] = torch.randint(1, NUM_ITEMS + 1, (batch,), generator=gen)
    lengths = torch.full((batch,), steps)
    kjt = KeyedJaggedTensor(keys=[ITEM_HISTORY], values=items, lengths=lengths, length_per_key=[batch * steps])
    rows = torch.arange(1, batch + 1) * steps - 1  # as data.make_batch carries them: no nonzero in the step
    return Batch(kjt, targets, torch.arange(batch), target_rows=rows).to(device)


def write_json(path: str, content: Dict) -> None:
    """A benchmark's results, as the JSON file its ``--out`` names."""
    with open(path, "w") as f:
        json.dump(content, f, indent=2)


def median_ms(fn: Callable[[], None], reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(model_name: str, batch: int, steps: int, precision: str, reps: int, device: torch.device) -> Dict:
    """Training step and inference pass of one model at one shape and precision."""
    from recblr_torchrec.training import NextItemTask
    from recblr_torchrec.training.graphs import GraphedStep
    from recblr_torchrec.training.trainer import apply_matmul_precision

    torch.manual_seed(0)
    model, optimizer = build(model_name, steps, device)
    task = NextItemTask(model, check_targets=False)  # the trainer's loss
    data = make_batch(batch, steps, device)
    graphs = MODELS[model_name].get("graphs", False)  # no autocast weight cache inside a capture
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=not graphs)
    apply_matmul_precision(precision)  # as train.precision

    def update(batch):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = task(batch)  # as Trainer.update
        loss.backward()
        optimizer.step()
        return loss.detach()

    graphed = GraphedStep(update) if graphs else None

    def train_step():
        (graphed or update)(data)

    def inference():
        with torch.no_grad(), autocast:
            model.score_last(data.item_history).topk(10, dim=1)

    result: Dict = {"model": model_name, "batch": batch, "length": steps, "precision": precision}
    for name, fn, mode in (("train", train_step, model.train), ("infer", inference, model.eval)):
        mode()
        try:
            fn()  # compile kernels and allocate before the memory baseline
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            ms = median_ms(fn, reps)
        except torch.OutOfMemoryError:
            result[f"{name}_error"] = "out of memory"
            torch.cuda.empty_cache()
            continue
        result[f"{name}_ms"] = ms
        result[f"{name}_examples_per_s"] = batch / ms * 1e3
        result[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if graphed is not None:
        result["graphs"] = graphed.stats()  # a failed capture shows here (the row is then eager)
    return result


def measure_and_free(*args) -> Dict:
    """``measure``, then the cached blocks of its model released before the next one."""
    result = measure(*args)
    torch.cuda.empty_cache()
    return result


def step_table(rows: List[Dict]) -> str:
    lines = [
        "| B x T | precision | model | train step (ms) | train ex/s | train peak (GiB) | inference (ms) "
        "| inference ex/s | train vs sasrec | train vs sasrec-compiled | train vs sasrec, same variant |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            f"{row['batch']} x {row['length']}",
            row["precision"],
            row["model"],
            *(_cell(row, f"{phase}_{what}") for phase in ("train",) for what in ("ms", "examples_per_s", "peak_gib")),
            _cell(row, "infer_ms"),
            _cell(row, "infer_examples_per_s"),
            *(_ratio(row, rows, peer) for peer in PEERS),
            _ratio(row, rows, same_variant_peer(row["model"])),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def same_variant_peer(model_name: str) -> str:
    """recblr-graphed -> sasrec-graphed and so on; '' for the variants the Transformer lacks."""
    peer = "sasrec" + model_name[len("recblr") :]
    return peer if model_name.startswith("recblr") and peer in MODELS else ""


def _ratio(row: Dict, rows: List[Dict], peer_name: str) -> str:
    """The row's training step over the peer's at the same shape and precision."""
    for peer in rows:
        if peer["model"] == peer_name and key(peer) == key(row) and "train_ms" in peer and "train_ms" in row:
            return f"{row['train_ms'] / peer['train_ms']:.2f}x"
    return "-"


def key(row: Dict):
    return row["batch"], row["length"], row["precision"]


def _cell(row: Dict, name: str) -> str:
    if name not in row:
        return row.get(name.split("_")[0] + "_error", "-")
    value = row[name]
    return f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"


def sweep(args, device: torch.device) -> List[Dict]:
    rows = []
    per_epoch = math.ceil(NUM_USERS / args.sweep_batch)
    for length in args.lengths:
        for model_name in args.sweep_models:
            row = measure_and_free(model_name, args.sweep_batch, length, args.sweep_precision, args.reps, device)
            for phase in ("train", "infer"):
                if f"{phase}_ms" in row:
                    row[f"{phase}_epoch_s"] = row[f"{phase}_ms"] * per_epoch / 1e3
            row["steps_per_epoch"] = per_epoch
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def plot(rows: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train_peak_gib", "GPU memory, training (GiB)"), ("train_epoch_s", "training time per epoch (s)")]
    panels.append(("infer_epoch_s", "inference time per epoch (s)"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for axis, (name, label) in zip(axes, panels):
        for model_name in dict.fromkeys(r["model"] for r in rows):
            points = [(r["length"], r[name]) for r in rows if r["model"] == model_name and name in r]
            if points:
                axis.plot(*zip(*points), marker="o", label=model_name)
        axis.set(xlabel="maximum length", ylabel=label, xscale="log", yscale="log")
        lengths = sorted({r["length"] for r in rows})
        axis.minorticks_off()
        axis.set_xticks(lengths, [str(length) for length in lengths])
        axis.legend()
    first = rows[0]
    fig.suptitle(f"{first.get('device', 'GPU')}, {first['precision']}, batch {first['batch']}, d=64, 2 layers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--shapes", nargs="+", default=[f"{b}x{t}" for b, t in SHAPES], help="BxT")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="the Figure 4 length sweep instead")
    parser.add_argument("--lengths", nargs="+", type=int, default=SWEEP_LENGTHS)
    parser.add_argument("--sweep-models", nargs="+", default=["recblr", "sasrec"], choices=list(MODELS))
    parser.add_argument("--sweep-batch", type=int, default=128)
    parser.add_argument("--sweep-precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--plot", help="draw the PNG from this sweep JSON and exit")
    parser.add_argument("--plot-out", default="figure4.png")
    args = parser.parse_args(argv)
    if args.plot:
        with open(args.plot) as f:
            plot(json.load(f)["rows"], args.plot_out)
        return
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (use --plot to draw an existing sweep)")
    device = torch.device("cuda")
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if args.sweep:
        rows = [{**row, **env} for row in sweep(args, device)]
        plot(rows, args.plot_out)
    else:
        rows = []
        for shape in args.shapes:
            batch, steps = (int(v) for v in shape.lower().split("x"))
            for precision in args.precisions:
                for model_name in args.models:
                    row = {**measure_and_free(model_name, batch, steps, precision, args.reps, device), **env}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        print(step_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
