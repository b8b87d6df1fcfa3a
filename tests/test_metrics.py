"""NDCG@K / HR@K: exact values on hand-built inputs, invariants, parity with scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import rankdata

from llmsrec.metrics import metrics_from_ranks, positive_ranks, ranking_metrics
from llmsrec.evaluate.report import format_table


def _reference(scores: np.ndarray, ks=(10, 20)) -> dict[str, float]:
    """Independent implementation: scipy's 'max' rank of the negated scores.

    rankdata(-s, method="max") gives each element 1 + the number of elements with a score
    >= its own (itself included), so minus 1 is the pessimistic 0-based rank.
    """
    ranks = np.array([rankdata(-row, method="max")[0] - 1 for row in scores], dtype=np.int64)
    out = {}
    for k in ks:
        out[f"NDCG@{k}"] = float(np.mean([1 / math.log2(r + 2) if r < k else 0.0 for r in ranks]))
    for k in ks:
        out[f"HR@{k}"] = float(np.mean([1.0 if r < k else 0.0 for r in ranks]))
    return out


def _row_with_rank(r: int, n_cand: int = 100) -> np.ndarray:
    """A score row whose positive (column 0) has exactly r candidates above it."""
    row = np.zeros(n_cand)
    row[0] = 0.5
    row[1 : 1 + r] = 1.0
    return row


def test_keys_and_order():
    m = ranking_metrics(np.zeros((3, 100)))
    assert list(m) == ["NDCG@10", "NDCG@20", "HR@10", "HR@20"]


def test_constant_scorer_ranks_last():
    scores = np.full((50, 100), 3.25, dtype=np.float32)
    assert positive_ranks(scores).tolist() == [99] * 50
    m = ranking_metrics(scores)
    assert m == {"NDCG@10": 0.0, "NDCG@20": 0.0, "HR@10": 0.0, "HR@20": 0.0}


def test_perfect_scorer():
    scores = np.zeros((4, 100))
    scores[:, 0] = 1.0
    assert ranking_metrics(scores) == {"NDCG@10": 1.0, "NDCG@20": 1.0, "HR@10": 1.0, "HR@20": 1.0}


@pytest.mark.parametrize("r", [0, 1, 2, 5, 9, 10, 15, 19, 20, 50, 99])
def test_rank_r_exact(r):
    scores = _row_with_rank(r)[None, :]
    assert positive_ranks(scores).tolist() == [r]
    m = ranking_metrics(scores, ks=(10, 20))
    for k in (10, 20):
        expected = 1.0 / math.log2(r + 2) if r < k else 0.0
        assert m[f"NDCG@{k}"] == pytest.approx(expected, abs=1e-15)
        assert m[f"HR@{k}"] == (1.0 if r < k else 0.0)


def test_ties_are_pessimistic():
    # two candidates tie with the positive, one is below: rank 2
    scores = np.array([[1.0, 1.0, 0.0, 1.0]])
    assert positive_ranks(scores).tolist() == [2]
    assert ranking_metrics(scores, ks=(1, 2, 3)) == {
        "NDCG@1": 0.0, "NDCG@2": 0.0, "NDCG@3": 0.5, "HR@1": 0.0, "HR@2": 0.0, "HR@3": 1.0,
    }


def test_mean_over_users_exact():
    scores = np.stack([_row_with_rank(0), _row_with_rank(1), _row_with_rank(30)])
    m = ranking_metrics(scores, ks=(10,))
    assert m["HR@10"] == pytest.approx(2 / 3)
    assert m["NDCG@10"] == pytest.approx((1.0 + 1 / math.log2(3)) / 3)


def test_monotone_in_k_and_ndcg_below_hr():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(500, 100))
    scores[:, 0] += rng.normal(size=500)  # some signal
    ks = tuple(range(1, 101))
    m = ranking_metrics(scores, ks=ks)
    for a, b in zip(ks, ks[1:]):
        assert m[f"HR@{a}"] <= m[f"HR@{b}"]
        assert m[f"NDCG@{a}"] <= m[f"NDCG@{b}"]
    for k in ks:
        assert m[f"NDCG@{k}"] <= m[f"HR@{k}"] + 1e-15
    assert m["HR@100"] == 1.0  # every rank is < 100 with 100 candidates


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parity_with_scipy_on_random_inputs_with_ties(dtype):
    rng = np.random.default_rng(7)
    # small integer scores -> many ties, incl. ties with the positive
    scores = rng.integers(0, 6, size=(400, 100)).astype(dtype)
    got = ranking_metrics(scores, ks=(1, 5, 10, 20))
    ref = _reference(scores, ks=(1, 5, 10, 20))
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-12)
    # continuous scores, odd candidate count
    scores = rng.normal(size=(300, 37)).astype(dtype)
    got = ranking_metrics(scores, ks=(3, 10))
    ref = _reference(scores, ks=(3, 10))
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-12)


def test_non_contiguous_and_integer_input():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 4, size=(100, 200))
    view = base[:, ::2]  # non-contiguous view
    assert ranking_metrics(view) == pytest.approx(_reference(np.asarray(view, dtype=float)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("col", [0, 5])
def test_nan_inf_raise(bad, col):
    scores = np.zeros((10, 100), dtype=np.float32)
    scores[7, col] = bad
    with pytest.raises(ValueError, match="row 7"):
        ranking_metrics(scores)


@pytest.mark.parametrize("shape", [(0, 100), (5, 0), (100,), (2, 3, 4)])
def test_bad_shapes_raise(shape):
    with pytest.raises(ValueError):
        ranking_metrics(np.zeros(shape))


def test_bad_ks_raise():
    with pytest.raises(ValueError):
        ranking_metrics(np.zeros((2, 10)), ks=(0,))
    with pytest.raises(ValueError):
        metrics_from_ranks(np.array([-1, 2]))


def test_format_table():
    rows = {
        "sasrec": {
            "valid": {"HR@10": 0.5, "NDCG@10": 0.25, "HR@20": 0.75, "NDCG@20": 0.3},
            "test": {"HR@10": 0.125, "NDCG@10": 0.0625, "HR@20": 0.5, "NDCG@20": 0.1},
        }
    }
    assert format_table(rows) == "\n".join([
        "| model | split | NDCG@10 | NDCG@20 | HR@10 | HR@20 |",
        "|---|---|---:|---:|---:|---:|",
        "| sasrec | valid | 0.2500 | 0.3000 | 0.5000 | 0.7500 |",
        "| sasrec | test | 0.0625 | 0.1000 | 0.1250 | 0.5000 |",
    ])


def test_torch_thread_count_survives_the_numba_kernel():
    import torch

    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ranking_metrics(np.random.default_rng(0).random((50, 10)))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)
