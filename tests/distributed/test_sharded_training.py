"""Sharded (TW/RW/CW) == unsharded, one step == local mode, sampled softmax, evaluation over ranks,
DCP kill-and-resume: each test is one spawned 2-process gloo run with short timeouts."""

import json
import os

import pytest

from .spawn import run_on_ranks
from .workers import (
    kill_and_resume,
    pipelined_dense_step,
    resume_on_fewer_ranks,
    sampled_softmax_step,
    sharded_equals_local,
    tiny_parity,
    tiny_run_and_fallback,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_sharded_forward_step_and_evaluation_equal_local_mode(tmp_path, data_dir, cache):
    results = run_on_ranks(sharded_equals_local, tmp_path, data_dir, cache)
    for result in results:
        assert result["checked"] == [
            "table_wise/table_wise/sgd",
            "row_wise/column_wise/sgd",
            "column_wise/column_wise/sgd",
            "row_wise/data_parallel/adagrad",
        ]
        assert len(result["evaluations"]) == 4
        for merged, alone in result["evaluations"]:
            for name, value in alone.items():
                assert merged[name] == pytest.approx(value, abs=1e-12), name
    assert [r["fillers"] for r in results] == [0, 1]  # rank 1's share of the last batch was empty


def test_sampled_softmax_trains_through_the_row_wise_sharded_table(tmp_path, data_dir, cache):
    results = run_on_ranks(sampled_softmax_step, tmp_path, data_dir, cache)
    for result in results:
        assert result["share"] == pytest.approx(result["local_share"], rel=1e-5)
        assert result["count"] > 0
        assert len(result["rates"]) >= 2  # the tables' fused optimizer's groups beside the dense one's
        assert result["rates"] == pytest.approx([base / 4 for base in result["base_rates"]])
    assert sum(r["changed"] for r in results) > 0


def test_run_stopped_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, data_dir, cache):
    results = run_on_ranks(kill_and_resume, tmp_path, data_dir, cache, str(tmp_path))
    for result in results:
        assert result["resumed_at"] == (result["steps_per_epoch"] + 2, 2)  # the checkpoint at batch 2 of epoch 2
        straight, resumed = result["losses"]
        assert straight == resumed
        assert result["metrics"][0] == result["metrics"][1]
        assert result["same_table"] and result["same_dense"]
    (tmp_path / "one").mkdir()
    (fewer,) = run_on_ranks(resume_on_fewer_ranks, tmp_path / "one", data_dir, cache, str(tmp_path), world=1)
    assert fewer == {"resumed_after_epoch": 2, "epochs": [1, 2, 3]}


def test_the_tables_train_as_in_one_process_by_default_and_a_differing_optimizer_needs_its_own_rate():
    import torch

    from recblr_torchrec.config import DistributedConfig, TrainConfig
    from recblr_torchrec.distributed.sharding import table_training

    gpu, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only: nothing runs on them

    def tables(optimizer="adam", decay=0.0, device=gpu, **distributed):
        return table_training(
            DistributedConfig(**distributed), TrainConfig(optimizer=optimizer, weight_decay=decay), device
        )

    assert (tables().optimizer, tables().learning_rate) == ("adam", 1e-3)  # FBGEMM's fused Adam at train.lr
    assert tables("adamw", 0.1).optimizer == "adam"  # both decouple the decay
    assert tables("sgd", device=cpu).optimizer == "sgd" and tables("adagrad", device=cpu).optimizer == "adagrad"
    for replicated, why in (
        (tables(device=cpu), "no fused Adam on CPU"),
        (tables("adam", 0.1), "adds the weight decay to the gradient, FBGEMM's fused Adam decouples it"),
        (tables("sgd", 0.1, cpu), "fused sgd has no weight decay"),
    ):
        assert not replicated.sharded and replicated.notice.startswith("tables: replicated on every rank"), why
        assert why in replicated.notice
    with pytest.raises(ValueError, match="rowwise_adagrad updates the tables differently from train.optimizer=adam"):
        tables(sparse_optimizer="rowwise_adagrad")
    named = tables(sparse_optimizer="rowwise_adagrad", sparse_lr=0.05)
    assert named.learning_rate == 0.05 and "the dense parameters by adam at train.lr=0.001" in named.notice
    with pytest.raises(ValueError, match="sparse_optimizer=adam: TorchRec has no fused Adam on CPU; use auto"):
        tables(device=cpu, sparse_optimizer="adam")


def test_weight_decay_reaches_the_fused_table_optimizer_or_is_refused():
    import torch

    from recblr_torchrec.config import DistributedConfig, TrainConfig
    from recblr_torchrec.distributed.sharding import fused_params, table_training

    gpu, cpu = torch.device("cuda"), torch.device("cpu")  # a device object only: nothing runs on it

    def params(sparse, optimizer="adam", decay=0.1, device=gpu):
        train = TrainConfig(optimizer=optimizer, weight_decay=decay)
        return fused_params(
            table_training(DistributedConfig(sparse_optimizer=sparse, sparse_lr=0.05), train, device), train, device
        )

    assert "weight_decay_mode" not in params("sgd", decay=0.0, device=cpu)  # no decay: nothing to check
    assert params("rowwise_adagrad")["weight_decay_mode"].name == "L2"  # as Adam's coupled decay
    assert params("rowwise_adagrad", "adamw")["weight_decay_mode"].name == "DECOUPLE"
    adam = params("adam", "adamw")
    assert adam["weight_decay"] == 0.1 and "weight_decay_mode" not in adam  # FBGEMM's Adam decouples it
    assert (adam["eps"], adam["beta1"], adam["beta2"]) == (1e-8, 0.9, 0.999)  # torch.optim.Adam's
    with pytest.raises(ValueError, match="weight_decay=0.1 would not reach the sharded tables.*fused sgd has no"):
        params("sgd")
    with pytest.raises(ValueError, match="fused rowwise_adagrad on CPU has no weight decay.*train.weight_decay=0"):
        params("rowwise_adagrad", device=cpu)


def test_a_sharded_run_learns_as_the_one_process_run_does(tmp_path, data_dir, cache):
    """The tiny config, 5 epochs, shipped defaults: through DMP on 1 and 2 processes against one
    process. Training loss within 1%, validation NDCG@10 within 15% (943 users: a noisy metric);
    one step on 2 ranks equals the local step on the same global batch."""
    from recblr_torchrec.config import load_config
    from recblr_torchrec.training import Trainer

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    overrides = [f"data.cache_dir={cache}", "train.device=cpu", "train.max_epochs=5"]
    local = Trainer(load_config(os.path.join(root, "configs", "tiny.yaml"), overrides), str(tmp_path / "l"), data_dir)
    local.fit()
    local_loss, local_ndcg = local.history[-1]["train_loss"], local.history[-1]["valid_NDCG@10"]
    for world in (1, 2):
        (tmp_path / str(world)).mkdir()
        results = run_on_ranks(
            tiny_parity, tmp_path / str(world), data_dir, cache, str(tmp_path / str(world)), 5, world=world
        )
        result = results[0]
        assert "replicated on every rank and updated by the dense adam" in result["placement"]
        assert max(result["step_differences"].values()) < 1e-6, result["step_differences"]
        assert abs(result["losses"][-1] - local_loss) < 0.01 * local_loss, (world, result["losses"], local_loss)
        assert abs(result["valid"][-1] - local_ndcg) < 0.15 * local_ndcg, (world, result["valid"], local_ndcg)


def test_two_process_tiny_run_reaches_its_recorded_values_and_resumes_past_a_lost_checkpoint(tmp_path, data_dir, cache):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "tests", "fixtures", "tiny_runs.json")) as f:
        recorded = json.load(f)["two_processes"]
    results = run_on_ranks(tiny_run_and_fallback, tmp_path, data_dir, cache, str(tmp_path))
    for result in results:
        for split in ("valid", "test"):
            for name, value in recorded[split].items():
                assert result["summary"][split][name] == pytest.approx(value, rel=1e-6, abs=0), (split, name)
        assert result["losses"] == pytest.approx(recorded["train_loss"], rel=1e-6, abs=0)
        assert result["resumed_from"] == result["older"]  # the newest lost a shard file: the one before
        assert result["again"] == result["losses"]  # epoch 3 trained again, to the same loss


def test_the_pipelined_step_with_its_dense_part_apart_equals_the_plain_sharded_step(tmp_path, data_dir, cache):
    # two ranks: the dense gradients averaged by the dense step itself, not by DDP; padded shares scaled
    # by their real target counts on the device
    for result in run_on_ranks(pipelined_dense_step, tmp_path, data_dir, cache):
        plain, piped = result["losses"][:2], result["losses"][2:]
        assert piped == pytest.approx(plain, rel=1e-6)
        moved = result["moved"]  # the dense tensors were updated (SGD leaves the decay within its rounding) ...
        assert sum(value > 0 for value in moved.values()) >= len(moved) - 1, moved
        assert max(result["dense"].values()) < 1e-6, result["dense"]  # ... to the same values
        assert max(result["tables"].values()) < 1e-6, result["tables"]
        assert "data_parallel" in result["refused"]
