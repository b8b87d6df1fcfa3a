"""Precompute on a tiny random-weight LLaMA (hidden 32, 2 layers) and a tiny dataset."""

from __future__ import annotations

import dataclasses
import re

import h5py
import numpy as np
import pytest
import torch

from llmsrec.cache import open_cache, tmp_path
from llmsrec.errors import InputError
from llmsrec.precompute import precompute
from llmsrec.precompute.engine import forward_batch, make_batches, tokenize_prompts
from llmsrec.precompute.fit import fit_moment_matched, fit_ridge
from llmsrec.precompute.llm import HISTORY_EMB, ITEM_OUT, USER_OUT, load_llm
from llmsrec.data.views import ALL_VIEWS
from tiny import tiny_sasrec
from llmsrec.precompute.prompts import (
    TEMPLATE_VERSION, build_view, format_date, item_prompt, user_prompt,
)

W = 4  # history window in these tests (users have 5..9 interactions)


@pytest.fixture(scope="module")
def sasrec(ds):
    return tiny_sasrec(ds.n_items)


def _run(ds, sasrec, llm, out, **kw):
    kw.setdefault("views", ("train", "test", "test-shuffled"))
    kw.setdefault("history_window", W)
    kw.setdefault("chunk_prompts", 4)
    kw.setdefault("batch_tokens", 400)
    return precompute(ds, sasrec, out, llm=llm, progress=False, log=lambda m: None, **kw)


def _soft_table(llm, n_items, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_items + 1, llm.d_llm, generator=g)


def _contents(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
        out["@provenance"] = f.attrs["provenance"]
    return out


# --- prompts ------------------------------------------------------------------------------

def test_user_prompt_exact_text():
    titles = ["", "Toy Story (1995)", "Heat (1995)"]
    p = user_prompt(titles, np.array([2, 1]), np.array([0, 86_400 * 366]), verb="purchases")
    assert p.text == (
        "This user has made a series of purchases in the following order: (History Item "
        "List: [No.1 Time: 1970/01/01 Title: \"Heat (1995)\", [HistoryEmb]], [No.2 Time: "
        "1971/01/02 Title: \"Toy Story (1995)\", [HistoryEmb]]). Based on this sequence of "
        "purchases, generate user representation token: [UserOut]")
    assert p.soft_items.tolist() == [2, 1]
    q = item_prompt(titles, 1)
    assert q.text == ("The item title and item embedding are as follows: \"Title\": \"Toy Story "
                      "(1995)\", [HistoryEmb], then generate item representation token: [ItemOut]")
    # a title cannot smuggle in a special token
    assert item_prompt(["", "a [UserOut] b"], 1).text.count(USER_OUT) == 0


def test_target_never_in_prompt_and_window(ds):
    for view in ALL_VIEWS:
        vp = build_view(ds, view, history_window=W, seed=0)
        base_inputs, targets = ds.view(view.removesuffix("-shuffled"))
        for u in range(1, ds.n_users + 1):
            p = vp.prompts[u]
            if p is None:
                assert len(base_inputs[u]) == 0
                continue
            assert targets[u] not in p.soft_items
            assert ds.titles[targets[u]] not in p.text
            assert sorted(p.soft_items) == sorted(base_inputs[u][-W:])
            assert vp.targets[u] == ds.seqs[u][{"train": -3, "valid": -2, "test": -1}[
                view.removesuffix("-shuffled")]]


def test_shuffled_view_permutes_titles_not_numbers_or_dates(ds):
    orig = build_view(ds, "test", history_window=W, seed=0)
    shuf = build_view(ds, "test-shuffled", history_window=W, seed=0)
    again = build_view(ds, "test-shuffled", history_window=W, seed=0)
    other = build_view(ds, "test-shuffled", history_window=W, seed=1)
    np.testing.assert_array_equal(shuf.permutation, again.permutation)
    assert not np.array_equal(shuf.permutation, other.permutation)
    slot = re.compile(r"\[No\.(\d+) Time: (\S+) Title: \"([^\"]*)\"")
    moved = 0
    for u in range(1, ds.n_users + 1):
        a, b = slot.findall(orig.prompts[u].text), slot.findall(shuf.prompts[u].text)
        assert [x[:2] for x in a] == [x[:2] for x in b]  # numbers and dates stay
        k = len(a)
        perm = shuf.permutation[u]
        assert (perm[k:] == -1).all() and sorted(perm[:k]) == list(range(k))
        assert [x[2] for x in b] == [a[j][2] for j in perm[:k]]  # titles follow perm
        window = ds.view("test")[0][u][-W:]
        assert shuf.prompts[u].soft_items.tolist() == window[perm[:k]].tolist()
        # dates are the real ones, in UTC
        ts = ds.timestamps[u][: len(ds.seqs[u]) - 1][-W:]
        assert [x[1] for x in a] == [format_date(t) for t in ts]
        # SASRec input of the shuffled view: the window permuted the same way
        inp = ds.view("test")[0][u]
        assert shuf.cf_inputs[u][: len(inp) - k].tolist() == inp[: len(inp) - k].tolist()
        assert shuf.cf_inputs[u][len(inp) - k :].tolist() == window[perm[:k]].tolist()
        moved += perm[:k].tolist() != list(range(k))
    assert moved > 0


# --- f_I fit ------------------------------------------------------------------------------

def test_ridge_recovers_known_linear_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    a, b = rng.normal(size=(5, 8)), rng.normal(size=5)
    y = x @ a.T + b
    w, c = fit_ridge(x, y, alpha=0.0)
    np.testing.assert_allclose(w, a, atol=1e-5)
    np.testing.assert_allclose(c, b, atol=1e-5)
    w2, _ = fit_ridge(x, y + 0.01 * rng.normal(size=y.shape), alpha=1e-4)
    np.testing.assert_allclose(w2, a, atol=5e-3)
    # a strong ridge shrinks the weights towards 0
    w3, _ = fit_ridge(x, y, alpha=10.0)
    assert np.linalg.norm(w3) < 0.5 * np.linalg.norm(a)


# --- the forward --------------------------------------------------------------------------

def test_special_tokens_single_and_distinct(llm):
    ids = llm.tokenizer(f"a {HISTORY_EMB}{USER_OUT} {ITEM_OUT}", add_special_tokens=False)["input_ids"]
    for t in (HISTORY_EMB, USER_OUT, ITEM_OUT):
        assert ids.count(llm.token_ids[t]) == 1
    assert len(set(llm.token_ids.values())) == 3


@pytest.mark.parametrize("mask", [True, False])
def test_padded_batch_equals_alone(llm, ds, mask):
    vp = build_view(ds, "test", history_window=W)
    toks = tokenize_prompts(llm, [vp.prompts[u] for u in (1, 2, 5, 9)], USER_OUT)
    assert len({len(t) for t in toks}) > 1  # really padded
    soft = _soft_table(llm, ds.n_items)
    out = torch.from_numpy(llm.embed.numpy().mean(0))
    batch = forward_batch(llm, toks, soft, out, attention_mask=mask)
    for k, t in enumerate(toks):
        alone = forward_batch(llm, [t], soft, out, attention_mask=mask)
        np.testing.assert_allclose(batch[k].numpy(), alone[0].numpy(), atol=1e-4)
    assert batch.shape == (4, llm.d_llm) and batch.dtype == torch.float32


def test_history_emb_positions_carry_f_I(llm, ds):
    vp = build_view(ds, "test", history_window=W)
    p = vp.prompts[3]
    (t,) = tokenize_prompts(llm, [p], USER_OUT)
    soft = _soft_table(llm, ds.n_items)
    out = torch.zeros(llm.d_llm)
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).clone()

    hook = llm.decoder.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        base = forward_batch(llm, [t], soft, out)
    finally:
        hook.remove()
    x = seen["x"][0]
    np.testing.assert_allclose(x[t.soft_pos].numpy(), soft[t.soft_items].numpy(), atol=1e-6)
    np.testing.assert_allclose(x[t.out_pos].numpy(), out.numpy())
    # changing E of an item in the window changes the state; of any other item, nothing
    inside, outside = int(t.soft_items[0]), next(i for i in range(1, ds.n_items + 1)
                                                 if i not in t.soft_items)
    s2 = soft.clone(); s2[inside] += 1.0
    assert (forward_batch(llm, [t], s2, out) - base).abs().max() > 1e-3
    s3 = soft.clone(); s3[outside] += 1.0
    assert torch.equal(forward_batch(llm, [t], s3, out), base)


def test_make_batches_respects_budget():
    lengths = np.array([3, 10, 4, 9, 2, 30])
    order = np.argsort(lengths, kind="stable")
    batches = make_batches(lengths, order, 20)
    assert np.concatenate(batches).tolist() == order.tolist()
    for b in batches:
        assert len(b) == 1 or len(b) * lengths[b].max() <= 20


# --- the cache ----------------------------------------------------------------------------

def test_precompute_fills_cache(llm, ds, sasrec, tmp_path):
    out = _run(ds, sasrec, llm, tmp_path / "c.h5")
    assert out.exists() and not tmp_path_of(out).exists()
    with open_cache(out) as c:
        assert c.views == ["train", "test", "test-shuffled"]
        prov = c.provenance
        for field in ("model", "model_weights_sha256", "tokenizer_sha256", "template_version",
                      "template", "history_window", "f_I_sha256", "token_embeddings_sha256",
                      "dataset_sha256", "llmsrec_version", "sasrec_sha256"):
            assert field in prov
        assert prov["history_window"] == W and prov["template_version"] == TEMPLATE_VERSION
        assert prov["dataset_sha256"] == ds.digest and prov["verb"] == "watched movies"
        ih = c.item_hidden()
        assert ih.shape == (ds.n_items + 1, llm.d_llm) and ih.dtype == np.float32
        assert not ih[0].any() and (np.abs(ih[1:]).sum(1) > 0).all()
        np.testing.assert_array_equal(c.item_cf(), sasrec.item_embeddings().detach().numpy())
        p = c.params()
        assert p["f_I/weight"].shape == (llm.d_llm, 16) and p["f_I/bias"].shape == (llm.d_llm,)
        np.testing.assert_allclose(p["tokens/user_out"], llm.embed.numpy().mean(0), atol=1e-6)
        soft = torch.from_numpy(c.item_cf() @ p["f_I/weight"].T + p["f_I/bias"])
        uo = torch.from_numpy(p["tokens/user_out"])
        io = torch.from_numpy(p["tokens/item_out"])
        for view in c.views:
            vp = build_view(ds, view, history_window=W, seed=0)
            h, cf = c.user_hidden(view), c.user_cf(view)
            assert h.shape == (ds.n_users + 1, llm.d_llm) and cf.shape == (ds.n_users + 1, 16)
            np.testing.assert_array_equal(c.targets(view), vp.targets)
            from llmsrec.cfsrec import pad_left
            for u in range(1, ds.n_users + 1):
                if vp.prompts[u] is None:
                    assert not h[u].any() and not cf[u].any()
                    continue
                # the cached state equals an independent one-prompt forward
                (t,) = tokenize_prompts(llm, [vp.prompts[u]], USER_OUT)
                np.testing.assert_allclose(h[u], forward_batch(llm, [t], soft, uo)[0].numpy(),
                                           atol=1e-4)
                with torch.no_grad():
                    ref = sasrec.user_representation(pad_left([vp.cf_inputs[u]], 20))[0]
                np.testing.assert_allclose(cf[u], ref.numpy(), atol=1e-5)
            perm = c.permutation(view)
            if view.endswith("-shuffled"):
                assert perm.dtype == np.int16
                np.testing.assert_array_equal(perm, vp.permutation)
            else:
                assert perm is None
        (t,) = tokenize_prompts(llm, [item_prompt(ds.titles, 2)], ITEM_OUT)
        np.testing.assert_allclose(ih[2], forward_batch(llm, [t], soft, io)[0].numpy(), atol=1e-4)


def tmp_path_of(out):
    return tmp_path(out)


def test_resume_after_interruption_matches_uninterrupted(llm, ds, sasrec, tmp_path):
    ref = _run(ds, sasrec, llm, tmp_path / "ref.h5")
    calls = []

    def killer(group, chunk):
        calls.append((group, chunk))
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")

    out = tmp_path / "c.h5"
    with pytest.raises(KeyboardInterrupt):
        _run(ds, sasrec, llm, out, on_chunk=killer)
    assert not out.exists() and tmp_path_of(out).exists()
    with h5py.File(tmp_path_of(out), "r") as f:
        assert int(f["progress/items"][()].sum()) == 3
    resumed = []
    _run(ds, sasrec, llm, out, on_chunk=lambda g, c: resumed.append((g, c)))
    assert out.exists() and not tmp_path_of(out).exists()
    assert not set(resumed) & set(calls)  # done chunks are not recomputed
    a, b = _contents(ref), _contents(out)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_provenance_mismatch_refused_naming_field(llm, ds, sasrec, tmp_path):
    out = _run(ds, sasrec, llm, tmp_path / "c.h5", views=("test",))
    with pytest.raises(InputError, match="history_window"):
        _run(ds, sasrec, llm, out, views=("test",), history_window=3)
    with pytest.raises(InputError, match="sasrec_sha256"):
        _run(ds, sasrec.__class__(sasrec.config).eval(), llm, out, views=("test",))
    with pytest.raises(InputError, match="quantization"):  # an 8-bit LLM never extends a full-precision cache
        _run(ds, sasrec, dataclasses.replace(llm, quantization="int8"), out, views=("test",))
    _run(ds, sasrec, llm, out, views=("test",), history_window=3, force=True)
    with open_cache(out) as c:
        assert c.provenance["history_window"] == 3
        assert "quantization" not in c.provenance


def test_reader_is_read_only(llm, ds, sasrec, tmp_path):
    out = _run(ds, sasrec, llm, tmp_path / "c.h5", views=("test",))
    before = _contents(out)
    with open_cache(out) as c:
        assert c.f.mode == "r"
        with pytest.raises((OSError, ValueError)):
            c.f["items/hidden"][1] = 0.0
        with pytest.raises(InputError, match="valid"):
            c.user_hidden("valid")
    after = _contents(out)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    with pytest.raises(InputError):
        open_cache(tmp_path / "missing.h5")


def test_adding_a_view_later(llm, ds, sasrec, tmp_path):
    out = _run(ds, sasrec, llm, tmp_path / "c.h5", views=("test",))
    first = _contents(out)
    groups = []
    _run(ds, sasrec, llm, out, views=("test", "valid-shuffled"),
         on_chunk=lambda g, c: groups.append(g))
    assert set(groups) == {"users/valid-shuffled"}  # nothing recomputed
    with open_cache(out) as c:
        assert c.views == ["test", "valid-shuffled"]
        assert c.permutation("valid-shuffled") is not None
    second = _contents(out)
    for k, v in first.items():
        np.testing.assert_array_equal(v, second[k], err_msg=k)
    # asking again for views already there computes nothing
    _run(ds, sasrec, llm, out, views=("valid-shuffled",), on_chunk=lambda g, c: groups.append(g))
    assert groups.count("users/valid-shuffled") == len(groups)


def test_one_process_run_makes_the_folder_and_removes_stale_shards(llm, ds, sasrec, tmp_path):
    out = _run(ds, sasrec, llm, tmp_path / "new" / "sub" / "c.h5", views=("test",))  # folder made
    assert out.exists()
    shards = out.with_name("c.h5.shards")  # left by a killed `--nproc 2` run
    shards.mkdir()
    for name in ("rank0-of-2.h5.tmp", "rank1-of-2.h5.tmp"):
        (shards / name).write_bytes(b"")
    msgs = []
    precompute(ds, sasrec, out, llm=llm, views=("test", "valid"), history_window=W, chunk_prompts=4,
               batch_tokens=400, progress=False, log=msgs.append)
    assert not shards.exists()
    assert msgs[-1] == (f"removed 2 shard file(s) {out} does not use from {shards} (and the folder): "
                        f"rank0-of-2.h5.tmp, rank1-of-2.h5.tmp")


def test_max_users_and_bad_view(llm, ds, sasrec, tmp_path):
    out = _run(ds, sasrec, llm, tmp_path / "c.h5", views=("valid",), max_users=3)
    with open_cache(out) as c:
        h = c.user_hidden("valid")
        assert (np.abs(h[1:4]).sum(1) > 0).all() and not h[4:].any()
        assert c.provenance["max_users"] == 3
    with pytest.raises(InputError, match="view"):
        _run(ds, sasrec, llm, tmp_path / "d.h5", views=("nope",))


def test_load_llm_errors(tmp_path):
    with pytest.raises(InputError, match="no such local folder"):
        load_llm(str(tmp_path / "absent"))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(
        '{"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 8,'
        ' "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 8}')
    (bert / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="not a causal"):
        load_llm(str(bert))
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text('{"model_type": "t5", "is_encoder_decoder": true}')
    (t5 / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="encoder-decoder"):
        load_llm(str(t5))


def test_cli_prompts_prints_exact_text(ds):
    from click.testing import CliRunner

    from llmsrec.cli import main

    r = CliRunner().invoke(main, ["prompts", "--data", str(ds.root), "--user", "2",
                                  "--view", "valid-shuffled", "--history-window", str(W)])
    assert r.exit_code == 0, r.output
    vp = build_view(ds, "valid-shuffled", history_window=W, seed=0)
    assert vp.prompts[2].text in r.output
    r = CliRunner().invoke(main, ["prompts", "--data", str(ds.root), "--item", "3"])
    assert r.exit_code == 0 and item_prompt(ds.titles, 3).text in r.output
    r = CliRunner().invoke(main, ["prompts", "--data", str(ds.root), "--user", "999"])
    assert r.exit_code == 2 and "error:" in r.output


def test_moment_matched_fi_keeps_all_of_e_and_matches_token_moments():
    rng = np.random.default_rng(3)
    e = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4)) + 2.0   # correlated CF embeddings
    t = rng.normal(size=(3000, 12)) * np.linspace(2.0, 0.1, 12) + 5.0  # token embeddings
    w, b = fit_moment_matched(e, t)
    assert w.shape == (12, 4) and b.shape == (12,)
    out = e @ w.T.astype(np.float64) + b
    # injective: E is recovered exactly from f_I(E)
    back = np.linalg.lstsq(w.astype(np.float64), (out - b).T, rcond=None)[0].T
    np.testing.assert_allclose(back, e, atol=1e-4)
    # soft tokens have the token embeddings' mean, and their covariance on the top-4 axes
    np.testing.assert_allclose(out.mean(0), t.mean(0), atol=1e-4)
    _, st, vt = np.linalg.svd(t - t.mean(0), full_matrices=False)
    top_var = (st[:4] / np.sqrt(len(t) - 1)) ** 2
    proj = (out - out.mean(0)) @ vt[:4].T
    np.testing.assert_allclose(proj.var(0, ddof=1), top_var, rtol=1e-4)
