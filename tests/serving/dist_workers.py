"""Run on each of 2 gloo ranks by test_distributed_export.py (module level, so spawn can pickle it)."""

import os
from typing import Any, Dict

import torch

from recblr_torchrec.config import load_config
from recblr_torchrec.distributed.env import DistEnv

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["data.max_users=40", "data.max_len=12", "model.recblr.embedding_dim=8", "model.recblr.num_layers=1"]
SMALL += ["train.max_epochs=1"]
SMALL += ["train.batch_size=16", "eval.batch_size=20", "train.num_workers=0", "distributed.timeout_s=60"]
SMALL += ["distributed.sharding_types={item: row_wise}", "distributed.sparse_optimizer=rowwise_adagrad"]
SMALL += ["distributed.sparse_lr=0.001"]


def train_row_wise(rank: int, world: int, data_dir: str, cache: str, out: str) -> Dict[str, Any]:
    """Saves the checkpoints of a run whose item table is row-wise sharded (no training: the gather is
    what is tested); rank 0 returns the whole table and the encoder."""
    from recblr_torchrec.distributed.placement import ShardedPlacement
    from recblr_torchrec.training import Trainer

    env = DistEnv(rank, world, rank, world, torch.device("cpu"), "gloo")
    config = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), SMALL + [f"data.cache_dir={cache}"])
    trainer = Trainer(config, out, data_dir, ShardedPlacement(env, config))
    trainer.save_checkpoint(improved=True)  # what fit() writes after an improving epoch: dcp/ and dcp-best/
    weight = trainer.module.state_dict()["model.item_embeddings.embeddings.item.weight"]
    full = torch.empty(weight.size()) if rank == 0 else None
    weight.gather(dst=0, out=full)
    encoder = {k: v.detach().clone() for k, v in trainer.model.encoder.state_dict().items()}
    return {"table": full, "encoder": encoder, "shards": len(weight.local_shards())}
