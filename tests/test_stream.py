"""Streamed heads training and evaluation (``train --stream``) against the in-memory path."""

import json

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llmsrec.cache.stream import BatchFeeder, RowStore, epoch_order
from llmsrec.cache.verify import row_crcs
from llmsrec.data import prepare_from_interactions
from llmsrec.errors import InputError
from llmsrec.heads.train import evaluate_heads, load_cached_tensors, should_stream, train_heads

D_LLM, D_CF = 12, 4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_cache(path, ds, rng, *, chunk_rows=None, store=np.float32, crcs=False):
    """A cache in the docs/cache-schema.md layout (h_u = h_target + noise), state datasets
    chunked by ``chunk_rows`` rows (None: contiguous, as every cache before chunking)."""
    U, N = ds.n_users, ds.n_items
    item_h = rng.normal(size=(N + 1, D_LLM)).astype(np.float32)
    item_h[0] = 0
    chunks = None if chunk_rows is None else (chunk_rows, D_LLM)
    with h5py.File(path, "w") as f:
        f["items/hidden"] = item_h
        f["items/cf"] = rng.normal(size=(N + 1, D_CF)).astype(np.float32)
        f["progress/items"] = np.ones(1, dtype=bool)
        for v in ("train", "valid", "test"):
            _, targets = ds.view(v)
            h = (item_h[targets] + 0.3 * rng.normal(size=(U + 1, D_LLM))).astype(store)
            h[0] = 0
            f.create_dataset(f"users/{v}/hidden", data=h, chunks=chunks)
            if crcs:
                f[f"checksums/users/{v}/hidden"] = row_crcs(h, store)
            f[f"users/{v}/cf"] = (h.astype(np.float32) @ rng.normal(size=(D_LLM, D_CF))).astype(np.float32)
            f[f"users/{v}/target"] = targets.astype(np.int64)
            f[f"progress/users/{v}"] = np.ones(1, dtype=bool)
        prov = {"dataset_sha256": ds.digest, "max_users": None}
        if store != np.float32:
            prov["store_dtype"] = "float16"
        f.attrs["provenance"] = json.dumps(prov)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 60-user dataset and two caches of the same states: contiguous (as older caches are)
    and chunked by 8 rows with row checksums."""
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(11)
    rows = []
    for u in range(60):
        items = rng.choice(50, size=9, replace=False)
        rows += [(f"u{u}", f"i{i}", 1000 * u + t) for t, i in enumerate(items)]
    ds = prepare_from_interactions(rows, {f"i{i}": f"Item {i}" for i in range(50)}, root / "data",
                                   kcore=3, num_negatives=15, seed=0)
    write_cache(root / "flat.h5", ds, np.random.default_rng(3))
    write_cache(root / "chunked.h5", ds, np.random.default_rng(3), chunk_rows=8, crcs=True)
    return ds, root


OPTS = dict(hidden=32, d_out=16, cf_hidden=8, lr=3e-3, epochs=3, evals_per_epoch=2, batch_size=7, seed=1)


@pytest.mark.parametrize("cache", ["flat.h5", "chunked.h5"])
@pytest.mark.parametrize("negatives,distill", [("all", "mse"), (3, "none"), ("all", "contrastive")])
def test_streamed_equals_in_memory_when_the_buffer_covers_the_view(inputs, tmp_path, cache, negatives, distill):
    ds, root = inputs
    opts = dict(OPTS, train_negatives=negatives, distill=distill)
    mem = train_heads(ds, root / cache, tmp_path / "mem", progress=False, stream=False, **opts)
    st = train_heads(ds, root / cache, tmp_path / "st", progress=False, stream=True, shuffle_buffer=0, **opts)
    assert "stream" not in mem and st["stream"]["shuffle_buffer"] == 0
    assert st["steps"] == mem["steps"] and st["best"] == mem["best"]
    for split in ("valid", "test"):
        assert st[split] == mem[split], split
    h1 = (tmp_path / "mem" / "history.jsonl").read_text().splitlines()
    h2 = (tmp_path / "st" / "history.jsonl").read_text().splitlines()
    drop = lambda line: {k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
    assert [drop(x) for x in h1] == [drop(x) for x in h2]
    w1, w2 = load_file(tmp_path / "mem" / "heads.safetensors"), load_file(tmp_path / "st" / "heads.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    # evaluation of saved heads, streamed block by block: the same metrics
    assert evaluate_heads(ds, root / cache, tmp_path / "st", stream=True) == \
        evaluate_heads(ds, root / cache, tmp_path / "st", stream=False)


def test_streamed_with_a_small_buffer_is_deterministic_and_learns(inputs, tmp_path):
    ds, root = inputs
    runs = [train_heads(ds, root / "chunked.h5", tmp_path / str(i), progress=False, stream=True, shuffle_buffer=16,
                        **OPTS) for i in range(2)]
    assert runs[0]["valid"] == runs[1]["valid"] and runs[0]["best"] == runs[1]["best"]
    # 16 candidates: a random ranking's HR@10 is 10/16; the planted h_u = h_target + noise is found
    assert runs[0]["test"]["HR@10"] > 0.9


def test_epoch_order():
    rows = np.arange(1, 101, dtype=np.int64)
    a, b = np.random.default_rng(4), np.random.default_rng(4)
    assert np.array_equal(epoch_order(rows, 8, 0, a), b.permutation(rows))
    assert np.array_equal(epoch_order(rows, 8, 100, a), b.permutation(rows))
    order = epoch_order(rows, 8, 16, np.random.default_rng(5))
    assert sorted(order) == list(rows)
    # windows of 16 // 8 = 2 chunks: the chunks taken in pairs (in the order they first
    # appear), the rows of each pair fill a contiguous stretch of the order
    pos = {int(c): np.flatnonzero(order // 8 == c) for c in np.unique(order // 8)}
    firsts = sorted(pos, key=lambda c: pos[c][0])
    at = 0
    for i in range(0, len(firsts), 2):
        p = np.sort(np.concatenate([pos[c] for c in firsts[i : i + 2]]))
        assert np.array_equal(p, np.arange(at, at + len(p)))
        at += len(p)
    assert not np.array_equal(order, np.sort(order))


def test_feeder_reads_each_row_once_and_only_the_ranks_rows(inputs):
    _, root = inputs
    store = RowStore(root / "chunked.h5")
    h = store.rows("users/train/hidden")
    with h5py.File(root / "chunked.h5") as f:
        want = f["users/train/hidden"][()]
    batches = [np.array([5, 1, 9]), np.array([], dtype=np.int64), np.array([33, 2])]
    got = list(BatchFeeder([h], batches, group_rows=2))
    assert len(got) == 3
    for b, (arr,) in zip(batches, got):
        assert np.array_equal(arr, want[b])
    assert store.rows_read == 5 and store.bytes_read == 5 * D_LLM * 4
    store.close()


def test_damaged_row_is_reported(inputs, tmp_path):
    ds, root = inputs
    bad = tmp_path / "bad.h5"
    bad.write_bytes((root / "chunked.h5").read_bytes())
    with h5py.File(bad, "r+") as f:
        f["users/train/hidden"][17] += 1.0
    store = RowStore(bad)
    with pytest.raises(InputError, match="row 17 differs from its checksum"):
        store.rows("users/train/hidden").read(np.arange(10, 30))
    store.close()


def test_float16_streamed_reads_equal_in_memory(inputs, tmp_path):
    ds, _ = inputs
    cache = tmp_path / "half.h5"
    write_cache(cache, ds, np.random.default_rng(3), chunk_rows=16, store=np.float16, crcs=True)
    mem = load_cached_tensors(ds, cache, stream=False)
    st = load_cached_tensors(ds, cache, stream=True)
    assert st.streamed and not mem.streamed
    rows = np.arange(len(mem.train_hidden))
    assert np.array_equal(st.train_hidden.read(rows), mem.train_hidden)
    assert np.array_equal(st.eval_hidden["test"].read(rows), mem.eval_hidden["test"])
    assert st.train_hidden.read(rows).dtype == np.float32


def test_should_stream(inputs):
    ds, root = inputs
    from llmsrec.cache import open_cache

    with open_cache(root / "flat.h5") as r:
        assert should_stream(None, r, ["train", "valid", "test"]) is False  # a few KB
        assert should_stream(False, r, ["train"]) is False
        assert should_stream(True, r, ["train"]) is True
        assert should_stream(None, r, ["train"], user_readout="layers") is False
        with pytest.raises(InputError, match="--stream: readouts layers/out"):
            should_stream(True, r, ["train"], user_readout="layers")
        with pytest.raises(InputError, match="--prefixes 2"):
            should_stream(True, r, ["train"], prefixes=2)


def test_an_item_table_larger_than_memory_is_one_line_before_it_is_read(inputs, monkeypatch):
    """The item table is always in memory: one that does not fit is refused up front, sized."""
    import llmsrec.heads.train as ht
    from llmsrec.cache import open_cache

    ds, root = inputs
    with open_cache(root / "flat.h5") as r:
        n, h = r.f["items"]["hidden"].shape
    monkeypatch.setattr(ht, "available_memory", lambda: 4 * n * h)  # exactly the table: it fits
    load_cached_tensors(ds, root / "flat.h5")
    monkeypatch.setattr(ht, "available_memory", lambda: 4 * n * h - 1)
    with pytest.raises(InputError, match=rf"^{root / 'flat.h5'}: the item table \({n - 1:,} items, readout out\) "
                                         r"needs 0\.0 GB of memory and 0\.0 GB are available; it is held in memory, "
                                         r"not streamed"):
        load_cached_tensors(ds, root / "flat.h5", stream=True)
    monkeypatch.setattr(ht, "available_memory", lambda: 0)  # unknown: no check
    load_cached_tensors(ds, root / "flat.h5")


def test_cli_stream_options(inputs, tmp_path):
    from click.testing import CliRunner

    from llmsrec.cli import main

    ds, root = inputs
    args = ["train", "--data", str(ds.root), "--cache", str(root / "chunked.h5"), "--no-progress",
            "--hidden", "32", "--d-out", "16", "--cf-hidden", "8", "--epochs", "1", "--batch-size", "7",
            "--paper-settings"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a"), "--stream", "--shuffle-buffer", "16"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["stream"]["shuffle_buffer"] == 16 and res["stream"]["fit_bytes_read_per_rank"][0] > 0
    config = (tmp_path / "a" / "config.toml").read_text()
    assert "stream = true" in config and "shuffle-buffer = 16" in config
    r = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "a" / "config.toml"), "--out",
                                  str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "results.json").read_text())["test"] == res["test"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "c"), "--in-memory"])
    assert r.exit_code == 0, r.output
    assert "stream" not in json.loads((tmp_path / "c" / "results.json").read_text())
    # the default heads read the layers+slots readouts: streamed reads are for --paper-settings heads
    r = CliRunner().invoke(main, [*args[:-1], "--prefixes", "1", "--out", str(tmp_path / "d"), "--stream"])
    assert r.exit_code != 0 and "--stream: readouts layers+slots/layers+soft" in r.output


def test_new_caches_chunk_their_states(tmp_path):
    from llmsrec.cache.store import CacheWriter, state_chunks

    assert state_chunks((100_000, 576), 4) == (512, 576)
    assert state_chunks((100_000, 576), 2) == (1024, 576)
    assert state_chunks((100_000, 3072), 4) == (128, 3072)
    assert state_chunks((100_000, 4, 576), 4) == (128, 4, 576)
    assert state_chunks((7, 576), 4) == (7, 576)
    w = CacheWriter(tmp_path / "c.h5", {"x": 1}, log=lambda m: None)
    assert w.needs(["users/test"])
    w.require("users/test/hidden", shape=(3000, 576), dtype=np.float32)
    w.require("users/test/cf", np.ones((3000, 4), np.float32))
    w.require("users/test/out_layers", shape=(3000, 2, 576), dtype=np.float32)
    assert w.f["users/test/hidden"].chunks == (512, 576)
    assert w.f["users/test/out_layers"].chunks == (256, 2, 576)
    assert w.f["users/test/cf"].chunks is None  # written whole: contiguous, as before
    assert w.f["users/test/hidden"].id.get_num_chunks() == 6  # every chunk allocated at setup
    w.close()


def test_in_memory_scoring_in_blocks_equals_one_piece(inputs, monkeypatch):
    from llmsrec.heads import train as T
    from llmsrec.heads.model import HeadsConfig, LLMSRecHeads

    ds, root = inputs
    data = load_cached_tensors(ds, root / "flat.h5")
    torch.manual_seed(0)
    heads = LLMSRecHeads(HeadsConfig(d_llm=D_LLM, d_cf=D_CF, d_out=8, hidden=16, cf_hidden=8))
    whole = T.score_candidates(heads, data.eval_hidden["test"], data.item_hidden, data.candidates["test"])
    monkeypatch.setattr(T, "IN_MEMORY_SCORE_BLOCK", 7)
    blocks = T.score_candidates(heads, data.eval_hidden["test"], data.item_hidden, data.candidates["test"])
    np.testing.assert_allclose(blocks, whole, rtol=0, atol=1e-6)
    assert T.evaluate_on_tensors(heads, data, ("test",))["test"] == pytest.approx(T.ranking_metrics(whole))


def test_full_ranking_reads_the_view_block_by_block_with_the_in_memory_ranks(inputs, tmp_path):
    from llmsrec.evaluate.full_ranking import full_metrics, full_ranking_heads
    from llmsrec.heads.model import load_heads

    ds, root = inputs
    train_heads(ds, root / "chunked.h5", tmp_path / "h", progress=False, stream=False, **dict(OPTS, epochs=1))
    heads = load_heads(tmp_path / "h")
    with h5py.File(root / "chunked.h5", "r") as f, torch.no_grad():
        items = heads.item(torch.from_numpy(f["items/hidden"][()]))
        want = {}
        for split in ("valid", "test"):
            inputs_, targets = ds.view(split)
            users = heads.user(torch.from_numpy(f[f"users/{split}/hidden"][1:]))
            want[split] = full_metrics(users, items, [np.asarray(x) for x in inputs_[1:]], targets[1:])
    for block_rows in (7, 4096):  # 60 users: 9 blocks, or one
        got = full_ranking_heads(ds, tmp_path / "h", cache=root / "chunked.h5", block_rows=block_rows)
        assert got.keys() == want.keys()
        for split in want:
            assert got[split] == pytest.approx(want[split], abs=1e-12), (block_rows, split)
    assert want["test"]["HR@10"] > 0.5  # the planted states are found among 50 items


def test_streamed_sweep_gives_the_in_memory_records(inputs, tmp_path):
    from llmsrec.experiments.sweep import sweep

    ds, root = inputs
    grid = tmp_path / "grid.toml"
    grid.write_text("[grid]\nlr = [3e-3, 1e-2]\nseed = [0, 1]\n[fixed]\nepochs = 2\nbatch_size = 7\nhidden = 32\n"
                    "d_out = 16\ncf_hidden = 8\ntrain_negatives = 3\nevals_per_epoch = 2\n")
    runs = {}
    for name, kw in (("mem", dict(stream=False)), ("st", dict(stream=True, shuffle_buffer=0, stack=2))):
        res = sweep(ds, root / "chunked.h5", grid, tmp_path / name, progress=False, log=lambda m: None, **kw)
        lines = [json.loads(x) for x in (tmp_path / name / "sweep.jsonl").read_text().splitlines()]
        runs[name] = (res, [{k: v for k, v in x.items() if k != "seconds"} for x in lines])
    (mem, mem_lines), (st, st_lines) = runs["mem"], runs["st"]
    assert "streamed" not in mem and st["streamed"] is True
    assert len(st_lines) == 4 and st_lines == mem_lines  # stack 2 asked: streamed variants train alone
    assert st["best"]["test"] == mem["best"]["test"] and st["best"]["options"] == mem["best"]["options"]
    with pytest.raises(InputError, match="prefixes"):
        sweep(ds, root / "chunked.h5", grid, tmp_path / "bad", base={"prefixes": 2}, stream=True, progress=False,
              log=lambda m: None)
