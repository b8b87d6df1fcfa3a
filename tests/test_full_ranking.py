"""Full-catalogue ranks against a brute-force count, and their metrics."""

import numpy as np
import pytest
import torch

from llmsrec.evaluate.full_ranking import full_metrics, full_ranks


def brute_force(users, items, histories, targets):
    out = []
    for u, h, t in zip(users, histories, targets):
        s = items @ u
        out.append(sum(1 for j in range(1, len(items)) if j != t and j not in set(h) and s[j] >= s[t]))
    return np.array(out)


@pytest.mark.parametrize("block", [1, 3, 1024])
def test_full_ranks_equal_brute_force(block):
    rng = np.random.default_rng(0)
    users = rng.normal(size=(7, 4)).astype(np.float32)
    items = rng.normal(size=(31, 4)).astype(np.float32)
    items[5] = items[6]  # a tie
    histories = [rng.choice(np.arange(1, 31), size=k, replace=False) for k in (0, 1, 3, 5, 8, 12, 29)]
    targets = np.array([next(j for j in range(30, 0, -1) if j not in set(h)) for h in histories])
    targets[2] = 6
    histories[2] = np.array([1, 2, 3])
    got = full_ranks(users, items, histories, targets, block=block)
    assert got.tolist() == brute_force(users, items, histories, targets).tolist()
    assert got[6] == 0  # only the target is left outside a 29-item history


def test_ties_count_against_the_model_and_target_in_history_is_kept():
    items = np.array([[0.0], [1.0], [1.0], [1.0], [0.5]], dtype=np.float32)
    users = np.ones((1, 1), dtype=np.float32)
    assert full_ranks(users, items, [np.array([], dtype=np.int64)], [2]).tolist() == [2]
    assert full_ranks(users, items, [np.array([2, 3])], [2]).tolist() == [1]


def test_full_metrics_values_and_errors():
    items = torch.tensor([[0.0], [3.0], [2.0], [1.0]])
    users = torch.ones((2, 1))
    m = full_metrics(users, items, [np.array([], dtype=np.int64)] * 2, [1, 3], ks=(1, 2))
    # ranks 0 and 2
    assert m == {"NDCG@1": 0.5, "NDCG@2": 0.5, "HR@1": 0.5, "HR@2": 0.5, "MRR": pytest.approx((1 + 1 / 3) / 2)}
    with pytest.raises(ValueError, match="targets must be item ids"):
        full_ranks(users, items, [np.array([])] * 2, [0, 1])
    with pytest.raises(ValueError, match="NaN or inf"):
        full_ranks(torch.tensor([[float("nan")]]), items, [np.array([])], [1])
