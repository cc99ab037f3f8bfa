"""RecBLREncoder inside someone else's TorchRec model, trained one step, then scripted for inference.

The user's model owns its EmbeddingCollection (feature ``clicks``, table ``catalog``) and a head;
RecBLREncoder sits between them on the jagged values and offsets the collection returns, as any
TorchRec sequence module would. Inference follows TorchRec's route: ``torchrec.fx.symbolic_trace``
(with the encoder as a leaf: its loops depend on the data, so fx keeps it as one call), then
``torch.jit.script`` of the traced module. TorchRec's further inference steps (quantising the
tables with ``quantize_inference_model``, sharding them with ``shard_quant_model``) change the
table's dtype or placement, not the encoder, and are left to the user's pipeline.

    python examples/torchrec_encoder.py

The scripted module holds TorchRec's jagged ops: a process that loads it needs ``import fbgemm_gpu``.
"""

from typing import Dict

import torch
import torch.nn.functional as F
import torchrec.fx
from torch import Tensor, nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recblr_torchrec.modules import RecBLRConfig, RecBLREncoder

FEATURE = "clicks"


class ClickSequenceModel(nn.Module):
    """A user's own model: EmbeddingCollection -> RecBLREncoder -> a projection head.

    forward(features: KJT with key ``clicks``, one non-empty sequence per user) -> user vectors [B, d].
    """

    def __init__(self, num_items: int, embedding_dim: int = 16):
        super().__init__()
        self.embeddings = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name="catalog", embedding_dim=embedding_dim, num_embeddings=num_items + 1, feature_names=[FEATURE]
                )
            ]
        )
        self.encoder = RecBLREncoder(RecBLRConfig(embedding_dim=embedding_dim, num_layers=1, dropout=0.0))
        self.head = nn.Linear(embedding_dim, embedding_dim)

    def forward(self, features: KeyedJaggedTensor) -> Tensor:
        clicks = self.embeddings(features)[FEATURE]
        offsets = clicks.offsets()
        hidden = self.encoder(clicks.values(), offsets=offsets)
        return self.head(hidden[offsets[1:] - 1])  # each user's last position

    def item_table(self) -> Tensor:
        return self.embeddings.embeddings["catalog"].weight


def click_batch(sequences) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        keys=[FEATURE],
        values=torch.tensor([i for s in sequences for i in s], dtype=torch.long),
        lengths=torch.tensor([len(s) for s in sequences], dtype=torch.long),
    )


def train_step(model: ClickSequenceModel, features: KeyedJaggedTensor, targets: Tensor, lr: float = 1e-2) -> float:
    """One Adam step of softmax cross-entropy over the whole table (padding row 0 excluded)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    logits = model(features) @ model.item_table()[1:].t()
    loss = F.cross_entropy(logits, targets - 1)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def script_for_inference(model: nn.Module) -> torch.jit.ScriptModule:
    """TorchRec's inference route: fx-trace with the encoder as a leaf module, then script."""
    traced = torchrec.fx.symbolic_trace(model.eval(), leaf_modules=[RecBLREncoder.__name__])
    return torch.jit.script(traced)


def main(num_items: int = 30, seed: int = 0) -> Dict[str, object]:
    torch.manual_seed(seed)
    model = ClickSequenceModel(num_items)
    features = click_batch([[3, 7, 1], [12], [5, 9, 30, 2, 8]])
    loss = train_step(model, features, targets=torch.tensor([4, 11, 6]))
    scripted = script_for_inference(model)
    with torch.no_grad():
        eager, served = model(features), scripted(features)
    print(
        f"trained one step (loss {loss:.4f}); scripted == eager: max |diff| {float((eager - served).abs().max()):.2e}"
    )
    return {"model": model, "scripted": scripted, "features": features, "loss": loss, "eager": eager, "served": served}


if __name__ == "__main__":
    main()
