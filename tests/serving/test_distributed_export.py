"""Export of a distributed run: its row-wise sharded table is gathered from the DCP checkpoint."""

import os

import torch
from distributed.spawn import run_on_ranks  # tests/distributed, as pytest names it

from recblr_torchrec.serving import export

from .dist_workers import train_row_wise


def test_export_gathers_the_sharded_table_of_a_distributed_run(tmp_path, data_dir):
    run = tmp_path / "run"
    rank0, rank1 = run_on_ranks(train_row_wise, tmp_path, data_dir, str(tmp_path / "cache"), str(run))
    assert rank0["shards"] == rank1["shards"] == 1  # each rank held a slice of the rows
    manifest = export(str(run), str(tmp_path / "serving"))
    assert manifest["checkpoint"]["kind"] == "distributed"
    assert os.path.dirname(manifest["checkpoint"]["path"]) == str(run / "checkpoints" / "dcp-best")
    scorer = torch.jit.load(str(tmp_path / "serving" / "scorer.pt"))
    assert torch.equal(scorer.item_table, rank0["table"])
    encoder = scorer.encoder.state_dict()
    assert all(torch.equal(encoder[key], value) for key, value in rank0["encoder"].items())
    ids = torch.tensor([[1, 2, 3], [4, 0, 0]])
    scores, items = scorer(ids, torch.tensor([3, 1]), 5)
    assert items.shape == (2, 5) and bool((items > 0).all())
