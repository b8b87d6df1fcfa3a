"""CF-SRec models (SASRec, GRU4Rec, BERT4Rec, NextItNet): models, one trainer, checkpoint I/O, evaluation."""

from llmsrec.cfsrec.bert4rec import BERT4Rec, BERT4RecConfig
from llmsrec.cfsrec.gru4rec import GRU4Rec, GRU4RecConfig
from llmsrec.cfsrec.nextitnet import NextItNet, NextItNetConfig
from llmsrec.cfsrec.sasrec import SASRec, SASRecConfig, pad_left
from llmsrec.cfsrec.teacher import load_teacher, teacher_user_reps
from llmsrec.cfsrec.train import (
    MODELS,
    evaluate_cfsrec,
    evaluate_sasrec,
    evaluate_split,
    load_cfsrec,
    load_sasrec,
    save_cfsrec,
    save_sasrec,
    train_cfsrec,
    train_sasrec,
)

__all__ = [
    "SASRec",
    "SASRecConfig",
    "GRU4Rec",
    "GRU4RecConfig",
    "BERT4Rec",
    "BERT4RecConfig",
    "NextItNet",
    "NextItNetConfig",
    "MODELS",
    "pad_left",
    "train_cfsrec",
    "save_cfsrec",
    "load_cfsrec",
    "evaluate_cfsrec",
    "train_sasrec",
    "save_sasrec",
    "load_sasrec",
    "evaluate_sasrec",
    "evaluate_split",
    "load_teacher",
    "teacher_user_reps",
]
