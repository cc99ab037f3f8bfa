"""``ids.pt``: the data file's item ids in and out of ``scorer.pt`` and ``step.pt``.

The artifacts work in the model's dense ids (1..V-1, 0 padding); this scripted module holds the
map (``item_ids.tsv`` of the run) and needs only ``import torch``::

    ids, scorer = torch.jit.load("ids.pt"), torch.jit.load("scorer.pt")
    scores, items = scorer(*ids.histories([["1193", "661", "914"]]), 10)
    ids.names(items)                        # [["2355", ...]]: file item ids
    state, scores, items = step(state, ids.events(["3408"]), 10)

An id the model does not know raises a ValueError naming it and its place.
"""

from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn


class ItemIds(nn.Module):
    """File item ids <-> dense ids. ``item_ids[d]`` is the file's id of dense id d (``[0]`` is ``""``)."""

    def __init__(self, item_ids: List[str]):
        super().__init__()
        if len(item_ids) < 2 or item_ids[0] != "":
            raise ValueError("item_ids must list '' (padding) then the file id of each dense id 1, 2, ...")
        self.item_ids: List[str] = list(item_ids)
        self.index: Dict[str, int] = {name: dense for dense, name in enumerate(item_ids) if dense > 0}
        if len(self.index) != len(item_ids) - 1:
            raise ValueError("item_ids holds an id twice: a map from file ids to dense ids must be one to one")

    def dense(self, name: str, where: str) -> int:
        if name not in self.index:
            raise ValueError(
                f"item id '{name}' ({where}) is not in this model's catalog of {len(self.item_ids) - 1} items "
                "(the data file's ids that remained after filtering; see item_ids.tsv)"
            )
        return self.index[name]

    @torch.jit.export
    def histories(self, histories: List[List[str]]) -> Tuple[Tensor, Tensor]:
        """Histories in file ids, oldest first -> (item_ids [B, T] right-padded with 0, lengths [B]) for scorer.pt."""
        steps = 1
        for history in histories:
            steps = max(steps, len(history))
        flat: List[int] = [0] * (len(histories) * steps)
        lengths: List[int] = []
        for row, history in enumerate(histories):
            for position, name in enumerate(history):
                flat[row * steps + position] = self.dense(name, f"history {row}, position {position}")
            lengths.append(len(history))
        ids = torch.tensor(flat, dtype=torch.long).view(len(histories), steps)
        return ids, torch.tensor(lengths, dtype=torch.long)

    @torch.jit.export
    def events(self, items: List[str]) -> Tensor:
        """One new event per user, in file ids -> new_items [B] for step.pt."""
        dense: List[int] = []
        for row, name in enumerate(items):
            dense.append(self.dense(name, f"event {row}"))
        return torch.tensor(dense, dtype=torch.long)

    @torch.jit.export
    def names(self, items: Tensor) -> List[List[str]]:
        """Dense ids [B, k] (what the artifacts return) -> file item ids."""
        dense_rows: List[List[int]] = items.long().tolist()
        rows: List[List[str]] = []
        for row in dense_rows:
            rows.append([self.item_ids[dense] for dense in row])
        return rows

    def forward(self, histories: List[List[str]]) -> Tuple[Tensor, Tensor]:
        return self.histories(histories)
