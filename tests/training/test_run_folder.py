"""Rerunning a run folder: other settings refuse in one line (naming each key and the three ways
on), raised max_epochs/patience continue, execution keys never block, a finished run prints its
results without training, --overwrite starts over, --resume goes on; checkpoints carry the hash of
the settings; checkpoint_every resumes a one-process run mid-epoch."""

import json
import os

import pytest
import torch

from recblr_torchrec.config import load_config, settings_hash
from recblr_torchrec.errors import RunFolderError
from recblr_torchrec.training import Trainer, train
from recblr_torchrec.training.trainer import Interrupted

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SMALL = ["data.max_users=150", "model.recblr.embedding_dim=16", "train.batch_size=64", "train.device=cpu"]


@pytest.fixture
def run(tmp_path, data_dir):
    """(config for ``overrides``, run folder): one epoch trained there by ``train``."""
    folder = str(tmp_path / "run")

    def config(*overrides):
        return load_config(TINY, SMALL + [f"data.cache_dir={tmp_path / 'cache'}", "train.max_epochs=1", *overrides])

    train(config(), folder, data_dir)
    return config, folder


def last_checkpoint(folder):
    return torch.load(os.path.join(folder, "checkpoints", "last.pt"), weights_only=False)


def test_other_settings_refuse_in_one_line_naming_each_key_and_the_ways_on(run, data_dir):
    config, folder = run
    with pytest.raises(RunFolderError) as refused:
        train(config("train.seed=1", "train.lr=3e-4", "eval.ks=[10]"), folder, data_dir)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{folder} holds a run with other settings: ")
    assert "eval.ks=[10, 20] (now [10]), train.lr=0.001 (now 0.0003), train.seed=2024 (now 1);" in message
    assert "--resume" in message and "--overwrite" in message and "another --output-dir" in message
    assert json.load(open(os.path.join(folder, "metrics.json")))["config"]["train"]["seed"] == 2024  # untouched


def test_a_finished_run_rerun_prints_its_results_and_does_not_train(run, data_dir, capfd):
    config, folder = run
    before = json.load(open(os.path.join(folder, "metrics.json")))
    stamp = os.path.getmtime(os.path.join(folder, "checkpoints", "last.pt"))
    capfd.readouterr()
    again = train(config("train.num_workers=1", "train.log_every=7", "eval.batch_size=64"), folder, data_dir)
    out = capfd.readouterr().out
    assert f"{folder} is finished (best epoch 1 of 1); its results, not retrained" in out
    assert "| test |" in out and "epoch 1: loss" not in out
    assert again["test"] == before["test"] and again["epochs"] == 1
    assert os.path.getmtime(os.path.join(folder, "checkpoints", "last.pt")) == stamp


def test_raising_max_epochs_or_patience_continues_the_run(run, data_dir, capfd):
    config, folder = run
    summary = train(config("train.max_epochs=2", "train.checkpoint_every=3", "train.precision=tf32"), folder, data_dir)
    assert summary["epochs"] == 2 and "resuming" in capfd.readouterr().out
    stopped = config("train.max_epochs=3", "train.patience=1")
    trainer = Trainer(stopped, folder, data_dir)
    assert trainer.resume()
    trainer.state.update(bad_epochs=1, stopped_early=True)  # as if the second epoch had not improved
    trainer.save_checkpoint()
    assert train(stopped, folder, data_dir)["epochs"] == 2  # stopped early under patience 1 ...
    assert "is finished" in capfd.readouterr().out
    raised = Trainer(config("train.max_epochs=3", "train.patience=2"), folder, data_dir)
    raised.fit()  # ... goes on under patience 2
    assert raised.state["epoch"] == 3 and raised.epochs_trained == 1


def test_resume_continues_with_other_settings_and_says_which(run, data_dir, capfd):
    config, folder = run
    changed = config("train.max_epochs=2", "train.lr=3e-4", "train.weight_decay=0.01")
    trainer = Trainer(changed, folder, data_dir, resume_other_settings=True)
    trainer.fit()
    out = capfd.readouterr().out
    differing = "train.lr=0.001 (now 0.0003), train.weight_decay=0.0 (now 0.01)"
    assert f"continuing {folder} with other settings: {differing}" in out
    assert trainer.state["epoch"] == 2 and trainer.epochs_trained == 1 and "resuming" in out
    assert [(g["lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups] == [(3e-4, 0.01)]
    assert last_checkpoint(folder)["progress"]["settings_hash"] == settings_hash(changed)


def test_overwrite_starts_the_folder_over(run, data_dir):
    config, folder = run
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("a file of the old run")
    summary = train(config("train.seed=1"), folder, data_dir, overwrite=True)
    assert summary["config"]["train"]["seed"] == 1 and summary["epochs"] == 1
    assert not os.path.exists(os.path.join(folder, "notes.txt"))


def test_checkpoints_carry_the_hash_of_the_settings_that_matter(run):
    config, folder = run
    assert last_checkpoint(folder)["progress"]["settings_hash"] == settings_hash(config())
    same = ["train.num_workers=2", "train.max_epochs=9", "train.patience=3", "model.recblr.kernels=pytorch"]
    assert settings_hash(config(*same)) == settings_hash(config())
    for other in ("train.seed=1", "data.max_len=20", "model.recblr.num_layers=1", "eval.ks=[10]", "train.loss=sampled"):
        assert settings_hash(config(other)) != settings_hash(config()), other
    assert settings_hash(config("model.sasrec.num_heads=4")) == settings_hash(config())  # the unused encoder's


@pytest.mark.parametrize(
    "schedule", [[], ["train.lr_schedule=cosine", "train.warmup_steps=3"]], ids=["constant", "cosine"]
)
def test_checkpoint_every_resumes_a_one_process_run_mid_epoch(tmp_path, data_dir, schedule):
    overrides = SMALL + [f"data.cache_dir={tmp_path / 'cache'}", "train.max_epochs=2", "train.checkpoint_every=2"]
    overrides += schedule  # a scheduled rate continues from the resumed step
    straight = Trainer(load_config(TINY, overrides), str(tmp_path / "a"), data_dir)
    straight.fit()
    interrupted = Trainer(load_config(TINY, overrides), str(tmp_path / "b"), data_dir)
    steps_per_epoch = interrupted.train_batches.batches_per_epoch
    assert steps_per_epoch >= 4
    interrupted.stop_at_step = steps_per_epoch + 3  # mid-epoch 2, one step after the checkpoint at batch 2
    with pytest.raises(Interrupted):
        interrupted.fit()
    resumed = Trainer(load_config(TINY, overrides), str(tmp_path / "b"), data_dir)
    assert resumed.resume() and resumed.state["in_epoch"] == 2 and resumed.state["batch"] == 2
    resumed.fit()
    assert [row["train_loss"] for row in resumed.history] == [row["train_loss"] for row in straight.history]
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_a_run_finished_without_the_test_split_evaluates_it_when_asked(run, data_dir):
    config, folder = run
    summary = train(config("eval.test=false"), folder + "-valid-only", data_dir)
    assert "test" not in summary and "valid" in summary
    again = train(config(), folder + "-valid-only", data_dir)  # eval.test is not a learned setting
    assert again["test"] and again["epochs"] == summary["epochs"]
