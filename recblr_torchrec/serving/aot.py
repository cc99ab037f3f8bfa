"""The scorer through torch.export and AOTInductor, the route current torch recommends over TorchScript.

The exported program is the same :class:`RecBLRScorer` math; the encoder's scan is captured as
torch's scan operator, so the history length T stays dynamic (any T >= 2). k (top-k's width) is
fixed at export: compile the largest k served and slice. The number of users is dynamic up to
the ``batch`` given at export: AOTInductor's lowering of the scan operator cannot size its output
when the scan's batch is symbolic (``InductorError: KeyError: s..`` in
``decompose_scan_to_while_loop``, torch 2.13), so the scan always runs on ``batch`` rows, the
rows past the last user being zero-length histories answered apart and cut off. Fewer users (none
included) get exactly their rows; more users are refused (an assertion naming the limit).

Checked inside the package with ``torch._assert_async`` (an error naming the problem; on a GPU a
device-side assertion, which ends the process's CUDA context): more users than ``batch``, item
ids outside the catalog, non-zero ids after a history's length, lengths outside [0, T]. item_ids
and lengths of different row counts, int32 ids and T < 2 are checked by AOTInductor's own input
guards when the serving process sets ``AOTI_RUNTIME_CHECK_INPUTS=1``; set it.
"""

from typing import Tuple

import torch
from torch import Tensor, nn

from .artifacts import RecBLRScorer


class ExportableScorer(nn.Module):
    """forward(item_ids [B, T] int64, lengths [B] int64) -> (scores [B, k], items [B, k]) for a fixed
    k and any B <= ``batch``."""

    def __init__(self, scorer: RecBLRScorer, k: int, batch: int):
        super().__init__()
        if batch < 1:
            raise ValueError(f"batch={batch} must be >= 1")
        self.batch = batch
        if not 1 <= k <= scorer.num_embeddings - 1:
            raise ValueError(f"k={k} must be in [1, {scorer.num_embeddings - 1}] (the catalog's items)")
        self.scorer = scorer
        self.k = k

    def forward(self, item_ids: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        users, steps, num_embeddings = item_ids.shape[0], item_ids.shape[1], self.scorer.num_embeddings
        torch._assert_async(
            (torch.arange(users, device=lengths.device) < self.batch).all(),
            f"the scorer was compiled for at most {self.batch} users a call; split the batch",
        )
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
        # The scan runs on exactly ``batch`` rows, the shape AOTInductor can lower: row r is user r,
        # or, past the last user, a zero-length history (the zero row appended) answered apart.
        rows = torch.arange(self.batch, device=item_ids.device)
        source = torch.where(rows < users, rows, users)
        padded_ids = torch.cat([item_ids, item_ids.new_zeros(1, steps)])[source]
        padded_lengths = torch.cat([lengths, lengths.new_zeros(1)])[source]
        vectors, _ = self.scorer.encode_unchecked(padded_ids, padded_lengths)
        scores, items = self.scorer.rank(vectors, padded_lengths, self.k)
        keep = torch.arange(users, device=item_ids.device).clamp(max=self.batch - 1)  # in bounds even past the assert
        return scores[keep], items[keep]


def export_scorer(scorer: RecBLRScorer, k: int, batch: int, max_steps: int = 1 << 20):
    """torch.export of the scorer for up to ``batch`` users and any history length T in [2, max_steps]."""
    module = ExportableScorer(scorer, k, batch).eval()
    example = max(batch, 2)  # an example of 0 or 1 rows would fix the number of users
    item_ids = torch.zeros(example, 3, dtype=torch.long, device=scorer.item_table.device)
    item_ids[:, 0] = 1
    lengths = torch.ones(example, dtype=torch.long, device=item_ids.device)
    steps = torch.export.Dim("steps", min=2, max=max_steps)
    users = torch.export.Dim("users", min=0, max=1 << 30)
    shapes = {"item_ids": {0: users, 1: steps}, "lengths": {0: users}}
    with torch.no_grad():
        return torch.export.export(module, (item_ids, lengths), dynamic_shapes=shapes, strict=False)


def compile_scorer(scorer: RecBLRScorer, k: int, batch: int, package_path: str) -> str:
    """Exports the scorer and compiles it with AOTInductor into ``package_path`` (.pt2); returns the path.

    Load it with ``torch._inductor.aoti_load_package(path)``: only torch is needed.
    """
    program = export_scorer(scorer, k, batch)
    try:
        # the checks of AOTI_RUNTIME_CHECK_INPUTS=1 would refuse 0 or 1 users (a dynamic size's default lower bound)
        configs = {"aot_inductor.check_lowerbound": False} if _has_check_lowerbound() else {}
        return torch._inductor.aoti_compile_and_package(program, package_path=package_path, inductor_configs=configs)
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


def _has_check_lowerbound() -> bool:
    from torch._inductor import config

    return hasattr(config.aot_inductor, "check_lowerbound")
