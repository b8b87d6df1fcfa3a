"""A trained CF-SRec as the frozen teacher of LLM-SRec: load it with a digest of its weights
and compute its user representations O_u (paper Sec. 3.1) for many input sequences."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from llmsrec.atomic import digest_arrays, sha256_file
from llmsrec.cfsrec.sasrec import pad_left
from llmsrec.cfsrec.train import load_cfsrec


def load_teacher(sasrec):
    """(model in eval mode, digest) from a checkpoint folder or a module.

    Any CF-SRec of ``llmsrec.cfsrec.MODELS`` can be the teacher (SASRec in the paper):
    precompute only needs O_u (``user_representation``) and E (``item_embeddings``).
    """
    if isinstance(sasrec, (str, os.PathLike)):
        model = load_cfsrec(sasrec)
        return model, sha256_file(Path(sasrec) / "model.safetensors")
    model = sasrec.eval()
    state = model.state_dict()
    return model, digest_arrays(*(state[k].detach().cpu().numpy() for k in sorted(state)))


def teacher_user_reps(model, inputs: list, rows: list[int], batch: int = 512) -> np.ndarray:
    """Teacher O_u (float32 ``(len(rows), d)``) for ``inputs[r]``; empty inputs -> zeros."""
    d = model.item_embeddings().shape[1]
    out = np.zeros((len(rows), d), dtype=np.float32)
    keep = [k for k, r in enumerate(rows) if len(inputs[r])]
    dev = model.item_embeddings().device
    with torch.inference_mode():
        for s in range(0, len(keep), batch):
            ks = keep[s : s + batch]
            seqs = pad_left([inputs[rows[k]] for k in ks], model.config.maxlen).to(dev)
            out[ks] = model.user_representation(seqs).float().cpu().numpy()
    return out
