"""The data pipeline (prepare_from_interactions / load_prepared) on small hand-built inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmsrec.data import TITLE_PLACEHOLDER, load_prepared, prepare_from_interactions
from llmsrec.errors import InputError


def _seq(ds, uid):
    return ds.seqs[uid].tolist()


def _by_raw(ds):
    """raw user -> list of raw items in stored order."""
    return {ds.raw_users[u]: [ds.raw_items[i] for i in ds.seqs[u]] for u in range(1, ds.n_users + 1)}


# --- order, dedup, remap ---------------------------------------------------------------


def test_dedup_tie_order_remap_and_timestamps(tmp_path):
    inter = [
        ("a", "x", 10),   # kept: a's first x
        ("b", "p", 30),   # dropped: b's p at 7 (later in the file) is earlier in time
        ("a", "y", 5),
        ("a", "x", 20),   # duplicate of a-x, later -> dropped
        ("a", "z", 10),   # ties with a-x at 10: file order decides (x, z, w), not item id
        ("b", "q", 40),
        ("a", "w", 10),
        ("b", "p", 7),
        ("b", "x", 50),
    ]
    ds = prepare_from_interactions(inter, {"x": "X", "y": "Y"}, tmp_path / "d", kcore=1,
                                   num_negatives=1)
    # users and items are numbered by first appearance in the input
    assert ds.raw_users == ["", "a", "b"]
    assert ds.raw_items == ["", "x", "p", "y", "z", "q", "w"]
    assert _seq(ds, 1) == [3, 1, 4, 6]            # y@5, x@10, z@10, w@10
    assert ds.timestamps[1].tolist() == [5, 10, 10, 10]
    assert _seq(ds, 2) == [2, 5, 1]               # p@7, q@40, x@50
    assert ds.timestamps[2].tolist() == [7, 40, 50]
    assert ds.titles == ["", "X", TITLE_PLACEHOLDER, "Y", TITLE_PLACEHOLDER,
                         TITLE_PLACEHOLDER, TITLE_PLACEHOLDER]
    s = ds.stats
    assert (s["users"], s["items"], s["interactions"]) == (2, 6, 7)
    assert s["dropped"]["duplicates"] == 2
    assert s["missing_titles"] == 4
    assert s["input"] == {"interactions": 9, "users": 2, "items": 6}
    # the jsonl files say the same
    rows = [json.loads(line) for line in open(tmp_path / "d" / "sequences.jsonl")]
    assert rows[0] == {"uid": 1, "user": "a", "iids": [3, 1, 4, 6], "items": ["y", "x", "z", "w"],
                       "timestamps": [5, 10, 10, 10]}
    items = [json.loads(line) for line in open(tmp_path / "d" / "items.jsonl")]
    assert items[0] == {"iid": 1, "item": "x", "title": "X", "description": ""}


def test_ms_timestamps_are_floored_to_seconds(tmp_path):
    inter = [("u", "a", 1_700_000_000_999), ("u", "b", 1_700_000_001_000),
             ("u", "c", 1_700_000_000_500), ("v", "a", 5), ("v", "b", 6), ("v", "d", 7),
             ("v", "e", 8)]
    ds = prepare_from_interactions(inter, {}, tmp_path / "d", kcore=1, num_negatives=1,
                                   timestamp_unit="ms")
    # order uses the full ms value (c@...500 before a@...999), then seconds are stored
    assert [ds.raw_items[i] for i in ds.seqs[1]] == ["c", "a", "b"]
    assert ds.timestamps[1].tolist() == [1_700_000_000, 1_700_000_000, 1_700_000_001]
    assert ds.timestamps[2].tolist() == [0, 0, 0, 0]
    assert ds.stats["timestamp_unit"] == "ms"


# --- k-core ----------------------------------------------------------------------------


def _kcore_case():
    sets = {"u1": "ABC", "u2": "ABD", "u3": "BCF", "u4": "ADE", "u5": "ACD", "u6": "BCD"}
    inter, t = [], 0
    for u, items in sets.items():
        for i in items:
            t += 1
            inter.append((u, i, t))
    return inter


def test_kcore_iterates_to_a_fixed_point(tmp_path):
    inter = _kcore_case()
    # one pass at k=3 drops only E, F (1 interaction each); u3 and u4 are then left with 2
    # interactions and must go in a second pass
    ds = prepare_from_interactions(inter, {}, tmp_path / "d", kcore=3, num_negatives=1)
    assert _by_raw(ds) == {"u1": list("ABC"), "u2": list("ABD"), "u5": list("ACD"),
                           "u6": list("BCD")}
    k = ds.stats["dropped"]["kcore"]
    assert k == {"users": 2, "items": 2, "interactions": 6, "passes": 3}
    # the result is a fixed point: every user and item has >= 3 interactions
    counts = np.bincount(np.concatenate(ds.seqs[1:]), minlength=ds.n_items + 1)[1:]
    assert counts.min() >= 3 and min(len(s) for s in ds.seqs[1:]) >= 3


def _reference_pipeline(inter, k):
    """Independent plain-Python version: sort, dedup, k-core by repeated set filtering."""
    order = sorted(range(len(inter)), key=lambda n: (inter[n][2], n))
    seen, kept = set(), []
    for n in order:
        u, i, t = inter[n]
        if (u, i) not in seen:
            seen.add((u, i))
            kept.append((u, i, t))
    while True:
        uc, ic = {}, {}
        for u, i, _ in kept:
            uc[u] = uc.get(u, 0) + 1
            ic[i] = ic.get(i, 0) + 1
        new = [r for r in kept if uc[r[0]] >= max(k, 3) and ic[r[1]] >= k]
        if len(new) == len(kept):
            break
        kept = new
    out = {}
    for u, i, _ in kept:
        out.setdefault(u, []).append(i)
    return out


@pytest.mark.parametrize("k", [2, 3, 5])
def test_pipeline_matches_reference_on_random_data(tmp_path, k):
    rng = np.random.default_rng(k)
    inter = [(f"u{rng.integers(40)}", f"i{rng.integers(60)}", int(rng.integers(30)))
             for _ in range(900)]
    ds = prepare_from_interactions(inter, {}, tmp_path / "d", kcore=k, num_negatives=5)
    assert _by_raw(ds) == _reference_pipeline(inter, k)
    ref_users = [u for u in dict.fromkeys(r[0] for r in inter) if u in _by_raw(ds)]
    assert ds.raw_users[1:] == ref_users  # first-appearance order


def test_kcore_below_3_still_needs_3_per_user(tmp_path):
    inter = [("a", "x", 1), ("a", "y", 2), ("b", "x", 1), ("b", "y", 2), ("b", "z", 3)]
    with pytest.raises(InputError, match="only 0 items outside"):
        prepare_from_interactions(inter, {}, tmp_path / "d", kcore=1, num_negatives=1)
    inter.append(("c", "w", 9))
    inter += [("c", "x", 10), ("c", "y", 11)]
    ds = prepare_from_interactions(inter, {}, tmp_path / "e", kcore=1, num_negatives=1)
    assert ds.raw_users[1:] == ["b", "c"]          # "a" has only 2 interactions


def test_nothing_left_after_kcore(tmp_path):
    inter = [("a", "x", 1), ("a", "y", 2), ("a", "z", 3)]
    with pytest.raises(InputError, match="nothing left after the 5-core"):
        prepare_from_interactions(inter, {}, tmp_path / "d")
    assert not (tmp_path / "d").exists()


# --- views, candidates, negatives --------------------------------------------------------


def _small(tmp_path, name="d", seed=0, m=3, n_items=12, **kw):
    rng = np.random.default_rng(123)
    inter = []
    for u in range(8):
        for t, i in enumerate(rng.permutation(n_items)[: 4 + u % 3]):
            inter.append((f"u{u}", f"i{i}", t))
    return prepare_from_interactions(inter, {}, tmp_path / name, kcore=1, seed=seed,
                                     num_negatives=m, **kw)


def test_views_leave_last_out(tmp_path):
    ds = _small(tmp_path)
    for name, cut in (("train", 3), ("valid", 2), ("test", 1)):
        inputs, targets = ds.view(name)
        assert len(inputs) == ds.n_users + 1 and targets.shape == (ds.n_users + 1,)
        assert targets.dtype == np.int64 and targets[0] == 0 and len(inputs[0]) == 0
        for u in range(1, ds.n_users + 1):
            s = ds.seqs[u].tolist()
            assert inputs[u].tolist() == s[:-cut] and targets[u] == s[-cut]
    with pytest.raises(ValueError):
        ds.view("bogus")
    # sequences are read-only, so a caller cannot corrupt the dataset through a view
    with pytest.raises(ValueError):
        ds.view("test")[0][1][0] = 7


def test_candidates_and_negatives(tmp_path):
    ds = _small(tmp_path, m=4)
    for split, negs in (("valid", ds.valid_negatives), ("test", ds.test_negatives)):
        c = ds.candidates(split)
        assert c.shape == (ds.n_users, 5) and c.dtype == np.int64
        assert c[:, 0].tolist() == ds.view(split)[1][1:].tolist()
        assert (c[:, 1:] == negs[1:]).all()
        assert negs.shape == (ds.n_users + 1, 4) and (negs[0] == 0).all()
        for u in range(1, ds.n_users + 1):
            row = negs[u].tolist()
            assert len(set(row)) == 4                       # without replacement
            assert all(1 <= i <= ds.n_items for i in row)
            assert not set(row) & set(ds.seqs[u].tolist())  # never in the sequence
    with pytest.raises(ValueError):
        ds.candidates("train")


def test_negatives_equal_the_complement_when_it_is_exactly_m(tmp_path):
    # N=10 items; user "full" has 6 of them, so its 4 negatives must be the other 4 exactly
    inter = [("full", f"i{i}", i) for i in (0, 3, 4, 6, 7, 9)]
    inter += [("o", f"i{i}", i) for i in range(10)]
    inter += [("p", f"i{i}", i) for i in (1, 2, 5, 8)]
    with pytest.raises(InputError, match=r"user 'o' \(uid 2\): only 0 items outside"):
        prepare_from_interactions(inter, {}, tmp_path / "d", kcore=1, num_negatives=4)
    inter = [r for r in inter if r[0] != "o"]
    ds = prepare_from_interactions(inter, {}, tmp_path / "d", kcore=1, num_negatives=4)
    want = {ds.raw_items.index(f"i{i}") for i in (1, 2, 5, 8)}
    assert set(ds.valid_negatives[1].tolist()) == want == set(ds.test_negatives[1].tolist())


def test_negatives_seeded(tmp_path):
    a = _small(tmp_path, "a", seed=0)
    b = _small(tmp_path, "b", seed=0)
    c = _small(tmp_path, "c", seed=1)
    assert (a.valid_negatives == b.valid_negatives).all()
    assert (a.test_negatives == b.test_negatives).all()
    assert a.digest == b.digest
    assert not (a.test_negatives == c.test_negatives).all()
    assert a.digest != c.digest
    # validation and test are independent draws
    assert not (a.valid_negatives[1:] == a.test_negatives[1:]).all()


def test_negatives_roughly_uniform(tmp_path):
    # 400 users with the same 3 items out of 15: each of the other 12 items should be among
    # a user's 5 negatives with probability 5/12
    inter = [("u", "a", 0), ("u", "b", 1), ("u", "c", 2)]
    inter += [(f"v{k}", f"i{j}", j) for k in range(400) for j in range(3)]
    inter += [("w", f"z{j}", j) for j in range(9)]
    ds = prepare_from_interactions(inter, {}, tmp_path / "d", kcore=1, num_negatives=5)
    counts = np.bincount(ds.test_negatives[1:].ravel(), minlength=ds.n_items + 1)
    vusers = [u for u in range(1, ds.n_users + 1) if ds.raw_users[u].startswith("v")]
    zs = [ds.raw_items.index(f"z{j}") for j in range(9)]
    share = counts[zs] / len(vusers)
    assert np.all(np.abs(share - 5 / 12) < 0.1)


def test_max_users_sample_before_kcore(tmp_path):
    inter = [(f"u{u}", f"i{(u + j) % 15}", j) for u in range(30) for j in range(5)]
    ds = prepare_from_interactions(inter, {}, tmp_path / "a", kcore=1, num_negatives=3,
                                   max_users=10)
    again = prepare_from_interactions(inter, {}, tmp_path / "b", kcore=1, num_negatives=3,
                                      max_users=10)
    other = prepare_from_interactions(inter, {}, tmp_path / "c", kcore=1, num_negatives=3,
                                      max_users=10, seed=5)
    assert ds.n_users == 10 and ds.raw_users == again.raw_users
    assert ds.raw_users != other.raw_users
    assert ds.stats["dropped"]["max_users"] == {"users": 20, "interactions": 100}
    # the sample keeps first-appearance order
    assert ds.raw_users[1:] == sorted(ds.raw_users[1:], key=lambda s: int(s[1:]))


# --- folder: atomic write, reload -------------------------------------------------------


def test_no_overwrite_force_and_atomic_failure(tmp_path):
    out = tmp_path / "d"
    a = _small(tmp_path, "d")
    before = (out / "negatives.jsonl").read_bytes()
    with pytest.raises(InputError, match="already exists"):
        _small(tmp_path, "d", seed=1)
    assert (out / "negatives.jsonl").read_bytes() == before
    b = _small(tmp_path, "d", seed=1, force=True)
    assert b.digest != a.digest and (out / "negatives.jsonl").read_bytes() != before
    # a failure during the run leaves neither the folder nor a temporary one behind
    with pytest.raises(InputError):
        _small(tmp_path, "e", m=20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_reload_with_and_without_npz(tmp_path):
    ds = _small(tmp_path)
    again = load_prepared(tmp_path / "d")
    (tmp_path / "d" / "arrays.npz").unlink()
    slow = load_prepared(tmp_path / "d")
    for other in (again, slow):
        assert other.n_users == ds.n_users and other.n_items == ds.n_items
        assert [s.tolist() for s in other.seqs] == [s.tolist() for s in ds.seqs]
        assert [s.tolist() for s in other.timestamps] == [s.tolist() for s in ds.timestamps]
        assert other.raw_users == ds.raw_users and other.raw_items == ds.raw_items
        assert other.titles == ds.titles and other.descriptions == ds.descriptions
        assert (other.valid_negatives == ds.valid_negatives).all()
        assert (other.test_negatives == ds.test_negatives).all()
        assert other.digest == ds.digest and other.stats == ds.stats


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="not a prepared dataset"):
        load_prepared(tmp_path / "nope")
    _small(tmp_path)
    (tmp_path / "d" / "items.jsonl").unlink()
    with pytest.raises(InputError, match="missing items.jsonl"):
        load_prepared(tmp_path / "d")


@pytest.mark.parametrize("kw, msg", [
    (dict(kcore=0), "--kcore"), (dict(num_negatives=0), "--num-negatives"),
    (dict(max_users=0), "--max-users"), (dict(timestamp_unit="h"), "unit"),
])
def test_bad_options(tmp_path, kw, msg):
    with pytest.raises(InputError, match=msg):
        prepare_from_interactions([("a", "b", 1)], {}, tmp_path / "d", **kw)


def test_bad_records(tmp_path):
    with pytest.raises(InputError, match="no interactions"):
        prepare_from_interactions([], {}, tmp_path / "d")
    with pytest.raises(InputError, match="interaction 1: field 'timestamp'"):
        prepare_from_interactions([("a", "b", 1), ("a", "c", float("nan"))], {}, tmp_path / "d")
    assert not Path(tmp_path / "d").exists()
