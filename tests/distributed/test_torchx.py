"""TorchX launches (local_cwd scheduler): one node with 2 processes, two "nodes" of 1 process
(the multi-node c10d rendezvous, for real), a crash restarted by torchrun and resumed from the
DCP checkpoint, and the short form `torchx run dist.ddp -j 2x8 launchers/train.py`."""

import json
import os
import re
import subprocess
import sys

import pytest

from .spawn import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)  # the venv's bin: local_cwd runs `torchrun` from PATH
OVERRIDES = ["train.max_epochs=2", "data.max_users=200", "train.batch_size=64", "train.checkpoint_every=2"]
OVERRIDES += ["distributed.timeout_s=60", "train.num_workers=0"]
OVERRIDES += ["distributed.sparse_optimizer=rowwise_adagrad", "distributed.sparse_lr=0.001"]  # sharded tables


def torchx(args, extra_env=None, timeout=300):
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), **(extra_env or {}))
    command = [os.path.join(BIN, "torchx"), "run", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_training(tmp_path, name, data_dir, topology, component_args=(), extra_env=None, overrides=()):
    out = tmp_path / name
    script_args = ["--data-dir", data_dir, "--output-dir", str(out), "--set", *OVERRIDES, *overrides]
    script_args.append(f"data.cache_dir={tmp_path / 'cache'}")
    args = ["-s", "local_cwd", "dist.ddp", "-j", topology, "--rdzv_port", str(free_port()), *component_args]
    result = torchx([*args, "--script", "launchers/train.py", "--", *script_args], extra_env)
    (tmp_path / f"{name}.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0 and "SUCCEEDED" in result.stderr + result.stdout, result.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text()), result.stdout + result.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("torchx")
    # 1x2; rank 1 crashes at step 3 (mid-epoch 2); torchrun restarts the workers (PET_MAX_RESTARTS,
    # since local_cwd has no scheduler retries) and they resume from the checkpoint at step 2.
    crash = {"PET_MAX_RESTARTS": "1", "RECBLR_FAIL_AT_STEP": "3"}
    one_node = run_training(tmp, "1x2", data_dir, "1x2", ["--max_retries", "1"], crash)
    # 2x1 through TrainPipelineSparseDist (what GPUs use), so equal metrics also check it against plain steps.
    two_nodes = run_training(tmp, "2x1", data_dir, "2x1", overrides=["distributed.pipeline=sparse_dist"])
    return one_node, two_nodes


def test_torchx_1x2_run_restarts_a_crashed_worker_and_resumes(runs):
    (metrics, log), _ = runs
    assert "simulated crash of rank 1" in log and "resuming" in log and "(step 2)" in log
    assert metrics["world_size"] == 2 and metrics["backend"] == "gloo" and metrics["epochs"] == 2


def test_torchx_2x1_pipelined_run_over_two_nodes_ends_where_the_resumed_1x2_run_ends(runs):
    (one_node, _), (two_nodes, log) = runs
    assert two_nodes["world_size"] == 2 and "resuming" not in log
    assert two_nodes["test"] == one_node["test"] and two_nodes["valid"] == one_node["valid"]


def test_the_short_form_runs_the_launcher_through_the_repository_torchxconfig():
    config = "configs/ml-1m/recblr-paper.yaml"
    result = torchx(["--dryrun", "dist.ddp", "-j", "2x8", "launchers/train.py", "--config", config])
    assert result.returncode == 0, result.stderr[-3000:]
    gap = r"['\"\s]*"  # the dry run pretty-prints the command as wrapped string literals
    pattern = gap.join([r"--role", r"launchers/train\.py", r"launchers/train\.py", r"--config", re.escape(config)])
    assert re.search(pattern, result.stdout), result.stdout[:3000]


def test_the_launcher_drops_its_own_path_repeated_by_the_short_form():
    sys.path.insert(0, os.path.join(ROOT, "launchers"))
    try:
        from train import strip_own_path
    finally:
        sys.path.pop(0)
    own = os.path.join(ROOT, "launchers", "train.py")
    assert strip_own_path([own, "--config", "c.yaml"]) == ["--config", "c.yaml"]
    assert strip_own_path([own, "--", "--config", "c.yaml"]) == ["--config", "c.yaml"]
    assert strip_own_path(["--config", "c.yaml"]) == ["--config", "c.yaml"]
