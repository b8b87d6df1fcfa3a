"""The cache writer/reader on their own (no model): atomicity, resume, provenance."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from llmsrec.cache import CacheWriter, open_cache, provenance_diff
from llmsrec.cache import tmp_path as building
from llmsrec.errors import InputError

PROV = {"model": "m", "history_window": 10, "dataset_sha256": "abc"}


def _build(out, prov=PROV, *, stop_after=None, force=False, log=None):
    """Write items (6 rows, chunks of 2) + one view; optionally stop (as if killed)."""
    w = CacheWriter(out, prov, force=force, log=log or (lambda m: None))
    if not w.needs(["items", "users/test"]):
        return w, 0
    w.require("items/hidden", shape=(7, 3), dtype=np.float32)
    w.require("users/test/hidden", shape=(4, 3), dtype=np.float32)
    w.require("users/test/target", np.array([0, 5, 6, 1]))
    for name in ("f_I/weight", "f_I/bias", "tokens/user_out", "tokens/item_out"):
        w.require(f"params/{name}", np.ones(3, dtype=np.float32))
    todo = [("items", c, np.arange(1 + 2 * c, 3 + 2 * c), "items/hidden")
            for c, d in enumerate(w.require_progress("items", 3, 2)) if not d]
    todo += [("users/test", 0, np.array([1, 2, 3]), "users/test/hidden")] \
        if not w.require_progress("users/test", 1, 3)[0] else []
    w.flush()
    written = 0
    for g, c, rows, name in todo:
        if stop_after is not None and written == stop_after:
            w.close()  # the process dies here
            return w, written
        w.write_rows(name, rows[::-1], np.repeat(rows[::-1, None], 3, 1).astype(np.float32))
        w.mark_done(g, c)
        written += 1
    w.finish()
    return w, written


def test_provenance_diff():
    assert provenance_diff({"a": 1, "b": 2}, {"a": 1}) is None
    assert provenance_diff({"a": 1, "b": 2}, {"a": 1, "b": 3}) == "b"
    assert provenance_diff({"a": 1}, {"c": 1}) == "c"


def test_resume_builds_same_file(tmp_path):
    out = tmp_path / "c.h5"
    _, n = _build(out, stop_after=2)
    assert n == 2 and not out.exists() and building(out).exists()
    w, n = _build(out)
    assert n == 2 and w.resumed  # the 2 remaining chunks only
    with open_cache(out) as c:
        np.testing.assert_array_equal(c.item_hidden()[:, 0], np.arange(7))
        np.testing.assert_array_equal(c.f["users/test/hidden"][:, 2], np.arange(4))
        assert c.views == ["test"]
        np.testing.assert_array_equal(c.targets("test"), [0, 5, 6, 1])
        assert c.permutation("test") is None
    assert not building(out).exists()


def test_complete_file_is_not_rewritten(tmp_path):
    out = tmp_path / "c.h5"
    _build(out)
    mtime = out.stat().st_mtime_ns
    w, n = _build(out)
    assert n == 0 and out.stat().st_mtime_ns == mtime


def test_mismatch_names_field_and_force_rebuilds(tmp_path):
    out = tmp_path / "c.h5"
    _build(out)
    with pytest.raises(InputError, match="'history_window'.*cache: 10, asked: 5"):
        _build(out, {**PROV, "history_window": 5})
    _build(out, {**PROV, "history_window": 5}, force=True)
    with open_cache(out) as c:
        assert c.provenance["history_window"] == 5


def test_unfinished_build_with_other_provenance(tmp_path):
    out = tmp_path / "c.h5"
    _build(out, stop_after=1)
    with pytest.raises(InputError, match="unfinished build.*'model'"):
        _build(out, {**PROV, "model": "other"})
    _, n = _build(out, {**PROV, "model": "other"}, force=True)
    assert n == 4  # started over


def test_corrupt_tmp_and_non_cache_files(tmp_path):
    out = tmp_path / "c.h5"
    building(out).write_bytes(b"not hdf5 at all")
    msgs = []
    _, n = _build(out, log=msgs.append)
    assert n == 4 and out.exists() and any("starting over" in m for m in msgs)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(InputError, match="not an llmsrec cache"):
        open_cache(other)
    with pytest.raises(InputError, match="not an llmsrec cache"):
        _build(other)
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a readable"):
        open_cache(tmp_path / "junk.h5")


def test_missing_parent_folder_is_created(tmp_path):
    out = tmp_path / "new" / "sub" / "c.h5"
    _build(out)
    with open_cache(out) as c:
        assert c.views == ["test"]


def _virtual_cache(tmp_path, shard_prov=PROV, dataset="items/hidden"):
    """c.h5 whose /items/hidden (7, 3) reads rows 1..6 from c.h5.shards/rank0-of-1.h5."""
    import json

    shard = tmp_path / "c.h5.shards" / "rank0-of-1.h5"
    shard.parent.mkdir(exist_ok=True)
    with h5py.File(shard, "w") as f:
        f.attrs["provenance"] = json.dumps(shard_prov)
        f[dataset] = np.arange(18, dtype=np.float32).reshape(6, 3)
    out = tmp_path / "c.h5"
    if not out.exists():
        w = CacheWriter(out, PROV, log=lambda m: None)
        assert w.needs(["items"])
        w.require_virtual("items/hidden", (7, 3), np.float32,
                          [("c.h5.shards/rank0-of-1.h5", "items/hidden", 1, 6)])
        w.set_progress_done("items", 1, 6)
        w.finish()
    return out, shard


def test_virtual_cache_refuses_foreign_or_broken_shards(tmp_path):
    out, shard = _virtual_cache(tmp_path)
    with open_cache(out) as c:
        np.testing.assert_array_equal(c.item_hidden()[1:].ravel(), np.arange(18))
    # a shard of another cache (e.g. window-10 shards beside a window-5 cache): refused
    _virtual_cache(tmp_path, {**PROV, "history_window": 5})
    with pytest.raises(InputError) as e:
        open_cache(out)
    msg = str(e.value)
    assert "\n" not in msg and str(shard) in msg
    assert "belongs to another cache: provenance field 'history_window' differs (shard: 5, cache: 10)" in msg
    _virtual_cache(tmp_path, {**PROV, "extra": 1})  # a field only the shard has also counts
    with pytest.raises(InputError, match="field 'extra'"):
        open_cache(out)
    # a shard without the mapped dataset: one line, not h5py's "component not found"
    _virtual_cache(tmp_path, dataset="users/test/hidden")
    with pytest.raises(InputError, match=r"rank0-of-1\.h5 lacks /items/hidden, which /items/hidden reads"):
        open_cache(out)
    shard.unlink()
    with pytest.raises(InputError, match="which is missing"):
        open_cache(out)


def test_remove_unused_shards_keeps_what_a_virtual_cache_reads(tmp_path):
    from llmsrec.precompute.shards import remove_unused_shards

    out, shard = _virtual_cache(tmp_path)
    folder = shard.parent
    for name in ("rank0-of-2.h5.tmp", "rank1-of-2.h5", "notes.txt"):
        (folder / name).write_text("x")
    msgs = []
    assert remove_unused_shards(out, msgs.append) == ["rank0-of-2.h5.tmp", "rank1-of-2.h5"]
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "rank0-of-1.h5"]
    assert msgs == [f"removed 2 shard file(s) {out} does not use from {folder}: rank0-of-2.h5.tmp, rank1-of-2.h5"]
    with open_cache(out) as c:
        assert c.item_hidden()[6, 2] == 17
    assert remove_unused_shards(out, msgs.append) == [] and len(msgs) == 1  # nothing to say


def test_float16_store_halves_the_states_and_reads_back_float32(tmp_path):
    """provenance store_dtype float16: the state datasets are stored as float16 (their row
    checksums over the stored values), everything else as given; the reader upcasts to float32.
    A float32 cache has no store_dtype in its provenance."""
    from llmsrec.cache.verify import verify_cache

    prov16 = {**PROV, "store_dtype": "float16"}
    _build(tmp_path / "h.h5", prov16)
    _build(tmp_path / "f.h5")
    with h5py.File(tmp_path / "h.h5") as f:
        assert f["items/hidden"].dtype == np.float16 and f["users/test/target"].dtype == np.int64
        assert f["params/f_I/weight"].dtype == np.float32
    with open_cache(tmp_path / "h.h5") as a, open_cache(tmp_path / "f.h5") as b:
        assert a.store_dtype == "float16" and b.store_dtype == "float32"
        assert "store_dtype" not in b.provenance
        h = a.item_hidden()
        assert h.dtype == np.float32 and np.array_equal(h, b.item_hidden())  # small integers: exact
        assert a.user_hidden("test").dtype == np.float32
    rep = verify_cache(tmp_path / "h.h5")
    assert rep["ok"] and "/items/hidden" in rep["checked"]
    # rounding to nearest, and a state beyond float16's range is refused, not stored as inf
    w = CacheWriter(tmp_path / "r.h5", prov16, log=lambda m: None)
    assert w.needs(["items"])
    w.require("items/hidden", shape=(3, 2), dtype=np.float32)
    w.write_rows("items/hidden", np.array([1]), np.array([[1 + 2 ** -12, 3.14159]], dtype=np.float32))
    assert np.array_equal(w.read("items/hidden")[1], np.array([1, 3.14159], dtype=np.float16))
    with pytest.raises(InputError, match="float16's range"):
        w.write_rows("items/hidden", np.array([2]), np.array([[7e4, 0]], dtype=np.float32))
    w.close()
    with pytest.raises(InputError, match="store dtype"):
        CacheWriter(tmp_path / "x.h5", {**PROV, "store_dtype": "int8"}, log=lambda m: None)
