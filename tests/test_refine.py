"""Token refinement: single-position gradients equal full-forward gradients; refine-tokens end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import tiny_llm

from llmsrec.cache import open_cache
from llmsrec.errors import InputError
from llmsrec.e2e.loop import LLMInputs, forward_with_grad
from llmsrec.e2e.refine import PrefixCache, refine_tokens, single_position_states
from llmsrec.heads.train import train_heads
from llmsrec.precompute import precompute
from llmsrec.precompute.engine import tokenize_prompts
from llmsrec.precompute.llm import ITEM_OUT, USER_OUT
from llmsrec.precompute.params import read_params
from llmsrec.precompute.prompts import build_view, item_prompt

W = 4
SMALL = dict(hidden=16, d_out=8, cf_hidden=8)

pytestmark = pytest.mark.usefixtures("one_torch_thread", "one_thread_per_test")


@pytest.mark.parametrize("out_token", [USER_OUT, ITEM_OUT])
def test_single_position_gradient_equals_full_forward(ds, sasrec_dir, out_token):
    from llmsrec.cfsrec import load_sasrec

    llm = tiny_llm()
    llm.decoder.to(torch.float64)
    llm.dtype = torch.float64
    E = load_sasrec(sasrec_dir).item_embeddings().detach().numpy()
    inputs = LLMInputs.initial(llm, E).double()
    with torch.no_grad():  # a token vector away from the mean, so the test is not degenerate
        inputs.out_vec(out_token).add_(torch.randn(llm.d_llm, generator=torch.Generator().manual_seed(1),
                                                   dtype=torch.float64) * 0.05)
    if out_token == USER_OUT:
        vp = build_view(ds, "train", history_window=W)
        prompts = [vp.prompts[u] for u in range(1, ds.n_users + 1) if vp.prompts[u] is not None]
    else:
        prompts = [item_prompt(ds.titles, i) for i in range(1, ds.n_items + 1)]
    toks = tokenize_prompts(llm, prompts, out_token)
    assert len({t.out_pos for t in toks}) > 1 or out_token == ITEM_OUT  # prefixes of several lengths
    proj = torch.randn(llm.d_llm, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    vec = inputs.out_vec(out_token)

    def loss(h):  # any smooth function of all states
        return torch.tanh(h @ proj).pow(2).sum()

    h_full = forward_with_grad(llm, toks, inputs, out_token)
    (g_full,) = torch.autograd.grad(loss(h_full), vec)
    soft = inputs.f_I(inputs.E).detach()
    pc = PrefixCache(llm, toks, soft, batch_tokens=300)  # several prefix batches
    assert (pc.lengths == [t.out_pos for t in toks]).all()
    h_one = single_position_states(llm, pc.batch(np.arange(len(toks))), vec)
    (g_one,) = torch.autograd.grad(loss(h_one), vec)
    assert h_one.dtype == torch.float64 and g_full.abs().max() > 1e-3
    torch.testing.assert_close(h_one, h_full, rtol=0, atol=1e-10)
    torch.testing.assert_close(g_one, g_full, rtol=0, atol=1e-5)
    # a sub-batch in another order gives the same rows
    idx = np.array([3, 0, 2])
    torch.testing.assert_close(single_position_states(llm, pc.batch(idx), vec), h_full[idx], rtol=0, atol=1e-10)


@pytest.fixture(scope="module")
def trained(ds, sasrec_dir, tmp_path_factory):
    llm = tiny_llm()
    root = tmp_path_factory.mktemp("run")
    cache = precompute(ds, sasrec_dir, root / "cache.h5", llm=llm, views=("train", "valid", "test"),
                       history_window=W, batch_tokens=400, progress=False, log=lambda m: None)
    train_heads(ds, cache, root / "heads", progress=False, epochs=2, batch_size=4, lr=1e-3, **SMALL)
    return llm, cache, root / "heads"


def test_prefix_states_reproduce_the_cache(ds, trained):
    llm, cache, _ = trained
    with open_cache(cache) as c:
        p, item_h, train_h = c.params(), c.item_hidden(), c.user_hidden("train")
        inputs = LLMInputs.from_arrays(p, c.item_cf())
    soft = inputs.f_I(inputs.E).detach()
    itoks = tokenize_prompts(llm, [item_prompt(ds.titles, i) for i in range(1, ds.n_items + 1)], ITEM_OUT)
    pc = PrefixCache(llm, itoks, soft)
    with torch.no_grad():
        h = single_position_states(llm, pc.batch(np.arange(len(itoks))), inputs.item_out)
    np.testing.assert_allclose(h.numpy(), item_h[1:], atol=1e-5)
    vp = build_view(ds, "train", history_window=W)
    users = [u for u in range(1, ds.n_users + 1) if vp.prompts[u] is not None]
    pc = PrefixCache(llm, tokenize_prompts(llm, [vp.prompts[u] for u in users], USER_OUT), soft)
    with torch.no_grad():
        h = single_position_states(llm, pc.batch(np.arange(len(users))), inputs.user_out)
    np.testing.assert_allclose(h.numpy(), train_h[users], atol=1e-5)


def test_refine_tokens_trains_tokens_and_refreshes_the_cache(ds, sasrec_dir, trained, tmp_path):
    llm, cache, heads = trained
    out = tmp_path / "r"
    res = refine_tokens(ds, cache, heads, sasrec_dir, out, llm=llm, users=6, items=8, steps=6, batch_size=6,
                        lr=1e-3, batch_tokens=400, progress=False, log=lambda m: None)
    assert {p.name for p in out.iterdir()} >= {"params.safetensors", "refine.json", "history.jsonl", "cache.h5"}
    assert res["loss_after"]["loss"] < res["loss_before"]["loss"]
    assert res["sample"]["users"] == 6 and res["sample"]["pool_items"] >= 6
    assert len((out / "history.jsonl").read_text().splitlines()) == 6
    assert json.loads((out / "refine.json").read_text())["refreshed_cache"] == str((out / "cache.h5").resolve())
    new, meta = read_params(out / "params.safetensors")
    with open_cache(cache) as c0, open_cache(out / "cache.h5") as c1:
        old = c0.params()
        # only the tokens moved; f_I is kept
        np.testing.assert_array_equal(new["f_I/weight"], old["f_I/weight"])
        for k in ("tokens/user_out", "tokens/item_out"):
            assert np.abs(new[k] - old[k]).max() > 1e-4, k
            np.testing.assert_array_equal(c1.params()[k], new[k])
        assert c1.views == c0.views
        assert c1.provenance["f_I_sha256"] == c0.provenance["f_I_sha256"]
        assert c1.provenance["token_embeddings_sha256"] != c0.provenance["token_embeddings_sha256"]
        assert "params_sha256" in c1.provenance
        # the refreshed states are those of the new token; earlier positions were unchanged
        inputs = LLMInputs.from_arrays(new, c1.item_cf())
        itoks = tokenize_prompts(llm, [item_prompt(ds.titles, i) for i in range(1, ds.n_items + 1)], ITEM_OUT)
        pc = PrefixCache(llm, itoks, inputs.f_I(inputs.E).detach())
        with torch.no_grad():
            h = single_position_states(llm, pc.batch(np.arange(len(itoks))), inputs.item_out)
        np.testing.assert_allclose(c1.item_hidden()[1:], h.numpy(), atol=1e-5)
        assert np.abs(c1.item_hidden() - c0.item_hidden()).max() > 1e-4
    # the heads train on the refreshed cache as on any cache
    train_heads(ds, out / "cache.h5", tmp_path / "h2", progress=False, epochs=1, batch_size=4, **SMALL)
    with pytest.raises(InputError, match="already exists"):
        refine_tokens(ds, cache, heads, sasrec_dir, out, llm=llm, refresh=False)


def test_refine_with_f_I_and_errors(ds, sasrec_dir, trained, tmp_path):
    llm, cache, heads = trained
    res = refine_tokens(ds, cache, heads, sasrec_dir, tmp_path / "f", llm=llm, users=4, items=6, steps=2,
                        batch_size=2, lr=1e-2, train_fi=True, batch_tokens=400, grad_batch_tokens=300,
                        refresh=False, progress=False, log=lambda m: None)
    assert res["refreshed_cache"] is None and not (tmp_path / "f" / "cache.h5").exists()
    new, _ = read_params(tmp_path / "f" / "params.safetensors")
    with open_cache(cache) as c:
        assert np.abs(new["f_I/weight"] - c.params()["f_I/weight"]).max() > 1e-4
    with pytest.raises(InputError, match="--steps"):
        refine_tokens(ds, cache, heads, sasrec_dir, tmp_path / "g", llm=llm, steps=0)
    other = tiny_llm()
    with torch.no_grad():
        other.decoder.layers[0].mlp.up_proj.weight.add_(1.0)
    other.weights_digest = "0" * 64
    with pytest.raises(InputError, match="model_weights_sha256"):
        refine_tokens(ds, cache, heads, sasrec_dir, tmp_path / "g", llm=other, refresh=False)


def test_cli_refine_tokens(ds, sasrec_dir, tmp_path):
    from click.testing import CliRunner
    from llmsrec.cli import main
    from llmsrec.precompute.llm import load_llm
    from tiny import tiny_llama_folder

    folder = tiny_llama_folder(tmp_path / "tiny-llm")
    cache = precompute(ds, sasrec_dir, tmp_path / "c.h5", llm=load_llm(str(folder)), views=("train", "valid", "test"),
                       history_window=W, batch_tokens=400, progress=False, log=lambda m: None)
    train_heads(ds, cache, tmp_path / "heads", progress=False, epochs=1, batch_size=4, **SMALL)
    out = tmp_path / "r"
    args = ["refine-tokens", "--data", str(ds.root), "--cache", str(cache), "--heads", str(tmp_path / "heads"),
            "--sasrec", str(sasrec_dir), "--out", str(out), "--users", "4", "--items", "6", "--steps", "2",
            "--batch-tokens", "400", "--no-progress"]
    r = CliRunner().invoke(main, [*args, "--views", "train,valid"])
    assert r.exit_code == 0, r.output
    assert "next: llmsrec train" in r.output and "sample loss" in r.output
    with open_cache(out / "cache.h5") as c:
        assert c.views == ["train", "valid"] and c.provenance["model"] == str(folder)
    r = CliRunner().invoke(main, [*args, "--views", "valid-shuffled", "--force"])
    assert r.exit_code == 2 and "valid-shuffled" in r.output
