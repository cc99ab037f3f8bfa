"""The scorer through torch.export and AOTInductor, the route current torch recommends over TorchScript.

The exported program is the same :class:`RecBLRScorer` math; the encoder's scan is captured as
torch's scan operator, so the history length T stays dynamic (any T >= 2). Two shapes are fixed
at export: k (top-k's width; compile the largest k served and slice) and the batch B, because
AOTInductor's lowering of the scan operator cannot size its output when B is symbolic
(``InductorError: KeyError: s..`` in ``decompose_scan_to_while_loop``, torch 2.13). Serve fewer
users by padding the batch with zero-length rows, which the scorer answers exactly and apart.

Checked inside the package with ``torch._assert_async`` (an error naming the problem): item ids
outside the catalog, non-zero ids after a history's length, lengths outside [0, T]. Shapes and
dtypes (a batch other than the compiled one, item_ids and lengths that disagree, int32 ids, T < 2)
are checked by AOTInductor's own input guards only when the serving process sets
``AOTI_RUNTIME_CHECK_INPUTS=1``; without it a wrong shape is not detected, so set it.
"""

from typing import Tuple

import torch
from torch import Tensor, nn

from .artifacts import RecBLRScorer


class ExportableScorer(nn.Module):
    """forward(item_ids [B, T] int64, lengths [B] int64) -> (scores [B, k], items [B, k]) for a fixed k."""

    def __init__(self, scorer: RecBLRScorer, k: int):
        super().__init__()
        if not 1 <= k <= scorer.num_embeddings - 1:
            raise ValueError(f"k={k} must be in [1, {scorer.num_embeddings - 1}] (the catalog's items)")
        self.scorer = scorer
        self.k = k

    def forward(self, item_ids: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        steps, num_embeddings = item_ids.shape[1], self.scorer.num_embeddings
        real = torch.arange(steps, device=item_ids.device).unsqueeze(0) < lengths.unsqueeze(1)
        in_catalog = (item_ids >= 1) & (item_ids < num_embeddings)
        torch._assert_async(
            ((lengths >= 0) & (lengths <= steps)).all(), "lengths must be in [0, T] (T = item_ids.shape[1])"
        )
        torch._assert_async(
            torch.where(real, in_catalog, item_ids == 0).all(),
            f"item_ids must be catalog items in [1, {num_embeddings - 1}] before each history's length "
            "and 0 (padding) after it",
        )
        vectors, _ = self.scorer.encode_unchecked(item_ids, lengths)
        return self.scorer.rank(vectors, lengths, self.k)


def export_scorer(scorer: RecBLRScorer, k: int, batch: int, max_steps: int = 1 << 20):
    """torch.export of the scorer for ``batch`` users and any history length T in [2, max_steps]."""
    module = ExportableScorer(scorer, k).eval()
    item_ids = torch.zeros(batch, 3, dtype=torch.long, device=scorer.item_table.device)
    item_ids[:, 0] = 1
    lengths = torch.ones(batch, dtype=torch.long, device=item_ids.device)
    steps = torch.export.Dim("steps", min=2, max=max_steps)
    with torch.no_grad():
        return torch.export.export(
            module, (item_ids, lengths), dynamic_shapes={"item_ids": {1: steps}, "lengths": {}}, strict=False
        )


def compile_scorer(scorer: RecBLRScorer, k: int, batch: int, package_path: str) -> str:
    """Exports the scorer and compiles it with AOTInductor into ``package_path`` (.pt2); returns the path.

    Load it with ``torch._inductor.aoti_load_package(path)``: only torch is needed.
    """
    program = export_scorer(scorer, k, batch)
    try:
        return torch._inductor.aoti_compile_and_package(program, package_path=package_path)
    except Exception as error:  # Inductor raises its own types, which differ between versions
        hint = (
            "its lowering of the scan loop works with torch 2.13 (measured; torch 2.11 fails in "
            "codegen_while_loop): upgrade torch, or "
            if torch.__version__ < (2, 13)  # a TorchVersion: compares with tuples
            else "check the C++ compiler AOTInductor calls, or "
        )
        raise RuntimeError(
            f"AOTInductor could not compile the exported scorer with torch {torch.__version__} "
            f"({type(error).__name__}: {str(error).strip()[:300]}); {hint}serve scorer.pt and step.pt "
            "(TorchScript, already written) and leave out --aoti-batch"
        ) from error
