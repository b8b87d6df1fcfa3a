"""The prepared-dataset pipeline and folder format (paper Sec. 4.1 / Appendix C).

``prepare_from_interactions`` turns raw ``(user, item, timestamp)`` interactions into a
prepared folder; ``load_prepared`` reads it back as a :class:`PreparedDataset`.

Processing, in this order (every step is deterministic for a given input and seed):

1. **Chronological order.** Interactions are stably sorted by ``(timestamp, position in
   the input)``; ties keep file order, never item-id order.
2. **Dedup.** A repeated ``(user, item)`` pair keeps only its earliest interaction in that
   order (for a file already in chronological order: the first row in the file).
3. **User sample** (``max_users``): a seeded uniform sample of that many distinct users,
   drawn *before* the k-core filter (the paper samples users of large categories).
4. **Iterative k-core** to a fixed point: users need ``max(kcore, 3)`` interactions (a
   leave-last-out split needs 3), items need ``kcore``; passes repeat until nothing drops.
5. **Id remap.** Internal ids start at 1 (0 = padding). Users are numbered in order of
   their first appearance in the input, items likewise; so for a file sorted by user the
   uids follow the file.
6. **Leave-last-out split** (stored implicitly): ``seq[-1]`` is the test target,
   ``seq[-2]`` the validation target, ``seq[:-2]`` the training sequence.
7. **Negatives.** For every user, ``num_negatives`` for validation and, independently,
   ``num_negatives`` for test, drawn uniformly without replacement from the items outside
   the user's whole sequence (so never the target), from a ``numpy.random.Generator``
   seeded with ``SeedSequence([seed, 2])`` (the user sample uses ``[seed, 1]``); users are
   visited in uid order, validation before test.

Folder written (atomically, via :func:`llmsrec.atomic.atomic_dir`):

- ``sequences.jsonl``: ``{"uid", "user", "iids", "items", "timestamps"}`` per user, uid order.
- ``items.jsonl``: ``{"iid", "item", "title", "description"}`` per item, iid order.
- ``negatives.jsonl``: ``{"uid", "valid": [iids], "test": [iids]}`` per user.
- ``stats.json``: counts (see :func:`prepare_from_interactions`).
- ``arrays.npz`` (no pickle): ``offsets`` int64 ``(U+2,)`` (``seq[u] =
  iids[offsets[u]:offsets[u+1]]``, u=0 empty), ``iids`` int32 and ``timestamps`` int64
  flat, ``valid_negatives``/``test_negatives`` int32 ``(U+1, m)`` (int64 once loaded),
  ``raw_users`` ``(U+1,)`` and ``raw_items`` ``(N+1,)`` unicode (index 0 = "").

Timestamps are stored as integer Unix seconds (``floor(ts)`` for unit ``"s"``,
``floor(ts / 1000)`` for ``"ms"``); ``stats.json`` records the source unit.
Items without a title get :data:`TITLE_PLACEHOLDER` and are counted in ``missing_titles``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from tqdm.auto import tqdm

from llmsrec.atomic import atomic_dir
from llmsrec.defaults import PREPARE
from llmsrec.errors import InputError

FORMAT_VERSION = 1
TITLE_PLACEHOLDER = "Unknown title"
"""Title given to an item that has no (or an empty) title in the source."""

_JSONL_FILES = ("sequences.jsonl", "items.jsonl", "negatives.jsonl")
_SPLITS = ("train", "valid", "test")
_SAMPLE_STREAM = 1
_NEGATIVE_STREAM = 2
_UNITS = {"s": 1, "ms": 1000}
_UNIT_NAMES = {"s": "seconds", "ms": "milliseconds"}
#: interaction dates accepted by prepare, in Unix seconds: 1900-01-01 (incl.) .. 2100-01-01 (excl.)
PLAUSIBLE_SECONDS = (-2_208_988_800, 4_102_444_800)


def implausible_timestamp(ts, unit: str) -> tuple[str, str | None] | None:
    """Check one raw timestamp in ``unit`` (``s`` or ``ms``) against :data:`PLAUSIBLE_SECONDS`.

    Returns:
        None for a date in 1900..2099; else ``(message, other unit or None)``: the message
        says what date the value would be, and names the unit in which it *is* plausible
        (e.g. milliseconds read as seconds: ``--timestamp-unit ms``).
    """
    if unit not in _UNITS:
        raise InputError(f"timestamp unit must be one of {sorted(_UNITS)}, got {unit!r}")
    lo, hi = PLAUSIBLE_SECONDS
    sec = float(ts) / _UNITS[unit]
    if lo <= sec < hi:
        return None
    year = int(1970 + sec // 31_556_952)
    msg = (f"field 'timestamp' {ts!r} is not a plausible date in {_UNIT_NAMES[unit]} "
           f"(year {year}; accepted: 1900 to 2099)")
    for other, div in _UNITS.items():
        if other != unit and lo <= float(ts) / div < hi:
            return f"{msg}; it looks like {_UNIT_NAMES[other]}: pass --timestamp-unit {other}", other
    return msg, None


class PreparedDataset:
    """A prepared dataset folder in memory (internal ids: users 1..U, items 1..N, 0 = padding).

    Attributes:
        root: the folder it was loaded from.
        n_users, n_items: U and N.
        seqs: ``list[np.ndarray]`` of length U+1, int64 internal item ids in chronological
            order (read-only arrays); ``seqs[0]`` is empty; every other has length >= 3.
        timestamps: same layout, int64 Unix seconds.
        raw_users: ``list[str]`` (U+1), raw_items, titles, descriptions: ``list[str]`` (N+1);
            index 0 is a padding entry ("").
        valid_negatives, test_negatives: int64 ``(U+1, m)``; row 0 is zeros.
        stats: the parsed ``stats.json``.
        digest: sha256 (hex) over the three jsonl files as loaded (:func:`dataset_digest`),
            for cache provenance.
    """

    def __init__(self, root, seqs, timestamps, raw_users, raw_items, titles, descriptions,
                 valid_negatives, test_negatives, stats, digest):
        self.root = Path(root)
        self.seqs: list[np.ndarray] = seqs
        self.timestamps: list[np.ndarray] = timestamps
        self.raw_users: list[str] = raw_users
        self.raw_items: list[str] = raw_items
        self.titles: list[str] = titles
        self.descriptions: list[str] = descriptions
        self.valid_negatives: np.ndarray = valid_negatives
        self.test_negatives: np.ndarray = test_negatives
        self.stats: dict = stats
        self.digest: str = digest
        self.n_users = len(seqs) - 1
        self.n_items = len(raw_items) - 1

    def __repr__(self) -> str:
        n_inter = sum(len(s) for s in self.seqs)
        return (f"PreparedDataset({str(self.root)!r}, users={self.n_users}, "
                f"items={self.n_items}, interactions={n_inter})")

    def view(self, name: str) -> tuple[list[np.ndarray], np.ndarray]:
        """Leave-last-out view ``name`` in ``train|valid|test``.

        Returns:
            inputs: ``list[np.ndarray]`` of length U+1 (int64, read-only; ``inputs[0]`` empty):
                ``seq[:-3]`` / ``seq[:-2]`` / ``seq[:-1]``.
            targets: int64 ``(U+1,)``: ``seq[-3]`` / ``seq[-2]`` / ``seq[-1]``; ``targets[0] = 0``.
        A ``train`` input can be empty (a user with exactly 3 interactions).

        Raises:
            ValueError: unknown view name.
        """
        if name not in _SPLITS:
            raise ValueError(f"unknown view {name!r}; expected one of {', '.join(_SPLITS)}")
        cut = {"train": 3, "valid": 2, "test": 1}[name]
        inputs = [self.seqs[0]]
        targets = np.zeros(self.n_users + 1, dtype=np.int64)
        for u in range(1, self.n_users + 1):
            s = self.seqs[u]
            inputs.append(s[:-cut])
            targets[u] = s[-cut]
        return inputs, targets

    def candidates(self, split: str) -> np.ndarray:
        """Candidate items for ``split`` in ``valid|test``: int64 ``(U, 1+m)``.

        Row ``u-1`` belongs to uid ``u``; column 0 is the target (``seq[-2]`` or ``seq[-1]``),
        columns 1..m the stored negatives of that split (Sec. 4.1: 1 positive + 99 negatives).

        Raises:
            ValueError: ``split`` is not ``valid`` or ``test``.
        """
        if split not in ("valid", "test"):
            raise ValueError(f"candidates exist for 'valid' and 'test', not {split!r}")
        _, targets = self.view(split)
        neg = self.valid_negatives if split == "valid" else self.test_negatives
        return np.concatenate([targets[1:, None], neg[1:]], axis=1).astype(np.int64)


def dataset_digest(root: str | os.PathLike) -> str:
    """sha256 hex digest over the three jsonl files of a prepared folder (name, size, bytes)."""
    h = hashlib.sha256()
    for name in _JSONL_FILES:
        p = Path(root) / name
        h.update(name.encode() + b"\0" + str(p.stat().st_size).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# pipeline


def _collapse(text) -> str:
    return " ".join(str(text).split()) if text is not None else ""


def prepare_from_interactions(
    interactions: Iterable[tuple[str, str, int | float]],
    titles: Mapping[str, str],
    out: str | os.PathLike,
    *,
    kcore: int = PREPARE["kcore"],
    seed: int = 0,
    num_negatives: int = PREPARE["num_negatives"],
    max_users: int | None = None,
    descriptions: Mapping[str, str] | None = None,
    stats_extra: Mapping | None = None,
    force: bool = False,
    timestamp_unit: str = "s",
) -> PreparedDataset:
    """Run the data pipeline (module docstring) and write the prepared folder ``out``.

    Args:
        interactions: ``(raw_user, raw_item, timestamp)`` in file order; ids are turned into
            ``str``; timestamps are finite numbers in ``timestamp_unit``.
        titles: raw item id -> title (whitespace collapsed; missing/empty ->
            :data:`TITLE_PLACEHOLDER`, counted in ``stats["missing_titles"]``).
        out: folder to create.
        kcore: minimum interactions per item (users: ``max(kcore, 3)``); >= 1.
        seed: seeds the user sample and the negatives.
        num_negatives: negatives per user per split (validation, test); >= 1.
        max_users: if set and smaller than the number of distinct users, a seeded sample of
            this many users is kept before the k-core filter.
        descriptions: raw item id -> description (optional; "" when absent).
        stats_extra: extra keys merged into ``stats.json`` (e.g. ``dataset``, ``sources``,
            ``bad_lines``).
        force: replace an existing ``out``.
        timestamp_unit: ``"s"`` or ``"ms"`` (converted to integer seconds).

    ``stats.json`` keys: ``dataset``, ``users``, ``items``, ``interactions``,
    ``avg_sequence_length``, ``input`` (``interactions``, ``users``, ``items``),
    ``dropped`` (``duplicates``; ``max_users``: ``users``, ``interactions``; ``kcore``:
    ``users``, ``items``, ``interactions``, ``passes``: filter passes run, counting the
    last one that removed nothing), ``missing_titles``,
    ``title_placeholder``, ``timestamp_unit`` (source unit; stored timestamps are seconds),
    ``params`` (``kcore``, ``seed``, ``num_negatives``, ``max_users``), ``id_order``,
    ``format_version``, plus ``stats_extra``.

    Returns:
        The written dataset, as :func:`load_prepared` would read it.

    Raises:
        InputError: bad options, no interactions, a bad timestamp (not a finite number, or
            a date outside 1900..2099 in ``timestamp_unit``), nothing left after the
            k-core filter, a user with fewer than ``num_negatives`` items outside its
            sequence, or ``out`` exists and not ``force``.
    """
    if kcore < 1:
        raise InputError(f"--kcore must be >= 1, got {kcore}")
    if num_negatives < 1:
        raise InputError(f"--num-negatives must be >= 1, got {num_negatives}")
    if max_users is not None and max_users < 1:
        raise InputError(f"--max-users must be >= 1, got {max_users}")
    if timestamp_unit not in _UNITS:
        raise InputError(f"timestamp unit must be one of {sorted(_UNITS)}, got {timestamp_unit!r}")
    out = Path(out)
    if out.exists() and not force:  # fail before the (possibly long) work
        raise InputError(f"{out}: already exists (pass --force to overwrite)")

    # -- read: codes by first appearance -----------------------------------------------
    user_code: dict[str, int] = {}
    item_code: dict[str, int] = {}
    u_list: list[int] = []
    i_list: list[int] = []
    t_list: list = []
    for n, rec in enumerate(interactions):
        try:
            ru, ri, ts = rec
        except (TypeError, ValueError):
            raise InputError(f"interaction {n}: expected (user, item, timestamp), got {rec!r}")
        if isinstance(ts, bool) or not isinstance(ts, (int, float, np.integer, np.floating)) \
                or not math.isfinite(ts):
            raise InputError(f"interaction {n}: field 'timestamp' is not a finite number: {ts!r}")
        bad_date = implausible_timestamp(ts, timestamp_unit)
        if bad_date is not None:
            raise InputError(f"interaction {n}: {bad_date[0]}")
        ru, ri = str(ru), str(ri)
        u_list.append(user_code.setdefault(ru, len(user_code)))
        i_list.append(item_code.setdefault(ri, len(item_code)))
        t_list.append(ts)
    n_input = len(u_list)
    if n_input == 0:
        raise InputError("no interactions in the input")
    users_raw = list(user_code)
    items_raw = list(item_code)
    del user_code, item_code
    u = np.asarray(u_list, dtype=np.int64)
    it = np.asarray(i_list, dtype=np.int64)
    t = np.asarray(t_list)
    if t.dtype.kind not in "iuf":  # ints too large for int64, etc.
        t = t.astype(np.float64)
    del u_list, i_list, t_list

    # -- 1. chronological order (stable: ties keep input order) --------------------------
    order = np.argsort(t, kind="stable")
    u, it, t = u[order], it[order], t[order]

    # -- 2. dedup: first occurrence of (user, item) in chronological order ----------------
    key = u * np.int64(len(items_raw)) + it
    _, first = np.unique(key, return_index=True)
    keep = np.zeros(len(key), dtype=bool)
    keep[first] = True
    n_dup = int(len(key) - keep.sum())
    u, it, t = u[keep], it[keep], t[keep]

    # -- 3. seeded user sample before the k-core ------------------------------------------
    present = np.unique(u)
    sample_users = sample_inter = 0
    if max_users is not None and max_users < len(present):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SAMPLE_STREAM]))
        chosen = rng.choice(present, size=max_users, replace=False)
        keep = np.isin(u, chosen)
        sample_users = int(len(present) - max_users)
        sample_inter = int(len(u) - keep.sum())
        u, it, t = u[keep], it[keep], t[keep]

    # -- 4. iterative k-core to a fixed point --------------------------------------------
    n_before = len(u)
    users_before = len(np.unique(u))
    items_before = len(np.unique(it))
    user_min = max(kcore, 3)
    passes = 0
    while len(u):
        passes += 1
        uc = np.bincount(u, minlength=len(users_raw))
        ic = np.bincount(it, minlength=len(items_raw))
        keep = (uc[u] >= user_min) & (ic[it] >= kcore)
        if keep.all():
            break
        u, it, t = u[keep], it[keep], t[keep]
    if len(u) == 0:
        raise InputError(
            f"nothing left after the {kcore}-core filter "
            f"({n_before} interactions of {users_before} users, {items_before} items before it)")
    kept_users = np.unique(u)  # codes in first-appearance order
    kept_items = np.unique(it)
    kcore_stats = {
        "users": int(users_before - len(kept_users)),
        "items": int(items_before - len(kept_items)),
        "interactions": int(n_before - len(u)),
        "passes": passes,
    }

    # -- 5. remap (codes are first-appearance ranks, so np.unique order = that order) ------
    U, N = len(kept_users), len(kept_items)
    umap = np.zeros(len(users_raw), dtype=np.int64)
    umap[kept_users] = np.arange(1, U + 1)
    imap = np.zeros(len(items_raw), dtype=np.int64)
    imap[kept_items] = np.arange(1, N + 1)
    uid, iid = umap[u], imap[it]
    div = _UNITS[timestamp_unit]
    t_sec = np.floor(t / div).astype(np.int64) if div != 1 or t.dtype.kind == "f" \
        else t.astype(np.int64)
    grp = np.argsort(uid, kind="stable")  # per user, chronological order is kept
    flat_iids, flat_ts = iid[grp], t_sec[grp]
    counts = np.bincount(uid, minlength=U + 1)
    offsets = np.zeros(U + 2, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)  # offsets[0] = offsets[1] = 0 (uid 0 empty)

    raw_users = [""] + [users_raw[c] for c in kept_users]
    raw_items = [""] + [items_raw[c] for c in kept_items]
    title_list, desc_list = [""], [""]
    missing_titles = 0
    descriptions = descriptions or {}
    for ri in raw_items[1:]:
        title = _collapse(titles.get(ri))
        if not title:
            title = TITLE_PLACEHOLDER
            missing_titles += 1
        title_list.append(title)
        desc_list.append(_collapse(descriptions.get(ri)))

    # -- 7. negatives ---------------------------------------------------------------------
    valid_neg, test_neg = _sample_negatives(flat_iids, offsets, N, num_negatives, seed, raw_users)

    stats = {
        "dataset": None,
        "users": U,
        "items": N,
        "interactions": int(len(flat_iids)),
        "avg_sequence_length": round(len(flat_iids) / U, 4),
        "input": {"interactions": n_input, "users": len(users_raw), "items": len(items_raw)},
        "dropped": {
            "duplicates": n_dup,
            "max_users": {"users": sample_users, "interactions": sample_inter},
            "kcore": kcore_stats,
        },
        "missing_titles": missing_titles,
        "title_placeholder": TITLE_PLACEHOLDER,
        "timestamp_unit": timestamp_unit,
        "params": {"kcore": kcore, "seed": seed, "num_negatives": num_negatives,
                   "max_users": max_users},
        "id_order": "users and items numbered 1.. in order of first appearance in the input",
        "format_version": FORMAT_VERSION,
    }
    stats.update(dict(stats_extra or {}))

    with atomic_dir(out, force=force) as tmp:
        _write_folder(tmp, flat_iids, flat_ts, offsets, raw_users, raw_items, title_list,
                      desc_list, valid_neg, test_neg, stats)
    return load_prepared(out)


def _sample_negatives(flat_iids, offsets, n_items, m, seed, raw_users):
    """(U+1, m) int64 validation and test negatives; see the module docstring, step 7."""
    U = len(offsets) - 2
    rng = np.random.default_rng(np.random.SeedSequence([seed, _NEGATIVE_STREAM]))
    valid = np.zeros((U + 1, m), dtype=np.int64)
    test = np.zeros((U + 1, m), dtype=np.int64)
    for uid in tqdm(range(1, U + 1), desc="negatives", unit="user", disable=None, leave=False):
        seen = np.unique(flat_iids[offsets[uid]:offsets[uid + 1]])  # sorted, 1-based
        eligible = n_items - len(seen)
        if eligible < m:
            raise InputError(
                f"user {raw_users[uid]!r} (uid {uid}): only {eligible} items outside its "
                f"sequence, need {m} negatives (lower --num-negatives)")
        # rank r in the complement of `seen` within 1..N -> item r + 1 + #{seen items below it}
        gaps = seen - np.arange(len(seen)) - 1  # complement items before each seen item
        for dst in (valid, test):
            r = rng.choice(eligible, size=m, replace=False)
            dst[uid] = r + 1 + np.searchsorted(gaps, r, side="right")
    return valid, test


def _write_folder(d: Path, flat_iids, flat_ts, offsets, raw_users, raw_items, titles,
                  descriptions, valid_neg, test_neg, stats) -> None:
    U = len(raw_users) - 1
    with open(d / "sequences.jsonl", "w", encoding="utf-8") as f:
        for uid in range(1, U + 1):
            a, b = offsets[uid], offsets[uid + 1]
            iids = flat_iids[a:b].tolist()
            f.write(json.dumps({
                "uid": uid, "user": raw_users[uid], "iids": iids,
                "items": [raw_items[i] for i in iids], "timestamps": flat_ts[a:b].tolist(),
            }, ensure_ascii=False) + "\n")
    with open(d / "items.jsonl", "w", encoding="utf-8") as f:
        for iid in range(1, len(raw_items)):
            f.write(json.dumps({"iid": iid, "item": raw_items[iid], "title": titles[iid],
                                "description": descriptions[iid]}, ensure_ascii=False) + "\n")
    with open(d / "negatives.jsonl", "w", encoding="utf-8") as f:
        for uid in range(1, U + 1):
            f.write(json.dumps({"uid": uid, "valid": valid_neg[uid].tolist(),
                                "test": test_neg[uid].tolist()}) + "\n")
    with open(d / "stats.json", "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(d / "arrays.npz", "wb") as f:
        small = np.int32 if len(raw_items) < 2**31 else np.int64  # halves the file
        np.savez(f, offsets=offsets, iids=flat_iids.astype(small), timestamps=flat_ts,
                 valid_negatives=valid_neg.astype(small), test_negatives=test_neg.astype(small),
                 raw_users=np.array(raw_users, dtype=str), raw_items=np.array(raw_items, dtype=str))


# ---------------------------------------------------------------------------------------
# loading


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path} line {n}: malformed JSON ({e.msg})") from None
    return rows


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def load_prepared(path: str | os.PathLike) -> PreparedDataset:
    """Load a folder written by :func:`prepare_from_interactions` (or ``llmsrec prepare``).

    Reads ``arrays.npz`` (no pickle) for sequences, timestamps, raw ids and negatives, and
    ``items.jsonl`` for titles and descriptions; falls back to the jsonl files when
    ``arrays.npz`` is absent. Sequence arrays are read-only.

    Raises:
        InputError: the folder or one of its files is missing or inconsistent.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: not a prepared dataset folder (run `llmsrec prepare`)")
    for name in (*_JSONL_FILES, "stats.json"):
        if not (root / name).is_file():
            raise InputError(f"{root}: missing {name} (not a prepared dataset folder)")
    digest = dataset_digest(root)
    with open(root / "stats.json", encoding="utf-8") as f:
        try:
            stats = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{root / 'stats.json'}: malformed JSON ({e.msg})") from None
    items = _read_jsonl(root / "items.jsonl")
    titles = [""] + [r.get("title", TITLE_PLACEHOLDER) for r in items]
    descriptions = [""] + [r.get("description", "") for r in items]

    npz_path = root / "arrays.npz"
    if npz_path.is_file():
        with np.load(npz_path, allow_pickle=False) as z:
            offsets = z["offsets"]
            flat_iids = _readonly(z["iids"].astype(np.int64, copy=False))
            flat_ts = _readonly(z["timestamps"].astype(np.int64, copy=False))
            valid_neg = z["valid_negatives"].astype(np.int64, copy=False)
            test_neg = z["test_negatives"].astype(np.int64, copy=False)
            raw_users = z["raw_users"].tolist()
            raw_items = z["raw_items"].tolist()
        U = len(offsets) - 2
        seqs = [flat_iids[offsets[u]:offsets[u + 1]] for u in range(U + 1)]
        timestamps = [flat_ts[offsets[u]:offsets[u + 1]] for u in range(U + 1)]
    else:
        seq_rows = _read_jsonl(root / "sequences.jsonl")
        neg_rows = _read_jsonl(root / "negatives.jsonl")
        U = len(seq_rows)
        seqs = [_readonly(np.zeros(0, dtype=np.int64))]
        timestamps = [_readonly(np.zeros(0, dtype=np.int64))]
        raw_users = [""]
        for r in seq_rows:
            seqs.append(_readonly(np.asarray(r["iids"], dtype=np.int64)))
            timestamps.append(_readonly(np.asarray(r["timestamps"], dtype=np.int64)))
            raw_users.append(str(r["user"]))
        raw_items = [""] + [str(r["item"]) for r in items]
        m = len(neg_rows[0]["valid"]) if neg_rows else 0
        valid_neg = np.zeros((U + 1, m), dtype=np.int64)
        test_neg = np.zeros((U + 1, m), dtype=np.int64)
        for r in neg_rows:
            valid_neg[r["uid"]] = r["valid"]
            test_neg[r["uid"]] = r["test"]

    if len(raw_items) != len(titles) or valid_neg.shape[0] != U + 1 or len(raw_users) != U + 1:
        raise InputError(f"{root}: files disagree on the number of users/items "
                         f"(re-run `llmsrec prepare --force`)")
    return PreparedDataset(root, seqs, timestamps, raw_users, raw_items, titles,
                           descriptions, _readonly(valid_neg), _readonly(test_neg), stats,
                           digest)
