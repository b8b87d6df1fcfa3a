"""LLM4Rec baselines (TALLRec, LLaRA, CoLLM, A-LLMRec) on a tiny random-weight LLaMA and a tiny dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import tiny_llama_folder, tiny_llm

from llmsrec.baselines import (
    BASELINES,
    LoraOptions,
    Stage1Options,
    apply_lora,
    baseline_scores,
    build_item_prompts,
    build_prompts,
    evaluate_baseline_checkpoint,
    fit_baseline,
    get_spec,
    load_baseline_checkpoint,
    load_baseline_data,
    user_rep_id,
    view_scores,
)
from llmsrec.baselines.common import BaselineTrainer, baseline_record, initial_inputs, metrics_of, save_baseline
from llmsrec.errors import InputError
from llmsrec.e2e.loop import E2EOptions, length_batches, backward_through_llm, forward_with_grad
from llmsrec.heads.train import TrainConfig
from llmsrec.precompute.llm import HISTORY_EMB, ITEM_OUT, USER_OUT
from llmsrec.precompute.prompts import build_view, format_date, item_prompt

W = 4
SMALL = dict(hidden=16, d_out=8, cf_hidden=8)

pytestmark = pytest.mark.usefixtures("one_torch_thread", "one_thread_per_test")


def _trainer(model, ds, sasrec_dir, llm, *, lr=1e-2, lora=None, stage1=None):
    """A baseline trainer built from the same pieces as fit_baseline (LoRA injected into ``llm``)."""
    spec = get_spec(model)
    if spec.lora:
        apply_lora(llm, lora or LoraOptions(), seed=0)
    data = load_baseline_data(ds, sasrec_dir if spec.needs_sasrec else None, llm, model, history_window=W)
    features, record = data.E, None
    if spec.item_features:
        features, _, record = spec.item_features(ds, llm, data, stage1 or Stage1Options(epochs=5), 0, None)
    inputs = initial_inputs(spec, llm, data, features)
    if spec.lora:
        inputs.attach_lora(llm)
    cfg = TrainConfig(seed=0, lr=lr, batch_size=4, train_negatives=3, distill="none", uniform=False, **SMALL)
    tr = BaselineTrainer(data, llm, inputs, cfg, E2EOptions(history_window=W, batch_tokens=400))
    return tr, record


def _fixed_loss(tr, users, items):
    """L_Retrieval of fixed users against fixed candidate ids, no grad, no dropout."""
    d = tr.data
    uniq, inv = np.unique(items, return_inverse=True)
    with torch.no_grad():
        h_u = forward_with_grad(tr.llm, [d.user_toks["train"][u] for u in users], tr.inputs, USER_OUT)
        h_i = forward_with_grad(tr.llm, [d.item_toks[i - 1] for i in uniq], tr.inputs, ITEM_OUT)
        loss, terms = tr._loss(h_u, h_i, torch.from_numpy(inv.reshape(items.shape)), users)
    assert terms["distill"] == 0.0 and terms["uniform"] == 0.0  # Eq. 1 only
    return float(loss)


def _fixed_batch(data):
    users = data.train_users[:6]
    rng = np.random.default_rng(5)
    items = np.concatenate([data.train_targets[users][:, None],
                            rng.integers(1, data.n_items + 1, size=(len(users), 3))], axis=1)
    return users, items


# --- prompts (Table 2) --------------------------------------------------------------------------


def test_registry_matches_the_cli_names():
    from llmsrec.cli import main

    train = {p.name: p for p in main.commands["train"].params}
    assert BASELINES == ("tallrec", "llara", "collm", "allmrec")
    assert tuple(train["model_name"].type.choices) == ("llmsrec", *BASELINES, "ctrl", "recformer")
    assert [get_spec(m).display for m in BASELINES] == ["TALLRec", "LLaRA", "CoLLM", "A-LLMRec"]
    assert [get_spec(m).lora for m in BASELINES] == [True, True, True, False]
    with pytest.raises(InputError, match="expected one of"):
        get_spec("sasrec")
    # the CLI's documented defaults are the dataclasses' (both read llmsrec.defaults), and the
    # documented values
    defaults = {name: o.default for name, o in train.items()}
    lora = LoraOptions()
    assert (defaults["lora_r"], defaults["lora_alpha"], defaults["lora_dropout"]) == \
        (lora.r, lora.alpha, lora.dropout) == (8, 16, 0.05)
    assert tuple(defaults["lora_targets"].split(",")) == lora.targets == ("q_proj", "v_proj")
    st = Stage1Options()
    assert (defaults["stage1_epochs"], defaults["stage1_lr"], defaults["stage1_latent"]) == \
        (st.epochs, st.lr, st.latent) == (20, 1e-3, 128)
    assert st.batch_size == 64 and "batches of 64" in train["stage1_epochs"].help


def test_tallrec_prompts_are_text_only(ds):
    inputs, _ = ds.view("test")
    vp = build_prompts(ds, "tallrec", "test", history_window=W)
    u = 1
    window = inputs[u][-W:]
    dates = ds.timestamps[u][: len(inputs[u])][-W:]
    items = ", ".join(f'[No.{j + 1} Time: {format_date(dates[j])} Title: "{ds.titles[i]}"]' for j, i in enumerate(window))
    assert vp.prompts[u].text == (
        "This user has made a series of watched movies in the following order: (History Item List: "
        f"{items}). Based on this sequence of watched movies, generate user representation token: [UserOut]")
    assert all(HISTORY_EMB not in p.text and len(p.soft_items) == 0 for p in vp.prompts[1:])
    ip = build_item_prompts(ds, "tallrec")
    assert ip[2].text == (f'The item title is as follows: "Title": "{ds.titles[3]}", then generate item '
                          f"representation token: [ItemOut]")
    assert all(HISTORY_EMB not in p.text and len(p.soft_items) == 0 for p in ip)
    # tokenized: no soft-token position anywhere, no CF-SRec needed
    data = load_baseline_data(ds, None, tiny_llm(), "tallrec", history_window=W)
    assert all(len(t.soft_pos) == 0 for t in data.item_toks)
    assert all(t is None or len(t.soft_pos) == 0 for v in data.user_toks.values() for t in v)
    assert data.E.shape == (ds.n_items + 1, 1) and data.provenance["sasrec_sha256"] is None


def test_llara_prompts_are_llmsrecs(ds):
    for view in ("train", "test-shuffled"):
        ours, ref = build_prompts(ds, "llara", view, history_window=W), build_view(ds, view, history_window=W)
        for a, b in zip(ours.prompts[1:], ref.prompts[1:]):
            assert a.text == b.text and np.array_equal(a.soft_items, b.soft_items)
    assert [p.text for p in build_item_prompts(ds, "llara")] == \
        [item_prompt(ds.titles, i).text for i in range(1, ds.n_items + 1)]


def test_collm_prompts_carry_the_user_representation(ds, sasrec_dir):
    from llmsrec.cfsrec import load_sasrec, pad_left

    n, u_n = ds.n_items, ds.n_users
    for k, view in enumerate(("train", "valid", "test", "test-shuffled")):
        vp, ref = build_prompts(ds, "collm", view, history_window=W, k=k), build_view(ds, view, history_window=W)
        for u in range(1, u_n + 1):
            p = vp.prompts[u]
            assert p.text.startswith("This is user representation from recommendation models: [HistoryEmb], "
                                     "and this user has made a series of watched movies in the following order")
            assert p.text.endswith("Based on this sequence of watched movies and user representation, generate "
                                   "user representation token: [UserOut]")
            assert p.text.count(HISTORY_EMB) == 1 + len(ref.prompts[u].soft_items)
            assert p.soft_items[0] == n + 1 + k * (u_n + 1) + u == user_rep_id(n, u_n, k, u)
            assert np.array_equal(p.soft_items[1:], ref.prompts[u].soft_items)
    # the slot carries f_U(O_u) of that view's (shuffled) CF-SRec input
    llm = tiny_llm()
    tr, _ = _trainer("collm", ds, sasrec_dir, llm)
    data, inputs = tr.data, tr.inputs
    assert data.views == ("train", "valid", "test", "test-shuffled")
    sas = load_sasrec(sasrec_dir)
    for k, view in enumerate(data.views):
        cf_in = build_view(ds, view, history_window=W).cf_inputs
        with torch.no_grad():
            o = sas.user_representation(pad_left([cf_in[u] for u in range(1, u_n + 1)], sas.config.maxlen))
            ids = torch.tensor([user_rep_id(n, u_n, k, u) for u in range(1, u_n + 1)])
            torch.testing.assert_close(inputs.soft(ids), inputs.f_U(o))
            torch.testing.assert_close(inputs.soft_table()[ids], inputs.soft(ids))
    mixed = torch.tensor([3, user_rep_id(n, u_n, 3, 2), 1])
    with torch.no_grad():
        torch.testing.assert_close(inputs.soft(mixed), inputs.soft_table()[mixed])
        torch.testing.assert_close(inputs.soft(mixed)[0], inputs.f_I(inputs.E[3]))
    assert np.abs(data.user_cf[2 * (u_n + 1) + 1:3 * (u_n + 1)] - data.user_cf[3 * (u_n + 1) + 1:]).max() > 0


# --- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tallrec", "llara", "collm"])
def test_lora_models_train_adapters_and_never_the_base_weights(model, ds, sasrec_dir):
    llm = tiny_llm()
    base_before = {k: v.clone() for k, v in llm.decoder.state_dict().items()}
    tr, _ = _trainer(model, ds, sasrec_dir, llm)
    lora = {n: p for n, p in llm.decoder.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    lora_before = {n: p.detach().clone() for n, p in lora.items()}
    users, items = _fixed_batch(tr.data)
    before = _fixed_loss(tr, users, items)
    for _ in range(6):
        tr.step(users)
    after = _fixed_loss(tr, users, items)
    assert after < before - 0.05, (before, after)
    # LoRA weights trained (A and B), base weights untouched and frozen
    for n, p in lora.items():
        assert p.requires_grad and not torch.equal(p.detach(), lora_before[n]), n
    state = llm.decoder.state_dict()
    for k, v in base_before.items():
        key = k if k in state else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[key], v), k
    assert all(not p.requires_grad for n, p in llm.decoder.named_parameters() if "lora_" not in n)
    optimized = {id(p) for g in tr.opt.param_groups for p in g["params"]}
    assert {id(p) for p in lora.values()} <= optimized
    assert not optimized & {id(p) for n, p in llm.decoder.named_parameters() if "lora_" not in n}
    # the adapters' dropout is on in steps only
    assert tr.inputs._dropouts and all(not m.training for m in tr.inputs._dropouts)


def test_allmrec_two_stages_with_a_frozen_llm(ds, sasrec_dir):
    from llmsrec.baselines.allmrec import fit_stage1
    from llmsrec.precompute.fit import title_embedding_means

    llm = tiny_llm()
    llm_before = {k: v.clone() for k, v in llm.decoder.state_dict().items()}
    # stage 1: the alignment loss falls, deterministic under the seed
    data = load_baseline_data(ds, sasrec_dir, llm, "allmrec", history_window=W)
    T = title_embedding_means(llm.tokenizer, llm.embed.numpy(), ds.titles)
    opts = Stage1Options(epochs=30, batch_size=8, latent=8, lr=1e-2)
    m1, rec = fit_stage1(data.E, T, opts, seed=0)
    assert rec["last_epoch"]["loss"] < 0.7 * rec["first_epoch"]["loss"]
    assert rec["steps"] == 30 * 2  # 16 items in batches of 8
    m2, _ = fit_stage1(data.E, T, opts, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    # stage 2: the aligned embeddings feed f_I; the loss falls; the LLM does not change
    tr, _ = _trainer("allmrec", ds, sasrec_dir, llm, lr=3e-2, stage1=Stage1Options(epochs=5, latent=8))
    assert tr.inputs.E.shape == (ds.n_items + 1, 8) and float(tr.inputs.E[0].abs().sum()) == 0.0
    assert len(tr.inputs.lora) == 0
    users, items = _fixed_batch(tr.data)
    before = _fixed_loss(tr, users, items)
    for _ in range(8):
        tr.step(users)
    assert _fixed_loss(tr, users, items) < before - 0.1
    assert not any("lora_" in n for n, _ in llm.decoder.named_parameters())
    assert all(not p.requires_grad and p.grad is None for p in llm.decoder.parameters())
    for k, v in llm.decoder.state_dict().items():
        assert torch.equal(v, llm_before[k]), k


def test_gradient_caching_replays_the_lora_dropout_masks(ds, sasrec_dir):
    """Two-pass gradients (dropout on) equal one autograd pass over the same chunks and masks."""
    llm = tiny_llm()
    tr, _ = _trainer("collm", ds, sasrec_dir, llm, lora=LoraOptions(r=4, dropout=0.5))
    d = tr.data
    groups = [([d.user_toks["train"][u] for u in d.train_users[:6]], USER_OUT), (d.item_toks[:10], ITEM_OUT)]
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(len(t), llm.d_llm, generator=g) for t, _ in groups]

    def loss_fn(hs):
        loss = sum((h * w).sum() for h, w in zip(hs, weights))
        return loss, {}

    params = [p for p in tr.inputs.parameters() if p.requires_grad]
    for m in tr.inputs._dropouts:
        m.train()
    budget = 200  # several chunks per group: the two-pass path
    assert sum(len(t) * max(len(x) for x in t) for t, _ in groups) > budget
    torch.manual_seed(11)
    backward_through_llm(llm, tr.inputs, groups, loss_fn, budget)
    cached = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    torch.manual_seed(11)  # reference: the same chunks in the same order, one graph
    hs = []
    for toks, o in groups:
        h = torch.zeros(len(toks), llm.d_llm)
        for bb in length_batches(toks, budget):
            h = h.index_put((torch.from_numpy(bb),), forward_with_grad(llm, [toks[i] for i in bb], tr.inputs, o))
        hs.append(h)
    loss_fn(hs)[0].backward()
    for m in tr.inputs._dropouts:
        m.eval()
    for a, p in zip(cached, params):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model", BASELINES)
def test_save_load_round_trip_gives_identical_scores(model, ds, sasrec_dir, tmp_path):
    import shutil

    kw = dict(progress=False, history_window=W, batch_tokens=400, batch_size=4, lr=3e-3, evals_per_epoch=2,
              epochs=3, max_steps=2, **SMALL)
    if model == "allmrec":
        kw["stage1"] = {"epochs": 3, "latent": 8}
    else:
        kw["lora"] = {"r": 4, "alpha": 8}
    sas = None if model == "tallrec" else shutil.copytree(sasrec_dir, tmp_path / "teacher-src")
    bf = fit_baseline(model, ds, sas, llm=tiny_llm(), **kw)
    fit = bf.fit
    assert fit.steps == 2 and bf.config.distill == "none" and bf.config.uniform is False
    mem = {v: view_scores(fit.trainer, v, fit.item_states) for v in ("valid", "test", "test-shuffled")}
    # the test view fit_e2e scored once (what analyze reuses) is the one recomputed here
    np.testing.assert_array_equal(fit.test_view[0], mem["test"].scores)
    np.testing.assert_array_equal(fit.test_view[1], mem["test"].user)
    assert fit.test == metrics_of(mem["test"].scores)
    results = {"test": fit.test}
    out = tmp_path / model
    save_baseline(out, bf, baseline_record(bf), results)
    names = {p.name for p in out.iterdir()}
    assert {"heads.safetensors", "heads_config.json", "inputs.safetensors", "history.jsonl"} <= names
    assert "params.safetensors" not in names  # precompute --params must not accept a LoRA model
    assert ("adapter.safetensors" in names) == (model != "allmrec")
    assert ("stage1.safetensors" in names) == (model == "allmrec")
    from safetensors.numpy import load_file

    inputs_keys = set(load_file(out / "inputs.safetensors"))
    assert {"tokens/user_out", "tokens/item_out"} <= inputs_keys
    assert any(k.startswith("f_I/") for k in inputs_keys) == (model != "tallrec")
    assert any(k.startswith("f_U/") for k in inputs_keys) == (model in ("collm", "allmrec"))
    if model != "allmrec":  # only adapter weights, never the base model's
        adapter = load_file(out / "adapter.safetensors")
        assert len(adapter) == 8 and all("lora_" in k for k in adapter)
    # the teacher travels with the checkpoint: its folder moved away, the scores stay the same
    assert ("teacher" in names) == (model != "tallrec")
    if sas is not None:
        assert sorted(p.name for p in (out / "teacher").iterdir()) == ["config.json", "model.safetensors"]
        for f in ("config.json", "model.safetensors"):
            assert (out / "teacher" / f).read_bytes() == (sas / f).read_bytes()
        sas = sas.rename(tmp_path / "moved")
    loaded = baseline_scores(ds, out, llm=tiny_llm(), batch_tokens=400)
    for v, s in mem.items():
        np.testing.assert_array_equal(loaded[v].scores, s.scores, err_msg=v)
        np.testing.assert_array_equal(loaded[v].user, s.user, err_msg=v)
    assert loaded["test"].scores.shape == (ds.n_users, 4)
    ev = evaluate_baseline_checkpoint(ds, out, llm=tiny_llm(), batch_tokens=400)
    assert ev["test"] == fit.test and set(ev) == {"valid", "test", "test-shuffled"}
    if model == "collm":  # same seed -> same run (LoRA init, dropout masks, negatives)
        again = fit_baseline(model, ds, sas, llm=tiny_llm(), **kw).fit
        for a, b in ((fit.heads, again.heads), (fit.inputs, again.inputs)):
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    other = "allmrec" if model != "allmrec" else "collm"
    with pytest.raises(InputError, match=f"a {model} checkpoint"):
        load_baseline_checkpoint(ds, out, llm=tiny_llm(), expect=other)
    if model == "llara":  # a checkpoint from before teacher/ existed reads the recorded folder
        shutil.rmtree(out / "teacher")
        with pytest.raises(InputError, match="no teacher/ copy of the CF-SRec teacher and the recorded .* is gone"):
            load_baseline_checkpoint(ds, out, llm=tiny_llm())
        sas.rename(tmp_path / "teacher-src")
        again = baseline_scores(ds, out, ("test",), llm=tiny_llm(), batch_tokens=400)
        np.testing.assert_array_equal(again["test"].scores, mem["test"].scores)


def test_bad_options(ds, sasrec_dir, tmp_path):
    llm = tiny_llm()
    with pytest.raises(InputError, match="Eq. 1"):
        fit_baseline("llara", ds, sasrec_dir, llm=llm, distill="mse")
    with pytest.raises(InputError, match="no LoRA"):
        fit_baseline("allmrec", ds, sasrec_dir, llm=llm, lora={"r": 4})
    with pytest.raises(InputError, match="no stage 1"):
        fit_baseline("collm", ds, sasrec_dir, llm=llm, stage1={"epochs": 1})
    with pytest.raises(InputError, match="--sasrec"):
        fit_baseline("collm", ds, None, llm=llm)
    with pytest.raises(InputError, match="lora-targets"):
        fit_baseline("tallrec", ds, None, llm=llm, lora={"targets": "nope_proj"})
    apply_lora(llm, LoraOptions(), seed=0)
    with pytest.raises(InputError, match="already has LoRA"):
        apply_lora(llm, LoraOptions(), seed=0)


# --- CLI --------------------------------------------------------------------------------------


def test_cli_train_and_evaluate_a_baseline(ds, sasrec_dir, tmp_path):
    from llmsrec.cli import main

    folder = tiny_llama_folder(tmp_path / "tiny-llm")
    out = tmp_path / "collm"
    common = ["--data", str(ds.root), "--llm", str(folder), "--history-window", str(W), "--batch-size", "4",
              "--max-steps", "2", "--hidden", "16", "--d-out", "8", "--cf-hidden", "8", "--no-progress"]
    args = ["train", "--model", "collm", "--sasrec", str(sasrec_dir), "--out", str(out), "--lora-r", "4",
            "--lora-targets", "q_proj,k_proj,v_proj", *common]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "CoLLM" in r.output and "e2e wall time" in r.output
    res = json.loads((out / "results.json").read_text())
    assert res["model"] == "CoLLM" and res["mode"] == "e2e" and res["steps"] == 2
    assert res["config"]["train_negatives"] == 3 and res["config"]["distill"] == "none"
    assert res["baseline"]["lora"] == {"r": 4, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "k_proj", "v_proj"]}
    assert set(res["test-shuffled"]) == set(res["test"])
    r = CliRunner().invoke(main, ["evaluate", "--model", "collm", "--data", str(ds.root), "--checkpoint", str(out)])
    assert r.exit_code == 0, r.output
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["test"] == res["test"] and ev["test-shuffled"] == res["test-shuffled"]
    # A-LLMRec with its stage-1 options
    r = CliRunner().invoke(main, ["train", "--model", "allmrec", "--sasrec", str(sasrec_dir), "--out",
                                  str(tmp_path / "a"), "--stage1-epochs", "2", "--stage1-latent", "8", *common])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "a" / "results.json").read_text())["baseline"]["stage1"]["epochs"] == 2
    # refused: the cache, a wrong checkpoint kind, options of another model, no CF-SRec
    bad = [
        (["train", "--model", "tallrec", "--mode", "cache", "--out", str(tmp_path / "x"), *common], "cache"),
        (["train", "--model", "llara", "--cache", "c.h5", "--sasrec", str(sasrec_dir), "--out", str(tmp_path / "x"),
          *common], "cache"),
        (["train", "--model", "allmrec", "--lora-r", "4", "--sasrec", str(sasrec_dir), "--out", str(tmp_path / "x"),
          *common], "--lora"),
        (["train", "--model", "llara", "--stage1-epochs", "2", "--sasrec", str(sasrec_dir), "--out",
          str(tmp_path / "x"), *common], "--stage1"),
        (["train", "--model", "llara", "--no-uniform", "--sasrec", str(sasrec_dir), "--out", str(tmp_path / "x"),
          *common], "Eq. 1"),
        (["train", "--model", "collm", "--out", str(tmp_path / "x"), *common], "--sasrec"),
        (["evaluate", "--model", "llara", "--data", str(ds.root), "--checkpoint", str(out)], "collm checkpoint"),
    ]
    for a, msg in bad:
        r = CliRunner().invoke(main, a)
        assert r.exit_code == 2 and msg in r.output, (a, r.output)


def test_evaluate_checks_the_checkpoint_kind_first(ds, tmp_path):
    from llmsrec.baselines import check_checkpoint_kind, checkpoint_kind
    from llmsrec.baselines.common import read_baseline_config
    from llmsrec.cli import main

    def folder(name, file, doc):
        d = tmp_path / name
        d.mkdir()
        (d / file).write_text(json.dumps(doc))
        return d

    llara = folder("llara", "heads_config.json", {"mode": "baseline", "baseline": {"model": "llara"}})
    e2e = folder("e2e", "heads_config.json", {"mode": "e2e", "provenance": {}})
    heads = folder("heads", "heads_config.json", {"heads": {}, "provenance": {"cache": "c.h5"}})
    gru = folder("gru", "config.json", {"model": "gru4rec", "n_items": 3})
    old_sas = folder("sas", "config.json", {"n_items": 3})  # written before the "model" field
    (tmp_path / "empty").mkdir()
    kinds = [checkpoint_kind(d) for d in (llara, e2e, heads, gru, old_sas, tmp_path / "empty")]
    assert kinds == ["llara", "llmsrec-e2e", "llmsrec", "gru4rec", "sasrec", None]
    check_checkpoint_kind(llara, "llara")
    check_checkpoint_kind(tmp_path / "empty", "llmsrec")  # unrecognised: the evaluator reports it
    with pytest.raises(InputError, match=r"e2e: an LLM-SRec e2e checkpoint, not an LLM4Rec baseline \(use --model "
                                         r"llmsrec-e2e\)"):
        read_baseline_config(e2e)
    cases = [
        ("llmsrec", llara, ["--cache", "c.h5"], f"{llara}: a llara checkpoint (use --model llara)"),
        ("llmsrec-e2e", llara, [], f"{llara}: a llara checkpoint (use --model llara)"),
        ("llara", heads, [], f"{heads}: an LLM-SRec (cache-mode) checkpoint (use --model llmsrec)"),
        ("collm", e2e, [], f"{e2e}: an LLM-SRec e2e checkpoint (use --model llmsrec-e2e)"),
        ("sasrec", gru, [], f"{gru}: a gru4rec checkpoint (use --model gru4rec)"),
    ]
    for model, ckpt, extra, msg in cases:
        args = ["--model", model, "--checkpoint", str(ckpt), *extra]
        r = CliRunner().invoke(main, ["evaluate", "--data", str(ds.root), *args])
        assert r.exit_code == 2 and r.output.strip() == f"error: {msg}", (args, r.output)


def test_cli_train_messages(ds, tmp_path):
    from llmsrec.cli import main

    base = ["train", "--data", str(ds.root), "--out", str(tmp_path / "x"), "--llm", "never-loaded"]
    r = CliRunner().invoke(main, [*base, "--model", "tallrec", "--train-negatives", "all"])
    assert r.exit_code == 2 and r.output.startswith("error: --model tallrec: --train-negatives all would run"), r.output
    r = CliRunner().invoke(main, [*base, "--model", "allmrec", "--sasrec", "s", "--lora-r", "4"])
    assert r.exit_code == 2 and "--lora-r: applies to --model tallrec|llara|collm only" in r.output
    r = CliRunner().invoke(main, [*base, "--model", "allmrec", "--sasrec", "s", "--lora-r", "4", "--lora-alpha", "2"])
    assert "--lora-r, --lora-alpha: apply to --model" in r.output
    listing = CliRunner().invoke(main, ["--help"]).output
    assert [line.split(None, 1)[1] for line in listing.splitlines() if line.strip().startswith("train ")] == \
        ["Train the LLM-SRec heads or an LLM4Rec baseline."]
    device = next(p for p in main.commands["train"].params if p.name == "device")
    assert device.help.startswith("Device of the heads (--mode cache) or of the LLM forward and the heads")
    assert next(p for p in main.commands["precompute"].params if p.name == "device").help.startswith(
        "Device of the LLM forward")
