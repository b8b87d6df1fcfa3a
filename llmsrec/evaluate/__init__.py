"""Evaluation of trained models: full-catalogue ranking (``full_ranking``), the sequence
analyses' building blocks (``analyses``) and report tables (``report``). The metrics
themselves (NDCG@K, HR@K) are the leaf module :mod:`llmsrec.metrics`."""

from llmsrec.evaluate.full_ranking import full_ranking_cfsrec, full_ranking_heads

__all__ = ["full_ranking_cfsrec", "full_ranking_heads"]
