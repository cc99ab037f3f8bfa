"""launchers/export.py on a trained run, and the artifacts in a fresh process that imports only torch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from recblr_torchrec.checkpoint import CheckpointError, find_model, read_model
from recblr_torchrec.serving import export

from .conftest import random_histories, random_model, write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FRESH_PROCESS = """
import json, sys, torch
out, inputs = sys.argv[1], torch.load(sys.argv[2])
assert "recblr_torchrec" not in sys.modules and "torchrec" not in sys.modules
scorer, step = torch.jit.load(out + "/scorer.pt"), torch.jit.load(out + "/step.pt")
scores, items = scorer(inputs["ids"], inputs["lengths"], 5)
state = step.initial_state(inputs["ids"].shape[0])
for t in range(inputs["ids"].shape[1]):
    real = t < inputs["lengths"]
    new_state, _, _ = step(state, torch.where(real, inputs["ids"][:, t], torch.ones_like(real, dtype=torch.long)), 5)
    state = torch.where(real.unsqueeze(1), new_state, state)
project = ("torchrec", "recblr_torchrec", "fbgemm_gpu")
modules = sorted(m for m in sys.modules if m.split(".")[0] in project)
user_state = scorer.user_state(inputs["ids"], inputs["lengths"])
torch.save({"scores": scores, "items": items, "state": state, "user_state": user_state, "modules": modules},
           out + "/fresh.pt")
"""


def run(args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_export_of_a_trained_run_agrees_in_a_fresh_process(tmp_path, data_dir):
    run_dir, out = tmp_path / "run", tmp_path / "serving"
    train = [os.path.join(ROOT, "launchers", "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.yaml")]
    train += ["--data-dir", data_dir, "--output-dir", str(run_dir)]
    train += [f"--set={s}" for s in ("train.max_epochs=1", "data.max_users=40", "model.recblr.embedding_dim=8")]
    run(train, tmp_path)
    run(
        [os.path.join(ROOT, "launchers", "export.py"), "--checkpoint", str(run_dir), "--output-dir", str(out)], tmp_path
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint"]["path"] == str(run_dir / "checkpoints" / "best.pt")
    ids, lengths = random_histories(4, 9, [9, 1, 0, 4])
    ids = ids.clamp(max=manifest["num_items"])
    torch.save({"ids": ids, "lengths": lengths}, tmp_path / "inputs.pt")
    run(["-c", FRESH_PROCESS, str(out), str(tmp_path / "inputs.pt")], tmp_path)
    fresh = torch.load(out / "fresh.pt")
    assert fresh["modules"] == []  # nothing of TorchRec was needed to load or run the artifacts
    scorer = torch.jit.load(str(out / "scorer.pt"))
    scores, items = scorer(ids, lengths, 5)
    assert torch.equal(fresh["scores"], scores) and torch.equal(fresh["items"], items)
    torch.testing.assert_close(fresh["state"], fresh["user_state"], rtol=0, atol=1e-5)


def test_checkpoint_resolution(tmp_path):
    model = random_model(1)
    write_checkpoint(model, str(tmp_path / "run" / "checkpoints" / "best.pt"))
    assert find_model(str(tmp_path / "run")) == ("local", str(tmp_path / "run" / "checkpoints" / "best.pt"))
    source = read_model(str(tmp_path / "run" / "checkpoints" / "best.pt"))
    assert source.num_embeddings == model.num_embeddings and source.epoch == 3
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(b"")
    assert find_model(str(tmp_path / "dcp")) == ("distributed", str(tmp_path / "dcp"))
    with pytest.raises(CheckpointError, match="cannot read the distributed checkpoint"):
        read_model(str(tmp_path / "dcp"))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=False)
    ckpt["config"]["context"] = {"user_buckets": 7, "embedding_dim": 0, "join": "input"}
    torch.save(ckpt, tmp_path / "context.pt")
    with pytest.raises(NotImplementedError, match="context features"):
        export(str(tmp_path / "context.pt"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        read_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_model(str(tmp_path / "missing"))
