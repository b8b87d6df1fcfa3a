"""LLM-SRec heads (f_user, f_item, f_CF-user), losses (Eq. 1-4, 10) and the trainer on cached tensors."""

from llmsrec.heads.losses import (
    LossConfig,
    distill_contrastive_loss,
    distill_mse_loss,
    full_retrieval_loss,
    retrieval_loss,
    sample_negatives,
    total_loss,
    uniformity_loss,
)
from llmsrec.heads.model import HeadsConfig, LLMSRecHeads, fixed_item_projection, load_heads, save_heads
from llmsrec.heads.train import (
    CachedTensors,
    TrainConfig,
    evaluate_heads,
    evaluate_on_tensors,
    fit_heads,
    load_cached_tensors,
    train_heads,
    train_on_tensors,
)

__all__ = [
    "CachedTensors",
    "HeadsConfig",
    "LLMSRecHeads",
    "LossConfig",
    "TrainConfig",
    "distill_contrastive_loss",
    "distill_mse_loss",
    "evaluate_heads",
    "evaluate_on_tensors",
    "fit_heads",
    "fixed_item_projection",
    "full_retrieval_loss",
    "load_cached_tensors",
    "load_heads",
    "retrieval_loss",
    "sample_negatives",
    "save_heads",
    "total_loss",
    "train_heads",
    "train_on_tensors",
    "uniformity_loss",
]
