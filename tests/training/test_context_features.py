"""Pooled context features (EmbeddingBagCollection) joined to the encoder, in local mode."""

import os

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recblr_torchrec.config import load_config
from recblr_torchrec.data.features import user_bucket_features
from recblr_torchrec.modules import ContextConfig, ModelConfig, RecBLRConfig, SequenceRecommender
from recblr_torchrec.training import Trainer

CONFIG = ModelConfig(recblr=RecBLRConfig(embedding_dim=8, num_layers=1, dropout=0.0))


def histories():
    items = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    lengths = torch.tensor([2, 4, 1])
    padded = torch.zeros(3, 4, dtype=torch.long)
    start = 0
    for row, length in enumerate(lengths.tolist()):
        padded[row, :length] = items[start : start + length]
        start += length
    return KeyedJaggedTensor(keys=["item_history"], values=items, lengths=lengths), padded, lengths


@pytest.mark.parametrize("join", ["input", "output"])
def test_context_joins_the_jagged_and_the_padded_paths_alike(join):
    torch.manual_seed(0)
    model = SequenceRecommender(11, CONFIG, context=ContextConfig(user_buckets=5, join=join)).eval()
    kjt, padded, lengths = histories()
    context = user_bucket_features(np.array([0, 7, 2]), 5)
    jagged = model(kjt, context)
    dense = model.encode(padded, lengths, context)
    mask = torch.arange(4)[None, :] < lengths[:, None]
    torch.testing.assert_close(dense[mask], jagged, rtol=1e-5, atol=1e-6)
    plain = SequenceRecommender(11, CONFIG).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    assert not torch.allclose(plain(kjt), jagged)  # the context changes the user vectors
    with pytest.raises(ValueError, match="pass the batch's context"):
        model(kjt)


def test_context_table_learns_in_local_training(tmp_path, data_dir):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    overrides = ["data.max_users=60", "model.recblr.embedding_dim=16", "train.batch_size=32"]
    overrides += ["model.recblr.num_layers=1"]
    overrides += [f"data.cache_dir={tmp_path / 'cache'}", "context.user_buckets=17", "context.join=output"]
    trainer = Trainer(load_config(os.path.join(root, "configs", "tiny.yaml"), overrides), str(tmp_path), data_dir)
    table = trainer.model.context_embeddings.embedding_bags["context_user"].weight
    before = table.detach().clone()
    trainer.train_batches.set_epoch(1)
    batch = trainer.train_batches[0]
    assert batch.context is not None and batch.context.values().max() < 17
    trainer.train_step(batch)
    assert not torch.equal(before, table.detach())
    assert set(trainer.evaluate("valid")) >= {"HR@10", "NDCG@10"}
