"""Full-ranking evaluation (RecBole protocol)."""

from .evaluate import evaluate
from .metrics import RankingMetrics, metrics_from_ranks, target_ranks

__all__ = ["RankingMetrics", "evaluate", "metrics_from_ranks", "target_ranks"]
