import os
import types

import pytest
import torch
from torch import nn

from recblr_torchrec.config import load_config
from recblr_torchrec.distributed.placement import ShardedPlacement
from recblr_torchrec.errors import ConfigError
from recblr_torchrec.training import Trainer
from recblr_torchrec.training.averaging import WeightAverage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SMALL = ["data.max_users=150", "model.recblr.embedding_dim=16", "train.batch_size=64"]
SMALL += ["train.precision=fp32", "train.cuda_graphs=false", "train.ema_decay=0.9"]


def test_the_average_follows_its_recurrence_and_is_swapped_in_and_back():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.5)
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update(step)
        rate = min(0.5, (1 + step) / (10 + step))  # 2/11, 3/12, 4/13: young runs lean on the weights
        expected = [rate * e + (1 - rate) * p.detach() for e, p in zip(expected, model.parameters())]
    for e, a in zip(expected, average.average):
        torch.testing.assert_close(a, e)
    trained = [p.detach().clone() for p in model.parameters()]
    with average.applied():
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p, e)
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))  # exactly, after
    for e, a in zip(expected, average.average):
        torch.testing.assert_close(a, e)
    assert set(average.state_dict()) == {name for name, _ in model.named_parameters()}
    average.load_state_dict(None)  # a checkpoint without an average starts it from the weights
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), average.average))


def test_a_run_validates_keeps_serves_and_resumes_its_weight_average(tmp_path, data_dir):
    cache = [f"data.cache_dir={tmp_path / 'cache'}"]
    straight = Trainer(load_config(TINY, SMALL + cache + ["train.max_epochs=3"]), str(tmp_path / "a"), data_dir)
    straight.fit()
    summary = straight.finish()
    best = straight.state["best_epoch"]
    # the best model's file holds the weights that were validated: re-evaluating it gives that epoch's score
    assert summary["valid"]["NDCG@10"] == pytest.approx(straight.history[best - 1]["valid_NDCG@10"], abs=1e-6)
    last = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=False)
    name = "item_embeddings.embeddings.item.weight"
    assert not torch.equal(last["average"][name], last["model"][name])  # an average, not the weights

    first = Trainer(load_config(TINY, SMALL + cache + ["train.max_epochs=2"]), str(tmp_path / "b"), data_dir)
    first.fit()
    del first  # "crash" after epoch 2
    resumed = Trainer(load_config(TINY, SMALL + cache + ["train.max_epochs=3"]), str(tmp_path / "b"), data_dir)
    resumed.fit()
    assert [r["valid_NDCG@10"] for r in resumed.history] == [r["valid_NDCG@10"] for r in straight.history]
    for mine, theirs in zip(resumed.average.average, straight.average.average):
        assert torch.equal(mine, theirs)


def test_the_weight_average_is_refused_where_it_cannot_be_kept():
    with pytest.raises(ConfigError, match=r"train.ema_decay=1.0 must be in \[0, 1\)"):
        load_config(TINY, ["train.ema_decay=1.0"])
    sharded = types.SimpleNamespace(captures_steps=False, device=torch.device("cpu"), notice="")
    with pytest.raises(ConfigError, match=r"train.ema_decay=0.999 is for one-process runs.*set train.ema_decay=0"):
        ShardedPlacement.check(sharded, load_config(TINY, ["train.ema_decay=0.999"]))
