"""Evaluation: numba NDCG@K / HR@K (``metrics``), report tables (``report``)."""

from llmsrec.evaluate.metrics import metrics_from_ranks, positive_ranks, ranking_metrics

__all__ = ["ranking_metrics", "positive_ranks", "metrics_from_ranks"]
