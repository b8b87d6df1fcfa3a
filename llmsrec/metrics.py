"""NDCG@K and HR@K for the sampled-candidates protocol (1 positive + m negatives per user).

A leaf module: no project imports, so every trainer can use it for validation.

Protocol (paper Sec. 4.1, "Evaluation"):
each user u has a row of candidate scores, the positive (held-out target) in column 0 and
the stored negatives in columns 1..m. The rank of the positive is the number of *other*
candidates whose score is >= the positive's score (ties count against the model, so a
constant scorer ranks every positive last). Then

    HR@K   = mean_u [rank_u < K]
    NDCG@K = mean_u [rank_u < K] / log2(rank_u + 2)

(with a single relevant item the ideal DCG is 1, so NDCG equals DCG).

The rank kernel is numba-jitted, parallel over users (``prange``), and cached on disk
(``cache=True``), so only the first call in a fresh environment pays the compile.
"""

from __future__ import annotations

import sys
from typing import Iterable

import numpy as np
from numba import njit, prange

__all__ = ["ranking_metrics", "positive_ranks", "metrics_from_ranks"]


@njit(parallel=True, cache=True)
def _ranks_kernel(scores):  # pragma: no cover - compiled
    n_users, n_cand = scores.shape
    out = np.empty(n_users, dtype=np.int64)
    for u in prange(n_users):
        pos = scores[u, 0]
        bad = not np.isfinite(pos)
        r = 0
        for j in range(1, n_cand):
            s = scores[u, j]
            if not np.isfinite(s):
                bad = True
            if s >= pos:
                r += 1
        # -1 marks a row holding NaN or +-inf; the Python wrapper turns it into an error.
        out[u] = -1 if bad else r
    return out


def _as_scores(scores) -> np.ndarray:
    arr = np.asarray(scores)
    if arr.ndim != 2:
        raise ValueError(f"scores must be a 2-D (users, candidates) array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"scores must have at least one user and one candidate, got shape {arr.shape}")
    if arr.dtype == np.float32 or arr.dtype == np.float64:
        pass
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)  # float16 and friends
    elif np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        arr = arr.astype(np.float64)
    else:
        raise ValueError(f"scores must be a real-valued array, got dtype {arr.dtype}")
    # One compiled specialisation per dtype, C-contiguous layout only.
    return np.ascontiguousarray(arr)


def positive_ranks(scores) -> np.ndarray:
    """0-based rank of the positive (column 0) among each user's candidates.

    Args:
        scores: float array ``(U, C)`` (float32 or float64; other real dtypes are cast),
            row u = the scores of user u's candidates, column 0 = the positive.

    Returns:
        int64 array ``(U,)``: the number of candidates in columns 1..C-1 whose score is
        >= the positive's score (pessimistic ties), in ``[0, C-1]``.

    Raises:
        ValueError: ``scores`` is not a non-empty 2-D real array, or holds NaN/inf
            (the message names the first offending row).
    """
    arr = _as_scores(scores)
    # numba's OpenMP layer resets the process-wide OpenMP thread count, which is also
    # torch's: a caller that asked torch for fewer threads gets them back afterwards
    torch = sys.modules.get("torch")
    n_torch = torch.get_num_threads() if torch is not None else None
    ranks = _ranks_kernel(arr)
    if n_torch is not None and torch.get_num_threads() != n_torch:
        torch.set_num_threads(n_torch)
    bad = np.flatnonzero(ranks < 0)
    if bad.size:
        raise ValueError(
            f"scores hold NaN or inf in {bad.size} row(s), first at row {int(bad[0])}"
        )
    return ranks


def metrics_from_ranks(ranks, ks: Iterable[int] = (10, 20)) -> dict[str, float]:
    """Mean NDCG@K and HR@K over users from 0-based positive ranks.

    Args:
        ranks: int array ``(U,)`` of 0-based ranks (as from :func:`positive_ranks`).
        ks: cut-offs K (positive integers).

    Returns:
        ``{"NDCG@K": float, "HR@K": float, ...}`` for each K in ``ks``, NDCG keys first,
        each K in the given order.

    Raises:
        ValueError: empty ``ranks``, a negative rank, or a K < 1.
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    if (ranks < 0).any():
        raise ValueError("ranks must be >= 0")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    gain = 1.0 / np.log2(ranks.astype(np.float64) + 2.0)
    out: dict[str, float] = {}
    for k in ks:
        out[f"NDCG@{k}"] = float(np.where(ranks < k, gain, 0.0).mean())
    for k in ks:
        out[f"HR@{k}"] = float((ranks < k).mean())
    return out


def ranking_metrics(scores, ks: Iterable[int] = (10, 20)) -> dict[str, float]:
    """Mean NDCG@K and HR@K of the positive (column 0) over users.

    Args:
        scores: float array ``(U, C)``; row u = scores of user u's candidates, column 0 =
            the held-out target, columns 1..C-1 = its negatives (C = 100 in the paper's
            protocol: 1 positive + 99 negatives). Any monotone score (logit, dot product)
            works; only the order within a row matters.
        ks: cut-offs (default ``(10, 20)``, as in the paper's Table 6).

    Returns:
        ``{"NDCG@10": float, "NDCG@20": float, "HR@10": float, "HR@20": float}`` (for
        the default ``ks``): means over the U users, each in [0, 1].
        rank = number of other candidates with score >= the positive's (pessimistic
        ties); NDCG@K = 1/log2(rank+2) if rank < K else 0; HR@K = [rank < K].

    Raises:
        ValueError: non-2-D or empty ``scores``, NaN or inf anywhere, a K < 1.
    """
    return metrics_from_ranks(positive_ranks(scores), ks)
