"""Richer readouts and prefix samples: prompt trees, the prefix view, the cache, the heads.

A tiny random-weight LLaMA (hidden 32, 2 layers) and the tiny dataset of test_precompute.
"""

from __future__ import annotations

import json
import os
import re

import h5py
import numpy as np
import pytest
import torch

from llmsrec.cache import open_cache
from llmsrec.cfsrec import pad_left
from llmsrec.errors import InputError
from llmsrec.heads.model import HeadsConfig, ReadoutEncoder, load_heads
from llmsrec.heads.train import evaluate_heads, load_cached_tensors, train_heads
from llmsrec.precompute import precompute
from llmsrec.precompute.engine import TokenizedPrompt, forward_batch, tokenize_prompts
from llmsrec.precompute.llm import ITEM_OUT, USER_OUT
from llmsrec.data.views import PREFIX_VIEW
from llmsrec.precompute.prompts import (
    TEMPLATES, TEMPLATE_VERSION, build_prefix_view, build_view, item_prompt,
)
from llmsrec.precompute.readouts import (
    as_tree, build_tree, forward_readouts, tokenize_tree, tree_mask,
)
from test_precompute import W, _contents, sasrec  # noqa: F401 (sasrec: a fixture; ds, llm: conftest.py)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 3
LAYERS = (1, 2)
SMALL = dict(hidden=32, d_out=8, cf_hidden=8)


def _precompute(ds, sasrec, llm, out, **kw):
    return precompute(ds, sasrec, out, llm=llm, views=("train", "valid", "test"), history_window=W,
                      chunk_prompts=4, batch_tokens=400, progress=False, log=lambda m: None, **kw)


@pytest.fixture(scope="module")
def rich_cache(ds, sasrec, llm, one_torch_thread, tmp_path_factory):
    """A cache with readout layers (1, 2) and 3 prefix samples per user."""
    return _precompute(ds, sasrec, llm, tmp_path_factory.mktemp("rich") / "c.h5",
                       readout_layers=LAYERS, prefixes=K)


@pytest.fixture(scope="module")
def plain_cache(ds, sasrec, llm, one_torch_thread, tmp_path_factory):
    """A cache built the paper's way: no readouts, no prefix view."""
    return _precompute(ds, sasrec, llm, tmp_path_factory.mktemp("plain") / "c.h5")


def _soft_table(llm, n_items, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_items + 1, llm.d_llm, generator=g)


def _out_vec(llm, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(llm.d_llm, generator=g)


@torch.no_grad()
def _direct(llm, tp: TokenizedPrompt, soft, out_vec, layers, n_slots):
    """An independent one-prompt forward: (hidden (d,), out_layers (nL, d), slots (S, nL, d), n)."""
    ids = torch.from_numpy(tp.ids)[None]
    x = llm.decoder.embed_tokens(ids).clone()
    x[0, torch.from_numpy(tp.soft_pos)] = soft[torch.from_numpy(tp.soft_items)]
    x[0, tp.out_pos] = out_vec
    o = llm.decoder(inputs_embeds=x, output_hidden_states=True, use_cache=False)
    n_layers = llm.decoder.config.num_hidden_layers
    per = [o.last_hidden_state[0] if l == n_layers else o.hidden_states[l][0] for l in layers]
    st = torch.stack(per, 1)  # (L, nL, d)
    sp = tp.soft_pos[-n_slots:]
    slots = torch.zeros(n_slots, len(layers), st.shape[-1])
    if len(sp):
        slots[n_slots - len(sp):] = st[torch.from_numpy(sp)]
    return (o.last_hidden_state[0, tp.out_pos].numpy(), st[tp.out_pos].numpy(), slots.numpy(), len(sp))


def _close_text(verb):
    return TEMPLATES[TEMPLATE_VERSION]["user_close"].format(verb=verb)


# --- 1. the prefix view ---------------------------------------------------------------------

@pytest.mark.parametrize("window", [2, W])
def test_prefix_samples_never_show_their_target(ds, window):
    pp = build_prefix_view(ds, K, history_window=window)
    _, train_targets = ds.view("train")
    train_inputs, _ = ds.view("train")
    close = _close_text("watched movies")
    assert pp.k == K and len(pp.targets) == ds.n_users * K + 1 == len(pp.uids) == len(pp.cf_inputs)
    assert pp.targets[0] == 0 and pp.uids[0] == 0
    n_samples = 0
    started_late = 0
    for u in range(1, ds.n_users + 1):
        seq = np.asarray(ds.seqs[u])
        assert len(set(seq.tolist())) == len(seq)  # no repeats: "not shown" is exact
        base = len(seq) - 3
        ks = [j for j in range(K) if base - j >= 1]
        prompts = pp.prompts[u]
        assert len(prompts) == len(ks)
        start = max(0, base - (len(ks) - 1) - window)
        started_late += start > 0
        for j in range(K):
            row = 1 + (u - 1) * K + j
            if j not in ks:
                assert pp.targets[row] == 0 and pp.uids[row] == 0 and len(pp.cf_inputs[row]) == 0
                continue
            n_samples += 1
            end = len(seq) - 3 - j
            p = prompts[j]
            tgt = int(seq[end])
            assert pp.targets[row] == tgt and pp.uids[row] == u
            np.testing.assert_array_equal(pp.cf_inputs[row], seq[:end])
            # the soft items are exactly the window before the cutoff
            np.testing.assert_array_equal(p.soft_items, seq[start:end])
            assert tgt not in p.soft_items and not set(seq[end:].tolist()) & set(p.soft_items.tolist())
            for later in seq[end:]:
                assert f'"{ds.titles[int(later)]}"' not in p.text
            assert p.text.count("[HistoryEmb]") == end - start
            # each sample's text is sample 0's up to its closing sentence
            assert p.text.endswith(close)
            assert prompts[0].text.startswith(p.text[: -len(close)])
        # sample 0 is the train view; the earliest sample shows a full window (or all it has)
        assert pp.targets[1 + (u - 1) * K] == train_targets[u]
        np.testing.assert_array_equal(pp.cf_inputs[1 + (u - 1) * K], train_inputs[u])
        assert len(prompts[-1].soft_items) == min(window, base - (len(ks) - 1))
        assert len(prompts[0].soft_items) == min(window + len(ks) - 1, base)
    assert n_samples == int((pp.targets > 0).sum()) and n_samples > ds.n_users
    assert int((pp.targets > 0).sum()) < ds.n_users * K  # some users have fewer than K samples
    if window == 2:
        assert started_late > 0  # the window really starts after the first item for some users
    with pytest.raises(InputError, match="--prefixes"):
        build_prefix_view(ds, 0)


# --- 2. prompt trees equal direct forwards ----------------------------------------------------

def test_tree_states_equal_direct_forward(llm, ds):
    pp = build_prefix_view(ds, K, history_window=W)
    soft, out = _soft_table(llm, ds.n_items), _out_vec(llm)
    users = [u for u in range(1, ds.n_users + 1) if pp.prompts[u]][:5]
    assert {len(pp.prompts[u]) for u in users} == {2, 3}  # users with 2 and with 3 samples
    trees, refs, long_trunks = [], [], 0
    for u in users:
        tree = tokenize_tree(llm, pp.prompts[u], USER_OUT)
        toks = tokenize_prompts(llm, pp.prompts[u], USER_OUT)
        assert len(tree) < sum(len(t) for t in toks)  # the shared beginning runs once
        assert len(tree.out_pos) == len(toks)
        r = forward_readouts(llm, [tree], soft, out, LAYERS, W)
        assert r["hidden"].shape == (len(toks), llm.d_llm)
        assert r["out_layers"].shape == (len(toks), 2, llm.d_llm)
        assert r["slots"].shape == (len(toks), W, 2, llm.d_llm) and r["slots"].dtype == np.float32
        for s, tp in enumerate(toks):
            h, ol, sl, n = _direct(llm, tp, soft, out, LAYERS, W)
            np.testing.assert_allclose(r["hidden"][s], h, atol=1e-4)
            np.testing.assert_allclose(r["out_layers"][s], ol, atol=1e-4)
            np.testing.assert_allclose(r["slots"][s], sl, atol=1e-4)
            assert r["n_slots"][s] == n == min(W, len(tp.soft_pos))
            # the last layer's readout is the (normed) last hidden state
            np.testing.assert_allclose(r["out_layers"][s, 1], r["hidden"][s], atol=1e-6)
            # hidden equals the engine's forward_batch, too
            np.testing.assert_allclose(r["hidden"][s], forward_batch(llm, [tp], soft, out)[0].numpy(), atol=1e-4)
        long_trunks += len(toks[0].soft_pos) > W  # its slots keep the last W
        trees.append(tree)
        refs.append(r)
    assert long_trunks > 0
    # a sample with fewer than W items has zero left slots
    short = [(k, s) for k, r in enumerate(refs) for s in range(len(r["n_slots"])) if r["n_slots"][s] < W]
    assert short
    for k, s in short:
        n = refs[k]["n_slots"][s]
        assert not refs[k]["slots"][s, : W - n].any() and np.abs(refs[k]["slots"][s, W - n:]).sum(-1).all()
    # several trees (and a plain prompt) padded together equal each alone
    single = as_tree(tokenize_prompts(llm, [build_view(ds, "test", history_window=W).prompts[2]], USER_OUT)[0])
    alone = refs + [forward_readouts(llm, [single], soft, out, LAYERS, W)]
    assert len({len(t) for t in trees + [single]}) > 1  # really padded
    batch = forward_readouts(llm, trees + [single], soft, out, LAYERS, W)
    for key in ("hidden", "out_layers", "slots"):
        np.testing.assert_allclose(batch[key], np.concatenate([a[key] for a in alone]), atol=1e-4, err_msg=key)
    np.testing.assert_array_equal(batch["n_slots"], np.concatenate([a["n_slots"] for a in alone]))
    with pytest.raises(InputError, match="layer 3"):
        forward_readouts(llm, [single], soft, out, (1, 3), W)


# --- 3. the mask ----------------------------------------------------------------------------

def _tp(ids, soft_pos, soft_items, out_pos):
    return TokenizedPrompt(np.asarray(ids, dtype=np.int64), np.asarray(soft_pos, dtype=np.int64),
                           np.asarray(soft_items, dtype=np.int64), out_pos)


def test_tree_mask_exact_pattern():
    #             0   1  2   3  4   5   6 (out)
    trunk = _tp([10, 5, 11, 5, 12, 13, 99], [1, 3], [7, 8], 6)
    a = _tp([10, 5, 11, 5, 20, 99], [1, 3], [7, 8], 5)  # leaves the trunk at 4
    b = _tp([10, 5, 11, 21, 99], [1], [7], 4)  # leaves the trunk at 3
    t = build_tree([trunk, a, b])
    assert t.ids.tolist() == [10, 5, 11, 5, 12, 13, 99, 20, 99, 21, 99]
    assert t.pos.tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 3, 4]
    assert t.seen.tolist() == [1, 2, 3, 4, 5, 6, 7, 4, 4, 3, 3]
    assert t.branch.tolist() == [0] * 7 + [1, 1, 2, 2]
    assert t.out_pos.tolist() == [6, 8, 10]
    assert t.soft_pos.tolist() == [1, 3] and t.soft_items.tolist() == [7, 8]
    assert [s.tolist() for s in t.slot_pos] == [[1, 3], [1, 3], [1]]
    m = tree_mask([t], torch.float32)
    assert m.shape == (1, 1, 11, 11)
    allow = (m[0, 0] == 0).int().tolist()
    expect = [
        # keys: 0  1  2  3  4  5  6  7  8  9 10
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0],  # branch 1 (from 4): trunk 0..3, itself
        [1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0],  # branch 2 (from 3): trunk 0..2, never branch 1
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1],
    ]
    assert allow == expect
    assert set(m.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    # a 2-sample tree padded with it: the padding rows/keys are masked, pad rows see key 0 only
    small = build_tree([_tp([10, 5, 11, 99], [1], [7], 3), _tp([10, 5, 22, 99], [1], [7], 3)])
    assert small.ids.tolist() == [10, 5, 11, 99, 22, 99] and small.pos.tolist() == [0, 1, 2, 3, 2, 3]
    mb = tree_mask([t, small], torch.float16)
    assert mb.dtype == torch.float16 and mb.shape == (2, 1, 11, 11)
    assert torch.equal(mb[0, 0] == 0, m[0, 0] == 0)
    allow2 = (mb[1, 0] == 0).int()
    assert allow2[:6, :6].tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 0, 1, 1],
    ]
    assert not allow2[:6, 6:].any()
    assert allow2[6:].tolist() == [[1] + [0] * 10] * 5
    # a one-prompt tree is the causal mask
    one = as_tree(trunk)
    assert torch.equal(tree_mask([one], torch.float32)[0, 0] == 0, torch.ones(7, 7, dtype=torch.bool).tril())
    # not a prefix / other soft items: refused
    with pytest.raises(InputError, match="not a prefix"):
        build_tree([trunk, _tp([42, 5, 99], [1], [7], 2)])
    with pytest.raises(InputError, match="soft tokens differ"):
        build_tree([trunk, _tp([10, 5, 11, 5, 20, 99], [1, 3], [7, 9], 5)])


# --- 4. the cache ---------------------------------------------------------------------------

def test_precompute_readouts_and_prefix_view(llm, ds, sasrec, rich_cache):
    U, N, H = ds.n_users, ds.n_items, llm.d_llm
    pp = build_prefix_view(ds, K, history_window=W)
    with open_cache(rich_cache) as c:
        assert c.provenance["readout_layers"] == [1, 2] and c.provenance["prefixes"] == K
        assert c.readout_layers == (1, 2) and c.prefixes == K
        assert c.views == ["train", "valid", "test", PREFIX_VIEW]
        it = c.readouts("items")
        assert it["out_layers"].shape == (N + 1, 2, H) and it["slots"].shape == (N + 1, 1, 2, H)
        assert it["n_slots"].tolist() == [0] + [1] * N
        for v in ("train", "valid", "test"):
            r = c.readouts(v)
            assert r["out_layers"].shape == (U + 1, 2, H) and r["slots"].shape == (U + 1, W, 2, H)
            assert r["n_slots"].shape == (U + 1,)
        pr = c.readouts(PREFIX_VIEW)
        assert pr["out_layers"].shape == (U * K + 1, 2, H) and pr["slots"].shape == (U * K + 1, W, 2, H)
        assert c.user_hidden(PREFIX_VIEW).shape == (U * K + 1, H)
        np.testing.assert_array_equal(c.targets(PREFIX_VIEW), pp.targets)
        np.testing.assert_array_equal(c.prefix_uids(), pp.uids)
        p = c.params()
        soft = torch.from_numpy(c.item_cf() @ p["f_I/weight"].T + p["f_I/bias"])
        uo, io = torch.from_numpy(p["tokens/user_out"]), torch.from_numpy(p["tokens/item_out"])
        # test view, one user: cached readouts equal a direct forward
        u = 4
        (tp,) = tokenize_prompts(llm, [build_view(ds, "test", history_window=W).prompts[u]], USER_OUT)
        h, ol, sl, n = _direct(llm, tp, soft, uo, LAYERS, W)
        r = c.readouts("test")
        np.testing.assert_allclose(c.user_hidden("test")[u], h, atol=1e-4)
        np.testing.assert_allclose(r["out_layers"][u], ol, atol=1e-4)
        np.testing.assert_allclose(r["slots"][u], sl, atol=1e-4)
        assert r["n_slots"][u] == n == W
        assert not r["out_layers"][0].any() and not r["slots"][0].any()
        # an item: its slot is its own soft token
        (ti,) = tokenize_prompts(llm, [item_prompt(ds.titles, 5)], ITEM_OUT)
        h, ol, sl, n = _direct(llm, ti, soft, io, LAYERS, 1)
        np.testing.assert_allclose(c.item_hidden()[5], h, atol=1e-4)
        np.testing.assert_allclose(it["out_layers"][5], ol, atol=1e-4)
        np.testing.assert_allclose(it["slots"][5], sl, atol=1e-4)
        # prefix view: every sample row equals a direct forward of its prompt, cf the teacher's O_u
        hid, cf = c.user_hidden(PREFIX_VIEW), c.user_cf(PREFIX_VIEW)
        for u in range(1, U + 1):
            for j in range(K):
                row = 1 + (u - 1) * K + j
                if pp.targets[row] == 0:
                    assert not hid[row].any() and not cf[row].any() and not pr["out_layers"][row].any()
                    continue
                (tp,) = tokenize_prompts(llm, [pp.prompts[u][j]], USER_OUT)
                h, ol, sl, n = _direct(llm, tp, soft, uo, LAYERS, W)
                np.testing.assert_allclose(hid[row], h, atol=1e-4)
                np.testing.assert_allclose(pr["out_layers"][row], ol, atol=1e-4)
                np.testing.assert_allclose(pr["slots"][row], sl, atol=1e-4)
                assert pr["n_slots"][row] == n
                with torch.no_grad():
                    ref = sasrec.user_representation(pad_left([ds.seqs[u][: len(ds.seqs[u]) - 3 - j]], 20))[0]
                np.testing.assert_allclose(cf[row], ref.numpy(), atol=1e-5)


def test_prefix_view_resumes_and_needs_no_readout_layers(llm, ds, sasrec, rich_cache, tmp_path):
    calls = []

    def killer(group, chunk):
        calls.append((group, chunk))
        if group == f"users/{PREFIX_VIEW}" and chunk == 1:
            raise KeyboardInterrupt("simulated kill")

    out = tmp_path / "c.h5"
    with pytest.raises(KeyboardInterrupt):
        _precompute(ds, sasrec, llm, out, readout_layers=LAYERS, prefixes=K, on_chunk=killer)
    resumed = []
    _precompute(ds, sasrec, llm, out, readout_layers=LAYERS, prefixes=K, on_chunk=lambda g, c: resumed.append((g, c)))
    assert resumed and {g for g, _ in resumed} == {f"users/{PREFIX_VIEW}"}
    assert not set(resumed) & set(calls)
    a, b = _contents(rich_cache), _contents(out)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # prefix samples without readout layers: the same out-token states, no readout datasets
    only = _precompute(ds, sasrec, llm, tmp_path / "p.h5", prefixes=K)
    with open_cache(only) as c, open_cache(rich_cache) as r:
        assert c.provenance["prefixes"] == K and "readout_layers" not in c.provenance
        np.testing.assert_allclose(c.user_hidden(PREFIX_VIEW), r.user_hidden(PREFIX_VIEW), atol=1e-5)
        np.testing.assert_array_equal(c.user_cf(PREFIX_VIEW), r.user_cf(PREFIX_VIEW))
        np.testing.assert_allclose(c.user_hidden("test"), r.user_hidden("test"), atol=1e-5)
        with pytest.raises(InputError, match="out_layers"):
            c.readouts(PREFIX_VIEW)
    data = load_cached_tensors(ds, only, prefixes=K)
    assert data.train_hidden.ndim == 2 and len(data.train_users) == int((data.train_targets > 0).sum())


def test_float16_store_holds_the_float32_states_rounded(ds, sasrec, llm, rich_cache, tmp_path):
    """precompute --store-dtype float16: every state dataset is the float32 cache's rounded to
    float16 (same forward), read back as float32; the rest is identical; the heads load it."""
    half = _precompute(ds, sasrec, llm, tmp_path / "h.h5", readout_layers=LAYERS, prefixes=K,
                       store_dtype="float16")
    with open_cache(half) as a, open_cache(rich_cache) as b:
        assert a.provenance == {**b.provenance, "store_dtype": "float16"} and a.store_dtype == "float16"
        pairs = [(a.item_hidden(), b.item_hidden())]
        for v in ("valid", PREFIX_VIEW):
            pairs.append((a.user_hidden(v), b.user_hidden(v)))
            ra, rb = a.readouts(v), b.readouts(v)
            pairs += [(ra["out_layers"], rb["out_layers"]), (ra["slots"], rb["slots"])]
            np.testing.assert_array_equal(ra["n_slots"], rb["n_slots"])
            np.testing.assert_array_equal(a.user_cf(v), b.user_cf(v))
        for x, y in pairs:
            assert x.dtype == np.float32
            np.testing.assert_allclose(x, y.astype(np.float16).astype(np.float32), rtol=2e-3, atol=1e-6)
    with h5py.File(half) as f:
        assert f["items/slots"].dtype == np.float16 and f["users/valid/hidden"].dtype == np.float16
    assert os.path.getsize(half) < 0.75 * os.path.getsize(rich_cache)
    data = load_cached_tensors(ds, half, user_readout="layers+slots", item_readout="layers+soft", prefixes=K)
    assert data.train_hidden.dtype == np.float32

    # the readouts are read straight into the heads' layout, float16 cast to float32 exactly
    with open_cache(half) as a:
        ra = a.readouts("valid")
    v = load_cached_tensors(ds, half, user_readout="layers+slots", item_readout="layers+soft", prefixes=K)
    np.testing.assert_array_equal(v.eval_hidden["valid"][:, :2], ra["out_layers"])
    np.testing.assert_array_equal(v.eval_hidden["valid"][:, 2:].reshape(ra["slots"].shape), ra["slots"])


@pytest.mark.parametrize("block_bytes", [1, 3 * 4 * 2 * 32 * 10, 10**9])
def test_readout_read_into_place_equals_the_whole_read_and_checks_its_sha256(rich_cache, tmp_path, block_bytes):
    """read_checked_into: the values of read_checked written into a strided view, in blocks of
    any size; one changed value in any block is refused with read_checked's one line."""
    import shutil

    from llmsrec.cache.verify import read_checked, read_checked_into

    with h5py.File(rich_cache) as f:
        d = f[f"users/{PREFIX_VIEW}/slots"]
        whole = read_checked(d, rich_cache)
        big = np.full((d.shape[0], 2 + d.shape[1] * d.shape[2], d.shape[3]), -7.0, dtype=np.float32)
        into = big[:, 2:].reshape(d.shape)
        assert np.shares_memory(into, big)
        assert read_checked_into(d, rich_cache, into, block_bytes=block_bytes) is into
    np.testing.assert_array_equal(into, whole)
    assert (big[:, :2] == -7.0).all()  # nothing written outside the view
    bad = tmp_path / "bad.h5"
    shutil.copy(rich_cache, bad)
    with h5py.File(bad, "r+") as f:
        f[f"users/{PREFIX_VIEW}/slots"][4, 1, 0, 3] += 1.0  # row 4: in the second block of 3
    with h5py.File(bad) as f, pytest.raises(
            InputError, match=rf"^{bad}: /users/{PREFIX_VIEW}/slots: its sha256 differs from the one recorded "
                              r"when it was written: the file is damaged; rebuild it \(precompute --force\) or "
                              r"check it with `llmsrec verify`$"):
        read_checked_into(f[f"users/{PREFIX_VIEW}/slots"], bad, np.empty(whole.shape, np.float32), block_bytes)


def test_plain_cache_provenance_has_no_readout_keys(plain_cache):
    with open_cache(plain_cache) as c:
        assert "readout_layers" not in c.provenance and "prefixes" not in c.provenance
        assert c.readout_layers == () and c.prefixes == 1
        assert PREFIX_VIEW not in c.views


# --- 5. a cache without readouts --------------------------------------------------------------

def test_cache_without_readouts_errors_and_paper_readout_loads(ds, plain_cache):
    with open_cache(plain_cache) as c:
        with pytest.raises(InputError, match="out_layers"):
            c.readouts("test")
        with pytest.raises(InputError, match="out_layers"):
            c.readouts("items")
        train_h, item_h = c.user_hidden("train"), c.item_hidden()
    with pytest.raises(InputError, match="out_layers"):
        load_cached_tensors(ds, plain_cache, user_readout="layers")
    with pytest.raises(InputError, match="out_layers"):
        load_cached_tensors(ds, plain_cache, item_readout="soft")
    with pytest.raises(InputError, match="--prefixes 2"):
        load_cached_tensors(ds, plain_cache, prefixes=2)
    data = load_cached_tensors(ds, plain_cache)
    assert data.user_readout == data.item_readout == "out" and data.n_layers == 0
    np.testing.assert_array_equal(data.train_hidden, train_h)
    np.testing.assert_array_equal(data.item_hidden, item_h)
    assert data.train_hidden.shape == (ds.n_users + 1, item_h.shape[1])


def test_rich_cache_loads_readout_tensors(ds, rich_cache):
    with open_cache(rich_cache) as c:
        pr, it, te = c.readouts(PREFIX_VIEW), c.readouts("items"), c.readouts("test")
        tg = c.targets(PREFIX_VIEW)
        pcf = c.user_cf(PREFIX_VIEW)
    data = load_cached_tensors(ds, rich_cache, user_readout="layers+slots", item_readout="layers+soft", prefixes=K)
    rows = np.flatnonzero(tg > 0)
    n_tok = 2 + W * 2
    assert data.train_hidden.shape == (len(rows) + 1, n_tok, pr["out_layers"].shape[-1])
    assert data.n_layers == 2 and data.n_slots == W
    np.testing.assert_array_equal(data.train_users, np.arange(1, len(rows) + 1))
    np.testing.assert_array_equal(data.train_targets[1:], tg[rows])
    np.testing.assert_array_equal(data.train_cf[1:], pcf[rows])
    # layout: the out-token layers, then the slots slot-major
    r = rows[5]
    np.testing.assert_array_equal(data.train_hidden[6, :2], pr["out_layers"][r])
    np.testing.assert_array_equal(data.train_hidden[6, 2:].reshape(W, 2, -1), pr["slots"][r])
    np.testing.assert_array_equal(data.item_hidden[:, :2], it["out_layers"])
    np.testing.assert_array_equal(data.item_hidden[:, 2:], it["slots"][:, 0])
    np.testing.assert_array_equal(data.eval_hidden["test"][:, :2], te["out_layers"])
    # each sample excludes its user's training sequence
    with open_cache(rich_cache) as c:
        uids = c.prefix_uids()[rows]
    for k in (0, 7, len(rows) - 1):
        u = int(uids[k])
        np.testing.assert_array_equal(data.train_exclude[k + 1], ds.seqs[u][:-2])
    # fewer prefixes than cached: only samples j < 2
    d2 = load_cached_tensors(ds, rich_cache, prefixes=2)
    keep = [r for r in rows if (r - 1) % K < 2]
    np.testing.assert_array_equal(d2.train_targets[1:], tg[keep])
    with pytest.raises(InputError, match="--prefixes 4"):
        load_cached_tensors(ds, rich_cache, prefixes=4)


# --- 6./7. the heads ------------------------------------------------------------------------

def _encoder(n_slots, seed=0, d=8):
    cfg = HeadsConfig(d_llm=d, d_cf=4, d_out=4, hidden=16, user_readout="layers+slots", n_layers=2, n_slots=n_slots)
    torch.manual_seed(seed)
    return ReadoutEncoder(cfg, "layers+slots", n_slots).eval()


def test_readout_encoder_masks_padding_and_ignores_slot_order():
    enc4, enc2 = _encoder(4), _encoder(2, seed=5)
    enc2.load_state_dict(enc4.state_dict())  # the parameters do not depend on W
    torch.manual_seed(3)
    layers = torch.randn(3, 2, 8)
    slots = torch.randn(3, 2, 2, 8) * 5  # 2 real slots (of 2 layers each)
    x4 = torch.cat([layers, torch.zeros(3, 2 * 2, 8), slots.reshape(3, 4, 8)], 1)  # 2 zero slots first
    x2 = torch.cat([layers, slots.reshape(3, 4, 8)], 1)
    with torch.no_grad():
        y4, y2 = enc4(x4), enc2(x2)
        torch.testing.assert_close(y4, y2, atol=1e-6, rtol=1e-5)
        # the real slots' order does not matter (no position parameters)
        xp = torch.cat([layers, torch.zeros(3, 4, 8), slots[:, [1, 0]].reshape(3, 4, 8)], 1)
        torch.testing.assert_close(enc4(xp), y4, atol=1e-6, rtol=1e-5)
        # the padding is where the zeros are: zero slots last gives the same, too
        xl = torch.cat([layers, slots.reshape(3, 4, 8), torch.zeros(3, 4, 8)], 1)
        torch.testing.assert_close(enc4(xl), y4, atol=1e-6, rtol=1e-5)
        # but a slot's content and the layers part matter (a random change: the per-state
        # layer norm ignores a constant shift)
        g = torch.Generator().manual_seed(9)
        xc = x4.clone()
        xc[:, -1] += torch.randn(3, 8, generator=g)
        assert (enc4(xc) - y4).abs().max() > 1e-4
        xo = x4.clone()
        xo[:, 0] += torch.randn(3, 8, generator=g)
        assert (enc4(xo) - y4).abs().max() > 1e-4
        # a non-zero "padding" slot is a real slot: it changes the output
        xn = x4.clone()
        xn[:, 2:4] = torch.randn(3, 2, 8, generator=g)
        assert (enc4(xn) - y4).abs().max() > 1e-4
    own = {n for n, _ in enc4.named_parameters() if not n.startswith("mlp.")}
    assert own == {"out_mix", "slot_mix", "pool_key.weight", "pool_key.bias", "pool_query.weight"}
    # f_item on layers+soft: one slot (the item's own soft token), no pooling; both parts count
    icfg = HeadsConfig(d_llm=8, d_cf=4, d_out=4, hidden=16, item_readout="layers+soft", n_layers=2)
    assert icfg.item_tokens() == 4 and icfg.user_tokens() == 1
    item = ReadoutEncoder(icfg, "layers+soft", 1).eval()
    assert not hasattr(item, "pool_key") and item.mlp[0].in_features == 16
    xi = torch.randn(5, 4, 8, generator=g)
    with torch.no_grad():
        yi = item(xi)
        assert yi.shape == (5, 4)
        for part in (slice(0, 2), slice(2, 4)):
            xj = xi.clone()
            xj[:, part] = torch.randn(5, 2, 8, generator=g)
            assert ((item(xj) - yi).abs().amax(-1) > 1e-4).all()


def test_prepared_states_give_the_same_outputs_and_raw_states_keep_their_gradient():
    """prepare_user / prepare_item do the parameter-free work once: the heads' outputs on any
    rows of it equal those on the raw rows, bit for bit, padding slots included; the raw path
    stays differentiable in the states (e2e mode trains through them)."""
    from llmsrec.heads.model import LLMSRecHeads, Prepared

    cfg = HeadsConfig(d_llm=8, d_cf=4, d_out=4, hidden=16, user_readout="layers+slots",
                      item_readout="layers+soft", n_layers=2, n_slots=3)
    torch.manual_seed(0)
    heads = LLMSRecHeads(cfg)
    g = torch.Generator().manual_seed(1)
    hu = torch.randn(300, cfg.user_tokens(), 8, generator=g) * 30
    hu[:5, 2:6] = 0  # the first slot is padding in five rows
    hi = torch.randn(300, cfg.item_tokens(), 8, generator=g)
    pu, pi = heads.prepare_user(hu), heads.prepare_item(hi)
    assert isinstance(pu, Prepared) and pu.out.shape == (300, 8, 2)
    assert pu.slots.shape == (300, 3, 8, 2) and pu.real[:5, 0].logical_not().all() and pu.real[5:].all()
    assert pi.real.shape == (300, 1)
    rows = torch.tensor([4, 0, 299, 150, 4])
    assert torch.equal(heads.user(pu.rows(rows)), heads.user(hu[rows]))
    assert torch.equal(heads.item(pi.rows(slice(1, None))), heads.item(hi[1:]))
    assert torch.equal(heads.item(pi.rows(rows[None])), heads.item(hi[rows[None]]))  # (1, 5) rows
    x = hu[:4].clone().requires_grad_(True)
    heads.user(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the paper's readout has nothing to prepare
    plain = LLMSRecHeads(HeadsConfig(d_llm=8, d_cf=4, d_out=4, hidden=16))
    assert plain.prepare_user(hu[:, 0]) is not None and torch.equal(plain.prepare_item(hi[:, 0]), hi[:, 0])


TRAIN = dict(user_readout="layers+slots", item_readout="layers+soft", prefixes=K, epochs=2, batch_size=8,
             lr=1e-3, seed=4, train_negatives=3, **SMALL)


@pytest.fixture(scope="module")
def trained(ds, rich_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    a = train_heads(ds, rich_cache, root / "a", progress=False, **TRAIN)
    b = train_heads(ds, rich_cache, root / "b", progress=False, **TRAIN)
    return root, a, b


def test_train_heads_on_readouts_and_prefixes(ds, rich_cache, trained):
    root, res, _ = trained
    out = root / "a"
    for f in ("heads.safetensors", "heads_config.json", "results.json", "history.jsonl"):
        assert (out / f).is_file()
    with open_cache(rich_cache) as c:
        n_samples = int((c.targets(PREFIX_VIEW) > 0).sum())
    assert res["train_users"] == n_samples > ds.n_users
    assert res["steps"] == 2 * -(-n_samples // 8)
    doc = json.loads((out / "heads_config.json").read_text())
    assert doc["heads"]["user_readout"] == "layers+slots" and doc["heads"]["item_readout"] == "layers+soft"
    assert doc["heads"]["n_layers"] == 2 and doc["heads"]["n_slots"] == W
    assert doc["provenance"]["prefixes"] == K and doc["provenance"]["train_samples"] == n_samples
    assert doc["train"]["prefixes"] == K
    heads = load_heads(out)
    assert isinstance(heads.f_user, ReadoutEncoder) and isinstance(heads.f_item, ReadoutEncoder)
    ev = evaluate_heads(ds, rich_cache, out)
    assert ev["valid"] == res["valid"] and ev["test"] == res["test"]
    for v in ("valid", "test"):
        assert all(np.isfinite(x) for x in res[v].values())


def test_same_seed_same_heads(trained):
    root, a, b = trained
    assert (root / "a/heads.safetensors").read_bytes() == (root / "b/heads.safetensors").read_bytes()
    assert a["test"] == b["test"] and a["valid"] == b["valid"]
    ha = [json.loads(x) for x in (root / "a/history.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (root / "b/history.jsonl").read_text().splitlines()]
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]


def test_user_representation_prompt_carries_f_I_of_O_u(llm, ds, sasrec, tmp_path):
    """Table 11's prompt: the teacher's O_u of the same input, through f_I, is the first soft
    token; the cached state equals a forward built here from that vector."""
    version = "llmsrec-prompt-v1-userrep"
    out = precompute(ds, sasrec, tmp_path / "rep.h5", llm=llm, views=("train", "valid", "test"), history_window=W,
                     template=version, progress=False, log=lambda m: None)
    with open_cache(out) as c:
        assert c.provenance["template_version"] == version
        p = c.params()
        h, cf = c.user_hidden("test"), c.user_cf("test")
    vp = build_view(ds, "test", history_window=W, version=version)
    u = next(u for u in range(1, ds.n_users + 1) if vp.prompts[u] is not None)
    prompt = vp.prompts[u]
    assert prompt.text.startswith("This is user representation from recommendation models: [HistoryEmb], and")
    assert "Based on this sequence of watched movies and user representation" in prompt.text
    assert prompt.soft_items[0] == -1 and len(prompt.soft_items) == 1 + min(W, len(vp.cf_inputs[u]))
    with torch.no_grad():
        o_u = sasrec.user_representation(pad_left([vp.cf_inputs[u]], 20))[0].numpy()
    np.testing.assert_allclose(cf[u], o_u, atol=1e-5)
    E = sasrec.item_embeddings().detach().numpy()
    table = np.concatenate([E, np.zeros((u + 1, E.shape[1]), np.float32)])
    table[E.shape[0] + u] = o_u  # row N+1+u: the user representation
    soft = torch.from_numpy(table @ p["f_I/weight"].T + p["f_I/bias"])
    (t,) = tokenize_prompts(llm, [prompt], USER_OUT)
    t = TokenizedPrompt(t.ids, t.soft_pos, np.where(t.soft_items < 0, E.shape[0] + u, t.soft_items), t.out_pos)
    ref = forward_batch(llm, [t], soft, torch.from_numpy(p["tokens/user_out"]))[0].numpy()
    np.testing.assert_allclose(h[u], ref, atol=1e-4)
    with pytest.raises(InputError, match="prefix samples share no prompt tree"):
        precompute(ds, sasrec, tmp_path / "bad.h5", llm=llm, template=version, prefixes=2, progress=False,
                   log=lambda m: None)


def test_tree_counts_the_tokens_of_one_forward_per_sample(llm, ds):
    """``sample_tokens`` equals the summed lengths of the samples' own tokenized prompts."""
    vp = build_prefix_view(ds, K, history_window=W)
    for u in range(1, ds.n_users + 1):
        if not vp.prompts[u]:
            continue
        tree = tokenize_tree(llm, vp.prompts[u], USER_OUT)
        own = tokenize_prompts(llm, vp.prompts[u], USER_OUT)
        assert tree.sample_tokens == sum(len(t) for t in own)
        assert len(tree) < tree.sample_tokens or len(own) == 1
