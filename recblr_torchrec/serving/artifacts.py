"""The two serving modules, written to be compiled with ``torch.jit.script``.

Both hold the trained encoder itself (PyTorch scan backend, eval mode) and the item table as a
plain float32 buffer [V, d] (with cosine scores also its unit-length rows, ``score_table``), so a
scripted file needs only ``import torch`` to load: no TorchRec op is inside. Every input is
checked inside the artifact; a bad value raises an error naming it.

State layout (one row of ``state_size`` float32 per user; :class:`RecBLREncoder` defines it):
for each layer l in order, the causal-conv tail (the last k-1 conv inputs x, [k-1, D] row-major,
oldest first) then the recurrent state h [D]; layer l starts at column l * k * D. The empty
history's state is all zeros.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules.recblr import RecBLREncoder
from ..modules.recommender import scoring_items, scoring_users


class CatalogModule(nn.Module):
    """What both artifacts share: the encoder, the item table, top-k over the catalog, input checks.

    Args:
        encoder: the trained encoder, already in eval mode with the PyTorch scan backend.
        item_table: [V, d] float32 rows of the item table, row 0 the padding id.
        score_temperature: the trained model's temperature (``SequenceRecommender.temperature``,
            the learned one for ``model.learn_temperature``): 0 for dot-product scores, t > 0 for
            cosine scores over t.
    """

    def __init__(self, encoder: RecBLREncoder, item_table: Tensor, score_temperature: float = 0.0):
        super().__init__()
        if item_table.dim() != 2 or item_table.shape[1] != encoder.embedding_dim or item_table.shape[0] < 2:
            raise ValueError(f"item_table must be [V >= 2, d={encoder.embedding_dim}], got {tuple(item_table.shape)}")
        self.encoder = encoder
        table = item_table.detach().float().contiguous()
        self.register_buffer("item_table", table)
        self.score_temperature = float(score_temperature)
        # the rows the scores read: the table itself, or its unit-length rows (cosine scores)
        self.register_buffer("score_table", scoring_items(table, self.score_temperature))
        self.num_embeddings = int(item_table.shape[0])
        self.state_columns = encoder.state_size()

    @torch.jit.export
    def top_k(self, user_vectors: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """user_vectors [B, d] -> (scores [B, k] descending, item ids [B, k] in 1..V-1); padding never returned."""
        if k < 1 or k > self.num_embeddings - 1:
            raise ValueError(f"k={k} must be in [1, {self.num_embeddings - 1}] (the catalog's items)")
        scores = scoring_users(user_vectors, self.score_temperature) @ self.score_table[1:].t()
        top_scores, index = torch.topk(scores, k, dim=1)
        return top_scores, index + 1

    def check_same_batch(self, first_name: str, first: Tensor, second_name: str, second: Tensor) -> None:
        if first.shape[0] != second.shape[0]:
            raise ValueError(
                f"batch sizes disagree: {first_name} has {first.shape[0]} rows but {second_name} has {second.shape[0]}"
            )

    def check_item_ids(self, ids: Tensor, real: Tensor, name: str) -> None:
        """Ids where ``real`` is true must be catalog items 1..V-1; elsewhere they must be 0 (padding)."""
        if ids.dtype != torch.int64 and ids.dtype != torch.int32:
            raise ValueError(f"{name} must hold integer item ids (int64), got dtype {ids.dtype}")
        in_catalog = (ids >= 1) & (ids < self.num_embeddings)
        bad = torch.where(real, ~in_catalog, ids != 0).reshape(-1).nonzero()
        if bad.shape[0] > 0:
            flat = int(bad[0, 0])
            value = int(ids.reshape(-1)[flat])
            where = f"{name}[{flat}]"
            if ids.dim() == 2:
                where = f"{name}[{flat // ids.shape[1]}, {flat % ids.shape[1]}]"
            if bool(real.reshape(-1)[flat]):
                raise ValueError(
                    f"item id {value} at {where} is not a catalog item: ids must be in [1, {self.num_embeddings - 1}]"
                    " (0 is padding, allowed only after the history's length)"
                )
            raise ValueError(
                f"item id {value} at {where} lies after the history's length: right-pad with 0, or fix lengths"
            )


class RecBLRScorer(CatalogModule):
    """Scores whole histories: item ids [B, T] (right-padded with 0) + lengths [B] -> top-k next items.

    A zero-length history is legal: its state is the empty state (what ``initial_state`` of the
    step artifact returns), its user vector is zero, and its top-k is scores 0.0 for items 1..k.
    """

    def forward(self, item_ids: Tensor, lengths: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """-> (scores [B, k] float32 descending, items [B, k] int64) over the whole catalog."""
        return self.rank(self.user_vector(item_ids, lengths), lengths, k)

    def rank(self, vectors: Tensor, lengths: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """Top-k of the user vectors; zero-length histories get scores 0.0 for items 1..k."""
        scores, items = self.top_k(vectors, k)
        empty = (lengths == 0).unsqueeze(1)
        first_items = torch.arange(1, k + 1, device=items.device).expand(items.shape[0], k)
        return scores.masked_fill(empty, 0.0), torch.where(empty, first_items, items)

    @torch.jit.export
    def encode(self, item_ids: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """-> (user vectors [B, d] at each history's last event, states [B, state_size])."""
        self.check_history(item_ids, lengths)
        return self.encode_unchecked(item_ids.long(), lengths.long())

    def encode_unchecked(self, item_ids: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        hidden, state = self.encoder.forward_with_state(F.embedding(item_ids, self.item_table), lengths)
        last = (lengths - 1).clamp(min=0)  # a zero-length row reads position 0, which is masked to zero
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last], state

    @torch.jit.export
    def user_vector(self, item_ids: Tensor, lengths: Tensor) -> Tensor:
        return self.encode(item_ids, lengths)[0]

    @torch.jit.export
    def user_state(self, item_ids: Tensor, lengths: Tensor) -> Tensor:
        """The per-user recurrent state after each history [B, state_size] float32, for the step artifact."""
        return self.encode(item_ids, lengths)[1]

    def check_history(self, item_ids: Tensor, lengths: Tensor) -> None:
        if item_ids.dim() != 2 or item_ids.shape[1] < 1:
            raise ValueError(f"item_ids must be [B, T >= 1] right-padded with 0, got shape {list(item_ids.shape)}")
        if lengths.dim() != 1:
            raise ValueError(f"lengths must be [B], got shape {list(lengths.shape)}")
        self.check_same_batch("item_ids", item_ids, "lengths", lengths)
        if lengths.dtype != torch.int64 and lengths.dtype != torch.int32:
            raise ValueError(f"lengths must be integers (int64), got dtype {lengths.dtype}")
        steps = item_ids.shape[1]
        bad = ((lengths < 0) | (lengths > steps)).nonzero()
        if bad.shape[0] > 0:
            row = int(bad[0, 0])
            raise ValueError(f"lengths[{row}] = {int(lengths[row])} is outside [0, T={steps}]")
        real = torch.arange(steps, device=item_ids.device).unsqueeze(0) < lengths.unsqueeze(1)
        self.check_item_ids(item_ids, real, "item_ids")


class RecBLRStep(CatalogModule):
    """Advances each user's state by one new event, at a cost independent of the history's length."""

    def forward(self, state: Tensor, new_items: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor]:
        """state [B, state_size] float32, new_items [B] -> (new state, scores [B, k], items [B, k])."""
        new_state, vectors = self.advance(state, new_items)
        scores, items = self.top_k(vectors, k)
        return new_state, scores, items

    @torch.jit.export
    def advance(self, state: Tensor, new_items: Tensor) -> Tuple[Tensor, Tensor]:
        """-> (new state [B, state_size], user vectors [B, d] after the new event)."""
        self.check_step(state, new_items)
        hidden, new_state = self.encoder.step(F.embedding(new_items.long(), self.item_table), state)
        return new_state, hidden

    @torch.jit.export
    def initial_state(self, batch: int) -> Tensor:
        """The empty history's state: zeros [batch, state_size] float32."""
        if batch < 0:
            raise ValueError(f"batch={batch} must be >= 0")
        return torch.zeros(batch, self.state_columns, dtype=torch.float32, device=self.item_table.device)

    def check_step(self, state: Tensor, new_items: Tensor) -> None:
        if state.dim() != 2 or state.shape[1] != self.state_columns:
            raise ValueError(
                f"state must be [B, {self.state_columns}] (per layer: conv tail then recurrent state; see "
                f"manifest.json), got shape {list(state.shape)}"
            )
        if state.dtype != torch.float32:
            raise ValueError(f"state must be float32, got dtype {state.dtype}")
        if new_items.dim() != 1:
            raise ValueError(f"new_items must be [B] (one event per user), got shape {list(new_items.shape)}")
        self.check_same_batch("state", state, "new_items", new_items)
        if not bool(torch.isfinite(state).all()):
            raise ValueError("state holds NaN or infinite values; start the user again from initial_state")
        self.check_item_ids(new_items, torch.ones_like(new_items, dtype=torch.bool), "new_items")
