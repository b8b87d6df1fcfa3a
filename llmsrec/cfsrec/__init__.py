"""CF-SRec teachers: SASRec (model, trainer, checkpoint I/O, evaluation)."""

from llmsrec.cfsrec.sasrec import SASRec, SASRecConfig, pad_left
from llmsrec.cfsrec.train import (
    evaluate_sasrec,
    evaluate_split,
    load_sasrec,
    save_sasrec,
    train_sasrec,
)

__all__ = [
    "SASRec",
    "SASRecConfig",
    "pad_left",
    "train_sasrec",
    "save_sasrec",
    "load_sasrec",
    "evaluate_sasrec",
    "evaluate_split",
]
