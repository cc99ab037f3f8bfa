"""The benchmark scripts' own logic (their GPU measurements run on the device machine)."""

import importlib.util
import json
import os
import subprocess
import sys
import types
import warnings

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


def load(name):
    sys.path.insert(0, BENCHMARKS)
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(BENCHMARKS)


def test_saved_activation_bytes_are_charged_to_the_innermost_module():
    memory = load("activation_memory")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    x = torch.randn(3, 4, requires_grad=True)
    totals = memory.saved_bytes_by_module(model, lambda: model(x).sum())
    assert totals == {"0": 3 * 4 * 4, "1": 3 * 8 * 4}  # Linear keeps its input, ReLU its output


def test_step_table_reports_ratios_against_sasrec_and_the_sweep_plots(tmp_path):
    bench = load("bench_step")
    rows = []
    for model, ms in (("recblr", 10.0), ("sasrec", 20.0), ("sasrec-compiled", 8.0), ("recblr-graphed", 6.0)):
        row = {"model": model, "batch": 8, "length": 16, "precision": "fp32", "train_ms": ms}
        row.update(train_examples_per_s=800.0, train_peak_gib=1.0, infer_ms=1.0, infer_examples_per_s=8000.0)
        row.update(train_epoch_s=ms / 100, infer_epoch_s=0.01)
        rows.append(row)
    rows.append({**rows[-1], "model": "sasrec-graphed", "train_ms": 4.0})
    rows.append({**rows[0], "length": 32})
    table = bench.step_table(rows).splitlines()
    # against sasrec, sasrec-compiled, and the Transformer run the same way (eager, graphed, ...)
    assert table[2].endswith("| 0.50x | 1.25x | 0.50x |") and table[3].endswith("| 1.00x | 2.50x | - |")
    assert table[5].endswith("| 0.30x | 0.75x | 1.50x |")  # recblr-graphed vs sasrec-graphed
    assert table[7].endswith("| - | - | - |")  # no peer at that length
    assert bench.same_variant_peer("recblr-compiled-graphed") == "sasrec-compiled-graphed"
    assert bench.same_variant_peer("recblr-reference") == ""
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"rows": rows}))
    bench.main(["--plot", str(path), "--plot-out", str(tmp_path / "figure.png")])
    assert (tmp_path / "figure.png").stat().st_size > 10_000


def test_sync_warnings_are_counted_by_site_and_other_warnings_ignored():
    loop = load("profile_train_loop")

    def run():
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        warnings.warn("something else", stacklevel=1)

    original = warnings.showwarning
    counts = loop.count_sync_warnings(run)
    # on a GPU, torch itself may report a sync while the mode is on (seen on the H200: torch/cuda/__init__.py)
    ours = {site: n for site, n in counts.items() if "tests/test_benchmarks.py" in site}
    assert list(ours.values()) == [3]  # "something else" is not a sync warning: not counted
    (site,) = ours
    assert site.startswith("outside this project (via tests/test_benchmarks.py:")
    assert warnings.showwarning is original  # the hook is gone afterwards


def test_training_loop_profile_splits_the_step(data_dir, tmp_path):
    loop = load("profile_train_loop")
    out = tmp_path / "loop.json"
    overrides = ["model.recblr.embedding_dim=8", "model.recblr.num_layers=1", "train.batch_size=32", "train.device=cpu"]
    result = loop.main(
        [
            "--config",
            os.path.join(os.path.dirname(BENCHMARKS), "configs", "tiny.yaml"),
            "--data-dir",
            data_dir,
            "--warmup",
            "1",
            "--steps",
            "2",
            "--eval-reps",
            "1",
        ]
        + ["--set", *overrides, "--out", str(out)]
    )
    assert json.loads(out.read_text())["steps"] == 2
    assert result["wall_ms"] > 0 and 0 <= result["loader_wait_ms"] <= result["wall_ms"]
    assert 0 < result["host_ms"] <= result["wall_ms"]
    assert result["ops_per_step"] > 10 and result["host_ops"][0]["host_self_ms"] > 0
    assert "gpu_busy_ms" not in result  # CPU: no device columns
    assert result["eval_wall_ms"] > 0 and result["eval_ops"] > 10 and "eval_gpu_busy_ms" not in result


def test_device_busy_time_is_the_union_of_kernel_spans_without_annotations():
    loop = load("profile_train_loop")
    from torch.autograd import DeviceType

    def event(start, end, device=DeviceType.CUDA, annotation=False):
        span = types.SimpleNamespace(start=start, end=end)
        return types.SimpleNamespace(time_range=span, device_type=device, is_user_annotation=annotation)

    events = [
        event(0, 10),
        event(5, 12),  # overlaps the first (another stream): counted once
        event(20, 25),
        event(0, 100, annotation=True),  # an annotation's range spans kernels and gaps
        event(30, 90, device=DeviceType.CPU),
    ]
    assert loop.device_busy_us(events) == 12 + 5
    for e, name in zip(events, ["gemm", "gemm", "copy", "annotation", "cpu op"]):
        e.name = name
    kernels = loop.top_kernels(events, steps=2, top=5)  # per step, annotations and host ops left out
    assert kernels == [
        {"kernel": "gemm", "gpu_ms": 17 / 2e3, "calls": 1.0},
        {"kernel": "copy", "gpu_ms": 5 / 2e3, "calls": 0.5},
    ]


def test_bench_step_batch_carries_what_the_pipeline_carries():
    bench = load("bench_step")
    batch = bench.make_batch(3, 5, torch.device("cpu"))
    assert torch.equal(batch.target_rows, torch.nonzero(batch.targets, as_tuple=True)[0])
    assert batch.item_history.length_per_key_or_none() == [15]


def test_the_sharded_benchmark_times_the_local_and_dmp_steps_and_the_sampled_softmax(tmp_path, data_dir, monkeypatch):
    bench = load("bench_sharded")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(bench, "QUALITY_CONFIG", "configs/tiny.yaml")
    small = ["data.max_users=60", "model.recblr.embedding_dim=8", "train.batch_size=32", "train.device=cpu"]
    small += ["data.synthetic.num_items=2000", "data.synthetic.num_users=100", "train.num_negatives=64"]
    small += [f"data.cache_dir={tmp_path / 'cache'}", "train.max_epochs=1", "distributed.timeout_s=60"]
    out = tmp_path / "sharded.json"
    args = ["--data-dir", data_dir, "--warmup", "2", "--steps", "3", "--out", str(out), "--set", *small]
    args += ["--quality-seeds", "0", "--runs-dir", str(tmp_path / "runs"), "--parallel", "2"]
    result = bench.main(args)
    assert json.loads(out.read_text()) == result
    assert set(result["provenance"]) == {"hardware", "versions", "commit", "date", "command"}
    cases = {row["case"]: row for row in result["cases"]}
    assert list(cases) == ["local", "dmp", "synthetic"]
    assert cases["local"]["placement"] == "LocalPlacement" and cases["dmp"]["placement"] == "ShardedPlacement"
    assert cases["synthetic"]["loss"] == "sampled" and cases["synthetic"]["world_size"] == 1
    for row in cases.values():
        assert row["steps"] == 3 and row["sequences_per_s"] > 0 and row["step_ms"] >= row["host_ms"] > 0
    # 3 steps of 32 sequences: the throughput counts exactly the timed steps' sequences
    local = cases["local"]
    assert abs(local["sequences_per_s"] * local["step_ms"] * 3 / 1e3 - 96) < 1
    quality = {row["loss"]: row for row in result["quality"]}
    assert set(quality) == {"full", "sampled"} and all(row["seeds"] == 1 for row in quality.values())


def test_the_sharded_benchmark_runs_unchanged_under_torchrun_on_two_processes(tmp_path, data_dir):
    """``torchrun --nproc_per_node 2``, as on a multi-GPU host (here two CPU processes over gloo):
    the sharded cases on a world of two, the one-process case skipped, rank 0 alone writing and
    printing."""
    small = ["data.max_users=60", "model.recblr.embedding_dim=8", "train.batch_size=32", "train.device=cpu"]
    small += ["data.synthetic.num_items=2000", "data.synthetic.num_users=100", "train.num_negatives=64"]
    small += [f"data.cache_dir={tmp_path / 'cache'}", "train.max_epochs=1", "distributed.timeout_s=60"]
    out = tmp_path / "sharded_2.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [os.path.join(ROOT, "benchmarks", "bench_sharded.py"), "--data-dir", data_dir, "--cases", "local"]
    command += ["dmp", "synthetic", "--warmup", "2", "--steps", "3", "--out", str(out), "--set", *small]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    cases = json.loads(out.read_text())["cases"]
    assert [row["case"] for row in cases] == ["dmp", "synthetic"]
    assert all(row["world_size"] == 2 and len(row["peak_gpu_mb_per_rank"]) == 2 for row in cases)
    assert done.stdout.count("synthetic:") == 1 and done.stdout.count("local: skipped") == 1


def test_loader_bench_times_the_build_its_peer_and_the_loader(tmp_path):
    bench = load("bench_loader")
    small = ["data.synthetic.num_items=5000", "data.synthetic.num_users=300", "train.batch_size=64"]
    out = tmp_path / "loader.json"
    args = ["--workers", "0", "1", "--batches", "2", "--epochs", "1", "--set", *small, "train.num_negatives=128"]
    bench.main([*args, "--out", str(out)])
    result = json.loads(out.read_text())
    variants = ["build", "build, np.unique", "loader, 0 workers", "loader, 1 workers"]
    variants += ["loader, 1 workers, a tensor per array", "epochs, 1 workers", "epochs, 1 workers, a loader per epoch"]
    assert [row["variant"] for row in result["rows"]] == variants
    assert all(row["ms_per_batch"] > 0 for row in result["rows"])
    assert result["batch"]["sequences"] >= 64 and result["batch"]["candidates"] % 1024 == 0
