"""The measurements behind the paper's sequence-understanding analyses, as pure functions.

Each takes arrays and returns numbers; ``llmsrec.experiments.analyze`` feeds them from a run
folder and writes the report. Sources: Sec. 2.3 (shuffled training/inference,
representation similarity), Sec. 4.1.2 footnote 3 (t-score), Sec. 4.1.3 (warm/cold items),
Appendix F.4 (over-smoothing).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

import numpy as np
from scipy.spatial.distance import pdist

from llmsrec.metrics import ranking_metrics

__all__ = [
    "change_ratio",
    "shuffle_training_sequences",
    "transition_scores",
    "split_top_fraction",
    "warm_cold_items",
    "mean_cosine_similarity",
    "mean_pairwise_distance",
    "subset_metrics",
    "mean_std",
]


def change_ratio(original: float, shuffled: float) -> float:
    """(shuffled - original) / original, the paper's "change ratio" (Tables 3, 7, 12).

    Returns a fraction (-0.061 is a 6.1% drop); NaN when ``original`` is 0.
    """
    return (shuffled - original) / original if original else math.nan


def shuffle_training_sequences(seqs: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
    """Shuffle each user's training part ``seq[:-2]`` once, keeping the validation and test items.

    Shuffled training (Sec. 2.3.1): the order is destroyed once before training, not every
    epoch. User u's permutation comes from ``default_rng([seed, u])``, so it does not depend
    on which other users exist.

    Args:
        seqs: ``PreparedDataset.seqs`` (index 0 empty; int64 arrays of length >= 3).
    Returns:
        New list of int64 arrays, same lengths; ``out[u][-2:] == seqs[u][-2:]`` and
        ``sorted(out[u][:-2]) == sorted(seqs[u][:-2])``.
    """
    out = [np.asarray(seqs[0], dtype=np.int64).copy()]
    for u in range(1, len(seqs)):
        s = np.asarray(seqs[u], dtype=np.int64)
        head = s[:-2][np.random.default_rng([int(seed), u]).permutation(len(s) - 2)]
        out.append(np.concatenate([head, s[-2:]]))
    return out


def transition_scores(sequences: Sequence[np.ndarray]) -> np.ndarray:
    """Per-user t-score of Sec. 4.1.2, footnote 3.

    Count(a -> b) is how often item b directly follows item a over all the given sequences;
    a user's t-score is the mean of Count over the user's consecutive pairs:
    ``t(u) = sum_t Count(i_t -> i_{t+1}) / (n_u - 1)``. A user with fewer than 2 items
    scores 0.

    Args:
        sequences: list of int arrays (index 0 may be an empty padding entry).
    Returns:
        float64 ``(len(sequences),)``.
    """
    counts: Counter = Counter()
    for s in sequences:
        s = np.asarray(s)
        counts.update(zip(s[:-1].tolist(), s[1:].tolist()))
    out = np.zeros(len(sequences), dtype=np.float64)
    for u, s in enumerate(sequences):
        s = np.asarray(s)
        if len(s) >= 2:
            out[u] = sum(counts[p] for p in zip(s[:-1].tolist(), s[1:].tolist())) / (len(s) - 1)
    return out


def split_top_fraction(scores: np.ndarray, users: np.ndarray, fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Split ``users`` into the top ``fraction`` by ``scores[user]`` and the rest.

    Ties are broken by user id (lower first), so the split is deterministic.

    Returns:
        (top, rest): int64 arrays of user ids, each sorted ascending.
    """
    users = np.asarray(users, dtype=np.int64)
    order = np.lexsort((users, -np.asarray(scores)[users]))
    n_top = int(math.ceil(fraction * len(users)))
    return np.sort(users[order[:n_top]]), np.sort(users[order[n_top:]])


def warm_cold_items(counts: np.ndarray, fraction: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """Warm and cold items as in Sec. 4.1.3 (after A-LLMRec): top / bottom ``fraction`` by count.

    Args:
        counts: int ``(N+1,)`` interactions per item id (index 0 ignored).
    Returns:
        (warm, cold): bool ``(N+1,)`` masks; items are ranked by count, ties broken by
        item id (lower first); ``ceil(fraction * N)`` items in each set.
    """
    counts = np.asarray(counts)
    ids = np.arange(1, len(counts))
    order = ids[np.lexsort((ids, -counts[1:]))]
    k = int(math.ceil(fraction * len(ids)))
    warm = np.zeros(len(counts), dtype=bool)
    cold = np.zeros(len(counts), dtype=bool)
    warm[order[:k]] = True
    cold[order[len(order) - k:]] = True
    return warm, cold


def mean_cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of cos(a_r, b_r) (Table 5). Rows where either vector is zero are skipped.

    Args:
        a, b: float ``(U, d)``, the same users' representations from the original and the
            shuffled view.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ok = (na > 0) & (nb > 0)
    return float(np.mean(np.sum(a[ok] * b[ok], axis=1) / (na[ok] * nb[ok])))


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Average Euclidean distance over all pairs of rows (Appendix F.4, Table 13).

    Args:
        x: float ``(U, d)`` user representations.
    """
    return float(np.mean(pdist(np.asarray(x, dtype=np.float64))))


def subset_metrics(scores: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    """``ranking_metrics`` (NDCG@10/20, HR@10/20) over a subset of users.

    Args:
        scores: float ``(U, C)`` candidate scores, row r for user r+1, column 0 the target.
        rows: int row indices (user id - 1).
    Raises:
        ValueError: an empty subset.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        raise ValueError("subset_metrics: empty set of users")
    return {k: float(v) for k, v in ranking_metrics(np.asarray(scores)[rows]).items()}


def mean_std(values: Iterable[dict]) -> dict[str, tuple[float, float]]:
    """Per key, (mean, sample standard deviation) over seeds; std is 0.0 for one value."""
    values = list(values)
    out = {}
    for k in values[0]:
        xs = np.array([v[k] for v in values], dtype=np.float64)
        out[k] = (float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0)
    return out
