"""e2e mode on a tiny random-weight LLaMA (hidden 32, 2 layers) and a tiny dataset."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import tiny_llama_folder

from llmsrec.cache import open_cache
from llmsrec.errors import InputError
from llmsrec.e2e.loop import (
    E2EData,
    E2EOptions,
    E2ETrainer,
    LLMInputs,
    evaluate_e2e_checkpoint,
    forward_with_grad,
    load_e2e_data,
    train_e2e,
)
from llmsrec.heads.train import TrainConfig, evaluate_heads, train_heads
from llmsrec.precompute import precompute
from llmsrec.precompute.llm import ITEM_OUT, USER_OUT
from llmsrec.precompute.params import read_params

W = 4
SMALL = dict(hidden=16, d_out=8, cf_hidden=8)

pytestmark = pytest.mark.usefixtures("one_torch_thread", "one_thread_per_test")


@pytest.fixture(scope="module")
def data(ds, sasrec_dir, llm) -> E2EData:
    return load_e2e_data(ds, sasrec_dir, llm, history_window=W)


@pytest.fixture(scope="module")
def cache(ds, sasrec_dir, llm, tmp_path_factory):
    return precompute(ds, sasrec_dir, tmp_path_factory.mktemp("c") / "c.h5", llm=llm, views=("train", "valid", "test"),
                      history_window=W, chunk_prompts=4, batch_tokens=400, progress=False, log=lambda m: None)


def _trainer(data, llm, **kw):
    cfg = TrainConfig(**{"seed": 0, "lr": 3e-3, "batch_size": 4, "train_negatives": 3, **SMALL,
                         **{k: v for k, v in kw.items() if k in TrainConfig.__dataclass_fields__}})
    opts = E2EOptions(**{"history_window": W, "batch_tokens": 400,
                         **{k: v for k, v in kw.items() if k in E2EOptions.__dataclass_fields__}})
    return E2ETrainer(data, llm, LLMInputs.initial(llm, data.E), cfg, opts)


def test_e2e_validation_equals_cache_mode_scoring(ds, data, llm, cache, tmp_path):
    # with unchanged f_I and tokens, e2e's recomputed states are the cache's states ...
    with open_cache(cache) as c:
        params, item_h, valid_h, test_h = c.params(), c.item_hidden(), c.user_hidden("valid"), c.user_hidden("test")
    inputs = LLMInputs.initial(llm, data.E)
    for k, v in inputs.arrays().items():
        np.testing.assert_array_equal(v.detach().numpy(), params[k], err_msg=k)
    heads_dir = tmp_path / "heads"
    train_heads(ds, cache, heads_dir, progress=False, epochs=1, batch_size=4, train_negatives=3, **SMALL)
    tr = _trainer(data, llm)
    from llmsrec.heads.model import load_heads

    tr.heads.load_state_dict(load_heads(heads_dir).state_dict())
    e_items = tr.item_states()
    np.testing.assert_allclose(e_items, item_h, atol=1e-5)
    users = np.arange(1, ds.n_users + 1)
    np.testing.assert_allclose(tr.user_states("valid", users), valid_h[1:], atol=1e-5)
    np.testing.assert_allclose(tr.user_states("test", users), test_h[1:], atol=1e-5)
    # ... and e2e evaluation gives cache mode's metrics for the same heads
    ref = evaluate_heads(ds, cache, heads_dir)
    for split in ("valid", "test"):
        m, _ = tr.evaluate(split)
        for k in ref[split]:
            assert m[k] == pytest.approx(ref[split][k], abs=1e-9), (split, k)


def _fixed_loss(tr, users, items):
    """Loss of fixed users against fixed candidate ids (no resampling), no grad."""
    d = tr.data
    uniq, inv = np.unique(items, return_inverse=True)
    with torch.no_grad():
        h_u = forward_with_grad(tr.llm, [d.user_toks["train"][u] for u in users], tr.inputs, USER_OUT)
        h_i = forward_with_grad(tr.llm, [d.item_toks[i - 1] for i in uniq], tr.inputs, ITEM_OUT)
        loss, _ = tr._loss(h_u, h_i, torch.from_numpy(inv.reshape(items.shape)), users)
    return float(loss)


def test_steps_train_f_I_tokens_heads_and_never_the_llm(data, llm):
    tr = _trainer(data, llm, lr=1e-2)
    llm_before = {k: v.clone() for k, v in llm.decoder.state_dict().items()}
    inp_before = {k: v.detach().clone() for k, v in tr.inputs.arrays().items()}
    heads_before = {k: v.clone() for k, v in tr.heads.state_dict().items()}
    users = data.train_users[:6]
    rng = np.random.default_rng(5)
    items = np.concatenate([data.train_targets[users][:, None],
                            rng.integers(1, data.n_items + 1, size=(len(users), 3))], axis=1)
    before = _fixed_loss(tr, users, items)
    for _ in range(5):
        tr.step(users)
    after = _fixed_loss(tr, users, items)
    assert after < before - 0.05
    # the LLM: no gradient, no optimizer state, unchanged weights
    llm_params = list(llm.decoder.parameters())
    assert all(not p.requires_grad and p.grad is None for p in llm_params)
    optimized = {id(p) for g in tr.opt.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in llm_params}
    assert optimized == {id(p) for p in [*tr.heads.parameters(), *tr.inputs.parameters()]}
    for k, v in llm.decoder.state_dict().items():
        assert torch.equal(v, llm_before[k]), k
    # f_I, both tokens and the heads moved
    for k, v in tr.inputs.arrays().items():
        assert not torch.equal(v.detach(), inp_before[k]), k
    for k, v in tr.heads.state_dict().items():
        if k.startswith("f_user") or k.startswith("f_item"):
            assert not torch.equal(v, heads_before[k]), k


def _grads_of_one_step(data, llm, **kw):
    tr = _trainer(data, llm, **kw)
    tr.opt.step = lambda *a, **k: None  # keep the gradients, do not move
    tr.step(data.train_users[:5])
    return {n: p.grad.clone() for n, p in [*tr.heads.named_parameters(), *tr.inputs.named_parameters()]}


def test_gradient_caching_and_checkpointing_give_the_same_gradients(data, llm):
    one_pass = _grads_of_one_step(data, llm, grad_batch_tokens=100_000)
    chunked = _grads_of_one_step(data, llm, grad_batch_tokens=250)  # several chunks, two passes
    try:
        ckpt = _grads_of_one_step(data, llm, grad_batch_tokens=250, grad_checkpointing=True)
    finally:
        llm.decoder.gradient_checkpointing_disable()
    for k, g in one_pass.items():
        assert g.abs().sum() > 0, k
        torch.testing.assert_close(chunked[k], g, rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(ckpt[k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_train_e2e_outputs_evaluate_and_precompute_from_params(ds, sasrec_dir, llm, cache, tmp_path):
    kw = dict(llm=llm, progress=False, history_window=W, batch_tokens=400, batch_size=4, lr=3e-3,
              evals_per_epoch=2, epochs=3, max_steps=2, **SMALL)
    teacher = tmp_path / "teacher"
    shutil.copytree(sasrec_dir, teacher)
    res = train_e2e(ds, teacher, tmp_path / "a", **kw)
    out = tmp_path / "a"
    names = {p.name for p in out.iterdir()}
    assert {"heads.safetensors", "heads_config.json", "params.safetensors", "history.jsonl",
            "training_curve.png", "results.json", "teacher"} <= names
    teacher.rename(tmp_path / "teacher-moved")  # the checkpoint's own copy of the teacher is used
    assert res["mode"] == "e2e" and res["steps"] == 2 and res["config"]["train_negatives"] == 3
    hist = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    # 3 batches per epoch, validation every half epoch (after batches 2 and 3); max_steps 2
    assert [h["step"] for h in hist] == [2]
    assert res["epochs_run"] == pytest.approx(2 / 3, abs=1e-4)
    assert set(res["timings"]) >= {"per_epoch", "train_steps", "validation", "test"}
    # the checkpoint reproduces its metrics by recomputing states
    ev = evaluate_e2e_checkpoint(ds, out, llm=llm, batch_tokens=400)
    assert ev["test"] == res["test"] and ev["valid"] == res["valid"]
    # same seed -> same checkpoint
    train_e2e(ds, sasrec_dir, tmp_path / "b", **kw)
    assert (out / "heads.safetensors").read_bytes() == (tmp_path / "b" / "heads.safetensors").read_bytes()
    pa, pb = read_params(out / "params.safetensors")[0], read_params(tmp_path / "b" / "params.safetensors")[0]
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
    # a cache built from the e2e params holds the e2e states
    arrays, meta = read_params(out / "params.safetensors")
    assert meta["f_I_arch"] == "linear"
    c2 = precompute(ds, sasrec_dir, tmp_path / "c2.h5", llm=llm, views=("valid",), history_window=W,
                    batch_tokens=400, params=out / "params.safetensors", progress=False, log=lambda m: None)
    with open_cache(c2) as c, open_cache(cache) as c0:
        assert "params_sha256" in c.provenance and "params_sha256" not in c0.provenance
        assert c.provenance["f_I_sha256"] != c0.provenance["f_I_sha256"]
        for k, v in c.params().items():
            np.testing.assert_array_equal(v, arrays[k])
        tr = _trainer(load_e2e_data(ds, sasrec_dir, llm, history_window=W, views=("train", "valid")), llm)
        tr.inputs.load_state_dict(LLMInputs.from_arrays(arrays, tr.data.E).state_dict())
        np.testing.assert_allclose(c.item_hidden(), tr.item_states(), atol=1e-5)
        assert np.abs(c.item_hidden() - c0.item_hidden()).max() > 1e-4
    # starting from a cache: the cache's params, checked against the run
    res_c = train_e2e(ds, sasrec_dir, tmp_path / "d", cache=c2, **{**kw, "max_steps": 1})
    assert json.loads((tmp_path / "d" / "heads_config.json").read_text())["provenance"]["init"].startswith("cache")
    assert res_c["steps"] == 1
    with pytest.raises(InputError, match="history_window"):
        train_e2e(ds, sasrec_dir, tmp_path / "e", cache=c2, **{**kw, "history_window": 3})
    with pytest.raises(InputError, match="train-negatives all"):
        train_e2e(ds, sasrec_dir, tmp_path / "e", **{**kw, "train_negatives": "all"})
    with pytest.raises(InputError, match="already exists"):
        train_e2e(ds, sasrec_dir, out, **kw)


def test_mlp_f_I_trains(data, llm):
    cfg = TrainConfig(seed=0, lr=1e-2, batch_size=4, train_negatives=3, **SMALL)
    inputs = LLMInputs.initial(llm, data.E, arch="mlp", seed=0)
    tr = E2ETrainer(data, llm, inputs, cfg, E2EOptions(history_window=W, batch_tokens=400, fi_arch="mlp"))
    w0 = tr.inputs.f_I.net[0].weight.detach().clone()
    tr.step(data.train_users[:4])
    assert not torch.equal(w0, tr.inputs.f_I.net[0].weight)
    assert set(tr.inputs.arrays()) >= {"f_I/0.weight", "f_I/1.weight", "f_I/3.weight", "tokens/user_out"}


def test_cli_train_e2e_and_evaluate(ds, sasrec_dir, tmp_path):
    from llmsrec.cli import main

    folder = tiny_llama_folder(tmp_path / "tiny-llm")
    out = tmp_path / "e2e"
    args = ["train", "--mode", "e2e", "--data", str(ds.root), "--sasrec", str(sasrec_dir), "--llm", str(folder),
            "--out", str(out), "--history-window", str(W), "--batch-size", "4", "--max-steps", "2",
            "--hidden", "16", "--d-out", "8", "--cf-hidden", "8", "--eval-users", "5", "--no-progress"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "e2e wall time" in r.output and "LLM-SRec" in r.output
    res = json.loads((out / "results.json").read_text())
    assert res["valid_users"] == 5 and res["config"]["train_negatives"] == 3
    r = CliRunner().invoke(main, ["evaluate", "--model", "llmsrec-e2e", "--data", str(ds.root),
                                  "--checkpoint", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "evaluation.json").read_text())["test"] == res["test"]
    r = CliRunner().invoke(main, ["train", "--mode", "e2e", "--data", str(ds.root), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--sasrec" in r.output
    r = CliRunner().invoke(main, [*args[:-1], "--train-negatives", "all", "--force"])
    assert r.exit_code == 2 and "train-negatives all" in r.output
    r = CliRunner().invoke(main, ["train", "--data", str(ds.root), "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "--cache" in r.output
