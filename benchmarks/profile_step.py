"""Where a training step's GPU time goes: the encoder step alone, and a per-op profile.

The model of ``bench_step.py`` without TorchRec's lookup in the step (a plain ``nn.Embedding``
instead of the EmbeddingCollection): B full-length histories of T
items, the encoder with the loss rows only in its last layer, the chunked full softmax at each
history's last position, backward, Adam. Prints the step's median milliseconds (CUDA events), then
``torch.profiler``'s CUDA time per op for a few steps, and writes both as JSON.

Usage (GPU): python benchmarks/profile_step.py --out profile.json [--batch 2048 --length 200]
"""

import argparse
from typing import List, Optional

import torch
from torch import nn

from recblr_torchrec.modules.recblr import RecBLRConfig, RecBLREncoder
from recblr_torchrec.modules.sasrec import SASRecConfig, SASRecEncoder
from recblr_torchrec.training.losses import full_softmax_loss


class EncoderStep(nn.Module):
    """The measured model without TorchRec: an ``nn.Embedding`` table, the encoder with the loss
    rows only in its last layer, the chunked full softmax at each history's last position."""

    def __init__(
        self, arch: str, batch: int, steps: int, items: int, backend: str, device: torch.device, **recblr: bool
    ):
        super().__init__()
        torch.manual_seed(0)
        if arch.startswith("recblr"):
            config = RecBLRConfig(kernels=backend, fused_norms=arch != "recblr-torch-norms", **recblr)
            self.encoder = RecBLREncoder(config)
        else:
            self.encoder = SASRecEncoder(SASRecConfig(max_positions=steps))
        self.table = nn.Embedding(items, 64)
        nn.init.normal_(self.table.weight, std=0.02)  # as the model's item table
        self.to(device)
        self.ids = torch.randint(1, items, (batch * steps,), device=device)
        self.offsets = torch.arange(batch + 1, device=device) * steps
        self.rows = self.offsets[1:] - 1
        self.targets = torch.randint(1, items, (batch,), device=device)

    def forward(self) -> torch.Tensor:
        hidden = self.encoder(self.table(self.ids), offsets=self.offsets, rows=self.rows)
        return full_softmax_loss(hidden, self.targets, self.table.weight)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--items", type=int, default=3417)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument(
        "--architectures",
        nargs="+",
        default=["recblr", "sasrec"],
        choices=["recblr", "recblr-torch-norms", "sasrec"],
        help="recblr-torch-norms: RecBLR with model.recblr.fused_norms=false (torch's dropout, add, LayerNorm)",
    )
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    parser.add_argument("--recompute-mix", action="store_true", help="RecBLR with model.recblr.recompute_mix")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    from bench_step import median_ms, write_json

    device = torch.device("cuda")
    torch.set_float32_matmul_precision("high" if args.precision == "tf32" else "highest")
    batch, steps = args.batch, args.length
    results = {"batch": batch, "length": steps, "precision": args.precision, "compile": args.compile}
    results.update(device=torch.cuda.get_device_name(), torch=torch.__version__)
    for arch in args.architectures:
        options = {"recompute_mix": True} if args.recompute_mix and arch.startswith("recblr") else {}
        model = EncoderStep(arch, batch, steps, args.items, "triton", device, **options)
        if args.compile:
            model.encoder = torch.compile(model.encoder)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "bf16")

        def step(model=model, optimizer=optimizer, autocast=autocast):
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = model()
            loss.backward()
            optimizer.step()

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step_ms = median_ms(step, args.reps)
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        ops = []
        for event in prof.key_averages():
            cuda_us = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0))
            self_us = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0))
            if self_us > 0:
                ops.append({"op": event.key, "self_cuda_ms_per_step": self_us / 3e3, "cuda_ms_per_step": cuda_us / 3e3})
        ops.sort(key=lambda o: -o["self_cuda_ms_per_step"])
        results[arch] = {"step_ms": step_ms, "peak_gib": peak_gib, "ops": ops[:40]}
        print(f"{arch}: step {step_ms:.2f} ms, peak {peak_gib:.2f} GiB (encoder + table + loss + Adam, no TorchRec)")
        for o in ops[:25]:
            print(f"  {o['self_cuda_ms_per_step']:7.3f} ms  {o['op'][:100]}")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
