import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from recblr_torchrec.config import load_config
from recblr_torchrec.training import NextItemTask, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
METRICS = {f"{m}@{k}" for m in ("HR", "NDCG", "MRR") for k in (10, 20)}
SMALL = ["data.max_users=150", "model.recblr.embedding_dim=16", "train.batch_size=64"]
SMALL += ["train.precision=fp32", "train.cuda_graphs=false"]  # the same steps on a CPU and a GPU


def test_launcher_trains_evaluates_and_writes_its_outputs(tmp_path, data_dir):
    out = tmp_path / "run"
    command = [sys.executable, os.path.join(ROOT, "launchers", "train.py"), "--config", TINY]
    command += ["--data-dir", data_dir, "--output-dir", str(out), "--set", "train.max_epochs=2"]
    command += ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["valid"]) == METRICS and set(metrics["test"]) == METRICS
    assert metrics["config"]["train"]["max_epochs"] == 2 and metrics["epochs"] == 2
    assert metrics["test"]["HR@10"] > 0.02  # better than chance (10 / 1349 items = 0.007)
    assert "| test |" in result.stdout
    assert "\r" not in result.stderr and "epoch 1:" not in result.stderr  # no progress-bar redraws in a log file
    assert result.stdout.startswith("run tiny: ml-100k/ml-100k.inter.gz (") and f"), into {out}\n" in result.stdout
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss") and len(rows) == 3
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "checkpoints" / "best.pt").is_file()


def test_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path, data_dir):
    cache = [f"data.cache_dir={tmp_path / 'cache'}"]
    straight = Trainer(load_config(TINY, SMALL + cache + ["train.max_epochs=3"]), str(tmp_path / "a"), data_dir)
    straight.fit()
    first = Trainer(load_config(TINY, SMALL + cache + ["train.max_epochs=2"]), str(tmp_path / "b"), data_dir)
    first.fit()
    del first  # "crash" after epoch 2; a new process-like trainer resumes from the checkpoint
    resumed = Trainer(load_config(TINY, SMALL + cache + ["train.max_epochs=3"]), str(tmp_path / "b"), data_dir)
    resumed.fit()
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_a_learned_temperature_trains_is_logged_each_epoch_and_resumes(tmp_path, data_dir):
    from recblr_torchrec.training.history import read_history

    learned = SMALL + [f"data.cache_dir={tmp_path / 'cache'}", "model.score_temperature=0.1"]
    learned += ["model.learn_temperature=true", "train.lr=0.01"]
    straight = Trainer(load_config(TINY, learned + ["train.max_epochs=2"]), str(tmp_path / "a"), data_dir)
    straight.fit()
    Trainer(load_config(TINY, learned + ["train.max_epochs=1"]), str(tmp_path / "b"), data_dir).fit()
    resumed = Trainer(load_config(TINY, learned + ["train.max_epochs=2"]), str(tmp_path / "b"), data_dir)
    resumed.fit()
    temperatures = [row["temperature"] for row in read_history(str(tmp_path / "a"))]
    assert len(temperatures) == 2 and temperatures[0] != pytest.approx(0.1) and temperatures[1] != temperatures[0]
    assert temperatures[-1] == pytest.approx(straight.model.temperature(), rel=1e-6)
    assert [row["temperature"] for row in read_history(str(tmp_path / "b"))] == temperatures
    assert torch.equal(resumed.model.score_scale, straight.model.score_scale)


def test_resume_refuses_a_different_model(tmp_path, data_dir):
    cache = [f"data.cache_dir={tmp_path / 'cache'}"]
    Trainer(load_config(TINY, SMALL + cache + ["train.max_epochs=1"]), str(tmp_path), data_dir).fit()
    other = Trainer(load_config(TINY, SMALL + cache + ["model.recblr.num_layers=1"]), str(tmp_path), data_dir)
    with pytest.raises(ValueError, match=r"settings: model.recblr.num_layers=2 \(now 1\); continue it anyway"):
        other.fit()


def test_resume_refuses_another_optimizer_and_takes_the_configs_learning_rate_and_decay(tmp_path, data_dir):
    cache = [f"data.cache_dir={tmp_path / 'cache'}", "train.max_epochs=1"]
    Trainer(load_config(TINY, SMALL + cache), str(tmp_path), data_dir).fit()  # adam, lr 1e-3, no decay
    other = Trainer(load_config(TINY, SMALL + cache + ["train.optimizer=adamw"]), str(tmp_path), data_dir)
    with pytest.raises(ValueError, match=r"other settings: train.optimizer='adam' \(now 'adamw'\); continue it"):
        other.resume()
    changed = ["train.lr=3e-4", "train.weight_decay=0.01"]
    resumed = Trainer(load_config(TINY, SMALL + cache + changed), str(tmp_path), data_dir, resume_other_settings=True)
    assert resumed.resume()
    assert [(g["lr"], g["weight_decay"]) for g in resumed.optimizer.param_groups] == [(3e-4, 0.01)]
    assert resumed.optimizer.state  # the moments came back


def paired_trainers(tmp_path, data_dir, *changed):
    """Two trainers of one model (dropout off) that differ by ``changed``, and a batch of their data."""
    overrides = SMALL + [f"data.cache_dir={tmp_path / 'cache'}", "model.recblr.dropout=0.0"]
    base = Trainer(load_config(TINY, overrides), str(tmp_path / "a"), data_dir)
    other = Trainer(load_config(TINY, overrides + list(changed)), str(tmp_path / "b"), data_dir)
    other.model.load_state_dict(base.model.state_dict())
    base.train_batches.set_epoch(1)
    return base, other, base.train_batches[0]


def test_micro_batches_give_the_whole_batch_update(tmp_path, data_dir):
    whole, parts, batch = paired_trainers(tmp_path, data_dir, "train.micro_batch_size=7")
    loss_whole, loss_parts = whole.train_step(batch), parts.train_step(batch)
    assert abs(loss_whole - loss_parts) < 1e-5
    for (name, a), b in zip(whole.model.named_parameters(), parts.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_missing_data_dir_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RECBLR_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match="pass --data-dir DIR or set RECBLR_DATA_DIR"):
        Trainer(load_config(TINY), str(tmp_path), None)


def test_prefix_protocol_trains_one_target_per_sample(tmp_path, data_dir):
    overrides = SMALL + [f"data.cache_dir={tmp_path / 'cache'}", "train.protocol=prefixes", "train.max_epochs=1"]
    trainer = Trainer(load_config(TINY, overrides), str(tmp_path), data_dir)
    trainer.train_batches.set_epoch(1)
    batch = trainer.train_batches[0].to(trainer.device)
    assert int(torch.count_nonzero(batch.targets)) == len(batch)  # one target per prefix
    trainer.model.eval()  # the batch's own target rows and rows found from the targets: one loss
    carried = NextItemTask(trainer.model, check_targets=False)(batch)[0]
    torch.testing.assert_close(carried, NextItemTask(trainer.model)(dataclasses.replace(batch, target_rows=None))[0])
    trainer.fit()
    assert trainer.history[0]["train_loss"] > 0 and trainer.state["epoch"] == 1


def test_the_trainer_step_takes_the_label_smoothing_of_its_config(tmp_path, data_dir):
    overrides = SMALL + [
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.recblr.dropout=0.0",
        "train.label_smoothing=0.2",
    ]
    trainer = Trainer(load_config(TINY, overrides), str(tmp_path), data_dir)
    trainer.train_batches.set_epoch(1)
    batch = trainer.train_batches[0].to(trainer.device)
    smoothed = NextItemTask(trainer.model, label_smoothing=0.2)(batch)[0].detach()
    plain = NextItemTask(trainer.model)(batch)[0].detach()
    assert abs(smoothed.item() - plain.item()) > 1e-5
    torch.testing.assert_close(trainer.update(batch), smoothed)  # the loss before its update


def test_bf16_autocast_step_tracks_the_fp32_step(tmp_path, data_dir):
    fp32, bf16, batch = paired_trainers(tmp_path, data_dir, "train.precision=bf16")
    loss32, loss16 = float(fp32.train_step(batch)), float(bf16.train_step(batch))
    assert loss16 != loss32  # autocast did run in bfloat16
    assert abs(loss32 - loss16) < 0.02 * loss32, (loss32, loss16)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # master weights stay fp32


def test_tf32_precision_sets_the_float32_matmul_precision(tmp_path, data_dir):
    overrides = SMALL + [f"data.cache_dir={tmp_path / 'cache'}"]
    try:
        Trainer(load_config(TINY, overrides + ["train.precision=tf32"]), str(tmp_path / "a"), data_dir)
        assert torch.get_float32_matmul_precision() == "high"  # TF32 tensor cores for float32 matmuls
        Trainer(load_config(TINY, overrides), str(tmp_path / "b"), data_dir)
        assert torch.get_float32_matmul_precision() == "highest"  # fp32 means full float32 matmuls
    finally:
        torch.set_float32_matmul_precision("highest")


def test_compiled_encoder_step_equals_the_eager_step_without_graph_breaks(tmp_path, data_dir):
    from torch._dynamo.utils import counters

    # The fused Triton path (the interpreter on CPU), the one train.compile=inductor takes on the GPU.
    overrides = SMALL + [
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.recblr.dropout=0.0",
        "model.recblr.kernels=triton",
    ]
    overrides += ["data.max_len=12", "train.batch_size=16", "model.recblr.num_layers=1"]
    eager = Trainer(load_config(TINY, overrides), str(tmp_path / "a"), data_dir)
    compiled = Trainer(load_config(TINY, overrides + ["train.compile=aot_eager"]), str(tmp_path / "b"), data_dir)
    compiled.model.load_state_dict(eager.model.state_dict())
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())  # no wrapper prefix
    eager.train_batches.set_epoch(1)
    batch = eager.train_batches[0]
    torch._dynamo.reset()
    counters.clear()
    loss_eager, loss_compiled = float(eager.train_step(batch)), float(compiled.train_step(batch))
    assert counters["stats"]["unique_graphs"] >= 1  # the encoder did go through Dynamo
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert abs(loss_eager - loss_compiled) < 1e-5
    for (name, a), b in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_validation_every_n_epochs_and_the_time_budget(tmp_path, data_dir):
    overrides = SMALL + [f"data.cache_dir={tmp_path / 'cache'}", "train.max_epochs=3", "eval.every=2"]
    trainer = Trainer(load_config(TINY, overrides), str(tmp_path / "a"), data_dir)
    trainer.fit()
    validated = ["valid_NDCG@10" in row for row in trainer.history]
    assert validated == [False, True, True]  # epoch 2, and the last epoch
    with open(os.path.join(tmp_path / "a", "metrics.csv")) as f:
        assert "valid_NDCG@10" in f.readline()
    budget = SMALL + [f"data.cache_dir={tmp_path / 'cache'}", "train.max_epochs=50", "train.time_budget_s=0.001"]
    short = Trainer(load_config(TINY, budget), str(tmp_path / "b"), data_dir)
    short.fit()
    assert short.state["epoch"] == 1 and "valid_NDCG@10" in short.history[-1]


def test_a_sampled_softmax_run_trains_and_evaluates_in_one_process(tmp_path, data_dir):
    # the table serves the candidate feature, so evaluation batches carry an empty candidate bag
    overrides = SMALL + [f"data.cache_dir={tmp_path / 'cache'}", "train.loss=sampled", "train.num_negatives=64"]
    trainer = Trainer(load_config(TINY, overrides + ["train.max_epochs=1"]), str(tmp_path / "run"), data_dir)
    trainer.fit()
    summary = trainer.finish()
    assert summary["epochs"] == 1 and 0 < summary["test"]["HR@20"] <= 1
    assert all(batch.candidates().numel() == 0 for batch in trainer.eval_batches["valid"])


def test_the_rate_schedule_warms_up_then_follows_a_cosine_to_zero(tmp_path, data_dir):
    overrides = SMALL + [f"data.cache_dir={tmp_path / 'cache'}", "train.max_epochs=2", "train.lr=0.01"]
    scheduled = ["train.lr_schedule=cosine", "train.warmup_steps=4"]
    trainer = Trainer(load_config(TINY, overrides + scheduled), str(tmp_path / "a"), data_dir)
    schedule, steps = trainer.schedule, 2 * trainer.train_batches.batches_per_epoch
    assert schedule.active and schedule.total == steps
    assert [schedule.factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    middle = 4 + (steps - 4) // 2
    assert abs(schedule.factor(middle) - 0.5) < 0.5 / (steps - 4) * 3.2
    assert schedule.factor(steps - 1) < 0.05 and schedule.factor(steps + 10) == 0.0
    trainer.fit()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * schedule.factor(steps))
    constant = Trainer(load_config(TINY, overrides), str(tmp_path / "b"), data_dir)
    assert not constant.schedule.active  # the paper's rate: nothing set between steps


def test_max_steps_ends_the_run_and_its_cosine_at_the_epoch_that_reaches_it(tmp_path, data_dir):
    overrides = SMALL + [f"data.cache_dir={tmp_path / 'cache'}", "train.max_epochs=50", "train.lr_schedule=cosine"]
    probe = Trainer(load_config(TINY, overrides), str(tmp_path / "probe"), data_dir)
    per_epoch = probe.train_batches.batches_per_epoch
    assert per_epoch >= 2 and probe.last_epoch == 50  # 0: max_epochs alone
    limited = overrides + [f"train.max_steps={per_epoch + 1}", "train.patience=100"]
    trainer = Trainer(load_config(TINY, limited), str(tmp_path / "a"), data_dir)
    assert trainer.last_epoch == 2 and trainer.schedule.total == 2 * per_epoch  # rounded up to whole epochs
    trainer.fit()
    assert trainer.state["epoch"] == 2 and trainer.state["step"] == 2 * per_epoch
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine's end
    assert load_config(TINY, ["train.max_epochs=1", "train.max_steps=1000000"]).train.epochs(per_epoch) == 1
    with pytest.raises(ValueError, match=r"train.max_steps=-1 must be >= 0"):
        load_config(TINY, ["train.max_steps=-1"])


def test_sgd_cannot_capture_a_scheduled_rate():
    with pytest.raises(ValueError, match="train.optimizer=sgd and a learning-rate schedule"):
        load_config(TINY, ["train.optimizer=sgd", "train.warmup_steps=10", "train.cuda_graphs=on"])


def test_window_context_reads_more_positions_for_the_same_targets_and_trains(tmp_path, data_dir):
    cache = [f"data.cache_dir={tmp_path / 'cache'}", "data.max_len=20", "train.max_epochs=1"]
    plain_run = Trainer(load_config(TINY, SMALL + cache), str(tmp_path / "a"), data_dir)
    windowed = Trainer(load_config(TINY, SMALL + cache + ["train.window_context=10"]), str(tmp_path / "b"), data_dir)
    every = np.arange(len(plain_run.train_batches.samples))
    targets = int((plain_run.data.lengths - 3).clip(min=0).sum())
    assert plain_run.train_batches.samples.target_count(every) == targets
    samples = windowed.train_batches.samples
    assert samples.target_count(np.arange(len(samples))) == targets
    assert windowed.train_batches.num_positions > plain_run.train_batches.num_positions
    windowed.fit()
    assert np.isfinite(windowed.history[0]["train_loss"]) and windowed.history[0]["valid_NDCG@10"] > 0
