"""Whole one-process runs of the tiny config: the recorded values, the resolved config, and resuming
from the checkpoints a run leaves (the previous one when the newest is unreadable, the older file
layout)."""

import json
import os

import pytest
import torch

from recblr_torchrec.checkpoint import CheckpointError
from recblr_torchrec.config import load_config
from recblr_torchrec.training import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
with open(os.path.join(ROOT, "tests", "fixtures", "tiny_runs.json")) as f:
    RECORDED = json.load(f)


def assert_recorded(summary, history, recorded):
    for split in ("valid", "test"):
        for name, value in recorded[split].items():
            assert summary[split][name] == pytest.approx(value, rel=1e-6, abs=0), (split, name)
    assert [row["train_loss"] for row in history] == pytest.approx(recorded["train_loss"], rel=1e-6, abs=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    """configs/tiny.yaml as shipped, trained to its end in one process on the CPU: (trainer, summary)."""
    root = tmp_path_factory.mktemp("tiny")
    config = load_config(TINY, [f"data.cache_dir={root / 'cache'}", "train.device=cpu"])
    trainer = Trainer(config, str(root / "run"), data_dir)
    trainer.fit()
    return trainer, trainer.finish()


def test_the_tiny_config_reaches_its_recorded_values(tiny_run):
    trainer, summary = tiny_run
    assert_recorded(summary, trainer.history, RECORDED["one_process"])
    assert summary["world_size"] == 1 and summary["epochs"] == 3


def test_the_run_folder_shows_the_resolved_config_and_each_kernels_implementation(tiny_run):
    trainer, _ = tiny_run
    with open(os.path.join(trainer.output_dir, "resolved_config.json")) as f:
        resolved = json.load(f)
    assert resolved["config"]["model"]["recblr"]["kernels"] == "auto"
    assert resolved["resolved"]["device"] == "cpu" and resolved["resolved"]["world_size"] == 1
    kernels = resolved["resolved"]["kernels"]  # auto on the CPU: the references, however torch records
    assert set(kernels) == {"eager", "torch.compile", "torch.export", "torch.jit.trace", "torch.jit.script"}
    assert all(impl == "pytorch" for table in kernels.values() for impl in table.values())


def copy_run(trainer, tmp_path):
    """A copy of a finished run's folder (its checkpoints included)."""
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(trainer.output_dir, target)
    return str(target)


def test_an_unreadable_newest_checkpoint_resumes_from_the_previous_one(tiny_run, tmp_path, data_dir, capfd):
    trainer, _ = tiny_run
    folder = copy_run(trainer, tmp_path)
    last = os.path.join(folder, "checkpoints", "last.pt")
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) // 2)  # a disk that lost the end of the file
    config = load_config(TINY, [f"data.cache_dir={trainer.config.data.cache_dir}", "train.device=cpu"])
    again = Trainer(config, folder, data_dir)
    again.fit()  # resumes after epoch 2 from previous.pt and trains epoch 3 again
    err = capfd.readouterr().err
    assert (
        f"resuming from {os.path.join(folder, 'checkpoints', 'previous.pt')}: checkpoint {last} cannot be read" in err
    )
    assert [row["train_loss"] for row in again.history] == [row["train_loss"] for row in trainer.history]
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[name]), name


def test_no_readable_checkpoint_stops_instead_of_training_again(tiny_run, tmp_path, data_dir):
    trainer, _ = tiny_run
    folder = copy_run(trainer, tmp_path)
    for name in ("last.pt", "previous.pt"):
        with open(os.path.join(folder, "checkpoints", name), "wb") as f:
            f.write(b"not a checkpoint")
    config = load_config(TINY, [f"data.cache_dir={trainer.config.data.cache_dir}", "train.device=cpu"])
    with pytest.raises(CheckpointError, match="no readable checkpoint: .*last.pt cannot be read.*move the run folder"):
        Trainer(config, folder, data_dir).fit()


def test_a_checkpoint_of_the_older_layout_resumes(tiny_run, tmp_path, data_dir):
    """Files written before checkpoints held ``progress`` and per-rank objects, with the flat model
    section of that time, resume where they ended."""
    trainer, _ = tiny_run
    folder = copy_run(trainer, tmp_path)
    path = os.path.join(folder, "checkpoints", "last.pt")
    current = torch.load(path, weights_only=False)
    progress = current["progress"]
    config = progress["config"]
    recblr = config["model"]["recblr"]
    config["model"] = {
        **{key: recblr[key] for key in ("embedding_dim", "num_layers", "expand", "conv_width", "dropout")},
        **{key: recblr[key] for key in ("layer_norm_eps", "recompute_mix", "recompute_recurrence", "fused_norms")},
        "scan_backend": recblr["kernels"],
        "architecture": "recblr",
        "num_heads": 2,
        "max_positions": 512,
    }
    state = {key: progress["state"][key] for key in ("epoch", "best", "best_epoch", "bad_epochs", "stopped_early")}
    older = {"model": current["model"], "optimizer": current["optimizer"], "state": state}
    older.update(
        history=progress["history"],
        rng=current["rank0"]["rng"],
        config=config,
        num_embeddings=trainer.model.num_embeddings,
    )
    torch.save(older, path)
    os.remove(os.path.join(folder, "checkpoints", "previous.pt"))
    config = load_config(
        TINY, [f"data.cache_dir={trainer.config.data.cache_dir}", "train.device=cpu", "train.max_epochs=4"]
    )
    again = Trainer(config, folder, data_dir)
    assert again.resume() and again.state["epoch"] == 3 and again.history == trainer.history
    again.fit()
    assert [row["epoch"] for row in again.history] == [1, 2, 3, 4]


def test_the_run_folder_holds_tensorboard_scalars_of_every_epoch(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, _ = tiny_run
    events = EventAccumulator(os.path.join(trainer.output_dir, "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/examples_per_second", "train/lr", "valid/NDCG@10", "valid/HR@20"} <= tags
    losses = [event.value for event in events.Scalars("train/loss")]
    assert losses == pytest.approx([row["train_loss"] for row in trainer.history], rel=1e-6)
    assert [event.value for event in events.Scalars("train/lr")] == pytest.approx([1e-3] * 3)
