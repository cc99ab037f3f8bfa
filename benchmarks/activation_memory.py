"""Which parts of the model hold the training step's memory: bytes saved for backward, per module.

Runs one forward of the encoder plus the loss (as ``profile_step.py`` builds it, no TorchRec) with
``torch.autograd.graph.saved_tensors_hooks`` and charges every tensor autograd saves to the
innermost module running when it was saved, counting each storage once. Saved activations are
what grows with B x T and sets the step's peak memory; the count is the same on any device, so
this runs on the CPU (the Triton backend saves what the PyTorch backend does not: run it with
``--backend triton`` on a GPU, or under TRITON_INTERPRET=1 at a small shape).

Usage: python benchmarks/activation_memory.py [--batch 2048 --length 200] [--precision bf16] [--out memory.json]
"""

import argparse
from collections import defaultdict
from typing import Dict, List, Optional

import torch
from bench_step import write_json  # the benchmarks beside this one (run as a script)
from profile_step import EncoderStep
from torch import nn


def saved_bytes_by_module(model: nn.Module, run) -> Dict[str, int]:
    """{module path: bytes of distinct storages autograd saved while it was the innermost module}."""
    names = {module: name or "(top)" for name, module in model.named_modules()}
    stack: List[str] = []
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights are not activations
    totals: Dict[str, int] = defaultdict(int)

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in seen:
            seen.add(key)
            totals[stack[-1] if stack else "(outside modules: loss, glue)"] += storage.nbytes()
        return tensor

    def enter(module, _inputs) -> None:
        stack.append(names[module])

    def leave(_module, _inputs, _output) -> None:
        stack.pop()

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for handle in handles:
            handle.remove()
    return dict(totals)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--items", type=int, default=3417)
    parser.add_argument("--backend", default="pytorch", choices=["pytorch", "triton"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: the step under autocast")
    parser.add_argument("--architectures", nargs="+", default=["recblr", "sasrec"])
    parser.add_argument("--recompute-mix", action="store_true", help="RecBLRConfig.recompute_mix")
    parser.add_argument("--recompute-recurrence", action="store_true", help="RecBLRConfig.recompute_recurrence")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.backend == "triton" and torch.cuda.is_available() else "cpu")
    batch, steps = args.batch, args.length
    results = {"batch": batch, "length": steps, "backend": args.backend, "precision": args.precision}
    results.update(recompute_mix=args.recompute_mix, recompute_recurrence=args.recompute_recurrence)
    for arch in args.architectures:
        options = {"recompute_mix": args.recompute_mix, "recompute_recurrence": args.recompute_recurrence}
        extra = options if arch == "recblr" else {}
        model = EncoderStep(arch, batch, steps, args.items, args.backend, device, **extra)

        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

        def forward(model=model, autocast=autocast):
            with autocast:
                return model()

        totals = saved_bytes_by_module(model, forward)
        total = sum(totals.values())
        results[arch] = {"total_gib": total / 2**30, "by_module_gib": {k: v / 2**30 for k, v in totals.items()}}
        positions = batch * steps
        per_position = f"{total / positions:.0f} B/position"
        print(f"{arch}: {total / 2**30:.2f} GiB saved for backward at {batch} x {steps} ({per_position})")
        for name, value in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"  {value / 2**30:7.3f} GiB {value / positions:7.0f} B/position  {name}")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
