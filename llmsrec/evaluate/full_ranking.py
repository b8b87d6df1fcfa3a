"""Full-catalogue evaluation: rank the target against every item the user has not interacted with.

Sampled metrics (1 target + 99 negatives) can order models differently from full ranking
(Krichene & Rendle, KDD 2020), so llmsrec reports both. Any model whose score is a dot
product of a user vector and an item vector (SASRec: O_u . E_i; LLM-SRec:
f_user(h_u) . f_item(h_i)) is ranked here in blocks of users, with the history masked.

rank = number of catalogue items (1..N) outside the history and other than the target
whose score is >= the target's (ties count against the model, as in
:func:`llmsrec.metrics.positive_ranks`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from llmsrec.cache import open_cache
from llmsrec.cache.stream import SCORE_BLOCK_ROWS, RowStore
from llmsrec.cfsrec import load_cfsrec, pad_left
from llmsrec.errors import InputError
from llmsrec.heads.model import load_heads
from llmsrec.heads.train import cached_features
from llmsrec.metrics import metrics_from_ranks

__all__ = ["full_ranks", "full_metrics"]


@torch.no_grad()
def full_ranks(users, items, histories: Sequence[np.ndarray], targets, *, block: int = 1024) -> np.ndarray:
    """0-based rank of each user's target among all items not in the user's history.

    Args:
        users: float ``(U, d)`` user vectors (numpy or torch), row r = user r's.
        items: float ``(N+1, d)`` item vectors, row 0 = padding (never ranked).
        histories: U int arrays of item ids excluded for that user (its input sequence);
            the target is kept even if listed.
        targets: int ``(U,)`` target item ids in 1..N.
        block: users scored at once; memory is ``block * (N+1)`` float32 scores.
    Returns:
        int64 ``(U,)`` ranks in ``[0, N-1]``.
    Raises:
        ValueError: shapes disagree, a target outside 1..N, a block < 1, or NaN/inf scores.
    """
    u = torch.as_tensor(np.asarray(users, dtype=np.float32) if not torch.is_tensor(users) else users).float()
    e = torch.as_tensor(np.asarray(items, dtype=np.float32) if not torch.is_tensor(items) else items).float()
    tg = np.asarray(targets, dtype=np.int64)
    n1 = e.shape[0]
    if u.ndim != 2 or e.ndim != 2 or u.shape[1] != e.shape[1]:
        raise ValueError(f"users {tuple(u.shape)} and items {tuple(e.shape)} must be (U, d) and (N+1, d)")
    if len(tg) != u.shape[0] or len(histories) != u.shape[0]:
        raise ValueError("users, histories and targets must have one row per user")
    if len(tg) and (tg.min() < 1 or tg.max() >= n1):
        raise ValueError(f"targets must be item ids in 1..{n1 - 1}")
    if block < 1:
        raise ValueError("block must be >= 1")
    out = np.empty(len(tg), dtype=np.int64)
    for s in range(0, len(tg), block):
        sl = slice(s, min(s + block, len(tg)))
        scores = u[sl] @ e.T  # (b, N+1)
        if not torch.isfinite(scores).all():
            raise ValueError(f"scores hold NaN or inf for users {s}..{sl.stop - 1}")
        b = scores.shape[0]
        rows = np.concatenate([np.full(len(h), k) for k, h in enumerate(histories[sl])] + [np.zeros(0, np.int64)])
        cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories[sl]] + [np.zeros(0, np.int64)])
        t = torch.from_numpy(tg[sl])
        pos = scores[torch.arange(b), t].clone()
        scores[torch.from_numpy(rows).long(), torch.from_numpy(cols).long()] = -torch.inf
        scores[:, 0] = -torch.inf
        scores[torch.arange(b), t] = -torch.inf  # the target does not outrank itself
        out[sl] = (scores >= pos[:, None]).sum(1).numpy()
    return out


def full_metrics(users, items, histories, targets, *, ks=(10, 20), block: int = 1024) -> dict[str, float]:
    """NDCG@K, HR@K (:func:`metrics_from_ranks`) and MRR of :func:`full_ranks`.

    Returns:
        ``{"NDCG@10", "NDCG@20", "HR@10", "HR@20", "MRR"}`` (default ``ks``), means over users.
    """
    return _metrics_with_mrr(full_ranks(users, items, histories, targets, block=block), ks)


def _metrics_with_mrr(ranks: np.ndarray, ks=(10, 20)) -> dict[str, float]:
    m = metrics_from_ranks(ranks, ks)
    m["MRR"] = float(np.mean(1.0 / (ranks + 1.0)))
    return m


def _histories(ds, split: str, n: int) -> tuple[list, np.ndarray]:
    inputs, targets = ds.view(split)
    return [np.asarray(x, dtype=np.int64) for x in inputs[1 : n + 1]], np.asarray(targets[1 : n + 1])


def full_ranking_cfsrec(ds, checkpoint, device: str = "cpu", splits=("valid", "test"), block: int = 1024) -> dict:
    """``llmsrec evaluate --full-ranking`` for a CF-SRec checkpoint: users O_u, items E.

    Args:
        ds: ``PreparedDataset``; checkpoint: a SASRec (or other CF-SRec) checkpoint folder.
    Returns:
        ``{split: {"NDCG@10", "NDCG@20", "HR@10", "HR@20", "MRR"}}`` over all users.
    Raises:
        InputError: an unreadable checkpoint or one for another item count.
    """
    model = load_cfsrec(checkpoint, device=device)
    e = model.item_embeddings().detach().float().cpu()
    if e.shape[0] != ds.n_items + 1:
        raise InputError(f"{checkpoint}: model has {e.shape[0] - 1} items, dataset {ds.root} has {ds.n_items}")
    maxlen = model.config.maxlen
    out = {}
    for split in splits:
        hist, tg = _histories(ds, split, ds.n_users)
        with torch.no_grad():
            reps = torch.cat([model.user_representation(pad_left(hist[s : s + 512], maxlen).to(device)).float().cpu()
                              for s in range(0, len(hist), 512)])
        out[split] = full_metrics(reps, e, hist, tg, block=block)
    return out


def full_ranking_heads(ds, checkpoint, device: str = "cpu", cache=None, splits=("valid", "test"),
                       block: int = 1024, block_rows: int = SCORE_BLOCK_ROWS) -> dict:
    """``llmsrec evaluate --full-ranking`` for LLM-SRec heads: users f_user(h_u), items f_item(h_i).

    Uses the cached states of the ``valid``/``test`` views (``cache`` defaults to the one
    recorded in the heads' ``heads_config.json``); users without a cached prompt
    (``--max-users``) are left out. Heads with the ``out`` user readout read the view's
    states from the file ``block_rows`` users at a time (``llmsrec.cache.stream``, rows
    CRC-checked), so memory does not grow with the users; other readouts load the view.
    Each user's rank depends on its own row only, so both give the same ranks.

    Returns:
        ``{split: {"NDCG@10", "NDCG@20", "HR@10", "HR@20", "MRR"}}``.
    Raises:
        InputError: no cache given or recorded, a cache for another dataset/width, or a
            damaged row (streamed reads).
    """
    if cache is None:
        try:
            cache = json.loads((Path(checkpoint) / "heads_config.json").read_text())["provenance"]["cache"]
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"{checkpoint}: no cache recorded in heads_config.json; pass --cache") from None
    if block_rows < 1:
        raise ValueError("block_rows must be >= 1")
    heads = load_heads(checkpoint)
    streamed = heads.config.user_readout == "out"
    with open_cache(cache) as c:
        prov = c.provenance if isinstance(c.provenance, dict) else {}
        if prov.get("dataset_sha256") not in (None, ds.digest):
            raise InputError(f"{cache}: built for another dataset (provenance field 'dataset_sha256')")
        n = ds.n_users if not isinstance(prov.get("max_users"), int) else min(ds.n_users, prov["max_users"])
        item_h = torch.from_numpy(cached_features(c, "items", heads.config.item_readout))
        user_h = {} if streamed else \
            {s: torch.from_numpy(cached_features(c, s, heads.config.user_readout)[1 : n + 1]) for s in splits}
    if item_h.shape[-1] != heads.config.d_llm:
        raise InputError(f"{checkpoint}: heads expect d_llm={heads.config.d_llm}, cache {cache} has {item_h.shape[-1]}")
    out = {}
    store = RowStore(cache) if streamed else None
    try:
        with torch.no_grad():
            items = heads.item(item_h)
            for split in splits:
                hist, tg = _histories(ds, split, n)
                if not streamed:
                    out[split] = full_metrics(heads.user(user_h[split]), items, hist, tg, block=block)
                    continue
                ranks = np.zeros(n, dtype=np.int64)
                for s, h in store.rows(f"users/{split}/hidden").blocks(1, n + 1, block_rows):
                    sl = slice(s - 1, s - 1 + len(h))
                    ranks[sl] = full_ranks(heads.user(torch.from_numpy(h)), items, hist[sl], tg[sl], block=block)
                out[split] = _metrics_with_mrr(ranks)
    finally:
        if store is not None:
            store.close()
    return out
