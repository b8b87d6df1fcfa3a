"""The Next Item Title Generation approach (Eq. 5) of the LLM4Rec baselines on a tiny random LLaMA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import tiny_llm

from llmsrec.baselines import LoraOptions, Stage1Options, apply_lora, get_spec
from llmsrec.baselines.common import initial_inputs
from llmsrec.baselines.generative import (
    ANSWER_CUE, GEN_TEMPLATES, GenOptions, GenTrainer, candidate_loglik, candidate_loglik_repeat, candidate_order,
    fit_generative, gen_metrics, generation_prompt, load_gen_data, output_weight, prompt_embeddings,
    tokenize_generation, train_generative,
)
from llmsrec.errors import InputError
from llmsrec.precompute.prompts import clean_title

W = 4
M = 3  # the tiny dataset stores 3 negatives per user

pytestmark = pytest.mark.usefixtures("one_torch_thread", "one_thread_per_test")


def _trainer(model, ds, sasrec_dir, *, lora=True, **opts):
    llm = tiny_llm()
    spec = get_spec(model)
    if spec.lora and lora:
        apply_lora(llm, LoraOptions(), seed=0)
    data = load_gen_data(ds, sasrec_dir if spec.needs_sasrec else None, llm, model, history_window=W)
    features = data.E
    if spec.item_features is not None:
        features, _, _ = spec.item_features(ds, llm, data, Stage1Options(epochs=2), 0, None)
    inputs = initial_inputs(spec, llm, data, features)
    if spec.lora and lora:
        inputs.attach_lora(llm)
    return GenTrainer(data, llm, inputs, GenOptions(negatives=M, history_window=W, lr=1e-2, **opts))


def _direct_loglik(llm, inputs, tok, answer, rep):
    """log p(answer | prompt) from one full forward of prompt + answer, token by token."""
    with torch.no_grad():
        x = prompt_embeddings(llm, inputs, tok, rep)
        a = torch.from_numpy(answer)
        y = llm.decoder.get_input_embeddings()(a).unsqueeze(0)
        h = llm.decoder(inputs_embeds=torch.cat([x, y], 1), use_cache=False).last_hidden_state[0]
        lp = torch.log_softmax(h @ output_weight(llm).T, -1)
        L = x.shape[1]
        return float(sum(lp[L - 1 + t, int(answer[t])] for t in range(len(answer))))


@pytest.mark.parametrize("model", ["tallrec", "collm"])
def test_candidate_likelihood_equals_direct_computation(model, ds, sasrec_dir):
    tr = _trainer(model, ds, sasrec_dir)
    with torch.no_grad():  # LoRA B is zero at the start: move it so the adapters matter
        for p in tr.inputs.lora:
            p.add_(0.05 * torch.randn_like(p))
    d, v = tr.data, tr.data.view("test")
    cands = np.asarray(ds.candidates("test"), dtype=np.int64)
    for u in (1, 4, 7):
        c = cands[u - 1, : M + 1]
        p = generation_prompt(model, v.prompts[u], ds.titles, c, candidate_order(0, "test", u, M + 1))
        tok = tokenize_generation(tr.llm, p)
        answers = [d.answers[int(i)] for i in c]
        rep = v.user_cf[u] if d.sasrec is not None else None
        got, lens, gen = candidate_loglik(tr.llm, tr.inputs, tok, answers, rep, generate=5)
        want = np.array([_direct_loglik(tr.llm, tr.inputs, tok, a, rep) for a in answers])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        assert np.array_equal(np.argsort(-got, kind="stable"), np.argsort(-want, kind="stable"))
        np.testing.assert_array_equal(lens, [len(a) for a in answers])
        rep_sum, _ = candidate_loglik_repeat(tr.llm, tr.inputs, tok, answers, rep)
        np.testing.assert_allclose(rep_sum, want, rtol=1e-5, atol=1e-4)
        assert len(gen) == 5  # no end-of-sequence token in the tiny tokenizer: runs to the limit
    s = tr.score("test", np.array([1, 4, 7]))
    np.testing.assert_allclose(s.mean, s.sum / np.array([[len(d.answers[int(i)]) for i in r] for r in s.candidates]))


@pytest.mark.parametrize("view", ["train", "valid", "test", "test-shuffled"])
@pytest.mark.parametrize("model", ["tallrec", "llara", "collm"])
def test_no_target_title_in_a_history(model, view, ds, sasrec_dir):
    tr = _trainer(model, ds, sasrec_dir, lora=False)
    d, v = tr.data, tr.data.view(view)
    spec = get_spec(model)
    for u in range(1, ds.n_users + 1):
        if v.prompts[u] is None:
            continue
        target = int(v.targets[u])
        if view == "train":
            tok, ans, _ = tr.sample(np.array([u]))[0]
            text = tr.llm.tokenizer.decode(tok.ids)
            np.testing.assert_array_equal(ans, d.answers[target])
            cands = [int(i) for i in tok.soft_items if i > 0][-(M + 1):] if spec.item_soft else None
        else:
            c = np.asarray(ds.candidates(view.removesuffix("-shuffled")), dtype=np.int64)[u - 1, : M + 1]
            assert c[0] == target and target not in c[1:]
            p = generation_prompt(model, v.prompts[u], ds.titles, c, candidate_order(0, view, u, M + 1))
            text, cands = p.text, [int(i) for i in p.soft_items if i > 0][-(M + 1):] if spec.item_soft else None
        history, rest = text.split("choose one", 1)
        title = f"\"{clean_title(ds.titles[target])}\""
        assert title not in history, (u, view)
        assert rest.count(title) == 1 and rest.endswith(ANSWER_CUE)
        hist_items = [int(i) for i in v.prompts[u].soft_items if i > 0]
        assert target not in hist_items
        if cands is not None:
            assert target in cands and not set(cands) & set(hist_items)


def test_templates_follow_table1(ds, sasrec_dir):
    tr = _trainer("collm", ds, sasrec_dir, lora=False)
    v = tr.data.view("test")
    c = np.asarray(ds.candidates("test"), dtype=np.int64)[0, : M + 1]
    p = generation_prompt("collm", v.prompts[1], ds.titles, c, np.arange(M + 1))
    assert p.text.startswith("This is user representation from recommendation models: [HistoryEmb], and this user")
    assert p.soft_items[0] == -1 and list(p.soft_items[-(M + 1):]) == list(c)
    assert "choose one \"Title\" to recommend for this user next from the following item \"Title\" set: " in p.text
    assert len(set(GEN_TEMPLATES.values())) == 3


def test_gen_metrics_ranks_and_ties():
    s = np.array([[3.0, 1.0, 2.0], [1.0, 2.0, 0.0], [1.0, 1.0, 0.0]])
    m = gen_metrics(s, np.array([0, 1, -1]))
    assert m["HR@1"] == pytest.approx(1 / 3)  # a tie counts against the target
    assert m["NDCG@10"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(3)) / 3)
    assert m["exact"] == pytest.approx(2 / 3) and m["greedy_HR@1"] == pytest.approx(1 / 3)
    with pytest.raises(InputError):
        gen_metrics(np.array([[np.nan, 1.0]]))


def test_step_lowers_the_answer_loss_and_is_deterministic(ds, sasrec_dir):
    losses = []
    for _ in range(2):
        tr = _trainer("llara", ds, sasrec_dir)
        users = tr.data.train_users[:4]
        run = [tr.step(users)["loss"] for _ in range(4)]
        losses.append(run)
    assert losses[0] == losses[1]
    assert losses[0][-1] < losses[0][0]


def test_allmrec_trains_only_projections(ds, sasrec_dir):
    tr = _trainer("allmrec", ds, sasrec_dir)
    before = {n: p.detach().clone() for n, p in tr.llm.decoder.named_parameters()}
    fi = [p.detach().clone() for p in tr.inputs.f_I.parameters()]
    tr.step(tr.data.train_users[:3])
    assert all(torch.equal(before[n], p) for n, p in tr.llm.decoder.named_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(fi, tr.inputs.f_I.parameters()))


def test_train_generative_writes_results(ds, sasrec_dir, tmp_path):
    opts = dict(negatives=M, history_window=W, batch_size=3, max_steps=2, evals_per_epoch=1, eval_users=4,
                test_users=5, lr=1e-3)
    res = train_generative("llara", ds, sasrec_dir, tmp_path / "llara", opts, llm=tiny_llm())
    assert res["approach"] == "generative" and res["steps"] == 2
    assert res["eval_users"] == {"test": 5, "test-shuffled": 5}
    for view in ("test", "test-shuffled"):
        assert set(res[view]) >= {"HR@1", "NDCG@10"}
        assert res[view] == res["metrics"]["sum"][view]
    assert "exact" in res["test"] and "exact" not in res["test-shuffled"]  # greedy decoding on test only
    saved = json.loads((tmp_path / "llara" / "results.json").read_text())
    assert saved["test"] == res["test"]
    for f in ("adapter.safetensors", "inputs.safetensors", "scores.safetensors", "history.jsonl"):
        assert (tmp_path / "llara" / f).is_file()
    with pytest.raises(InputError, match="already exists"):
        train_generative("llara", ds, sasrec_dir, tmp_path / "llara", opts, llm=tiny_llm())
    with pytest.raises(InputError, match="no LoRA"):
        fit_generative("allmrec", ds, sasrec_dir, opts, llm=tiny_llm(), lora={"r": 4})


def test_cli_compare_generative(ds, tmp_path):
    from click.testing import CliRunner
    from tiny import tiny_llama_folder

    from llmsrec.baselines.generative import GEN_NEGATIVES
    from llmsrec.cli import main
    from llmsrec.cli.baseline_options import GEN_NEGATIVES as CLI_NEGATIVES

    assert CLI_NEGATIVES == GEN_NEGATIVES
    llm_dir = tiny_llama_folder(tmp_path / "tiny")
    out = tmp_path / "cmp"
    args = ["compare", "--approach", "generative", "--data", str(ds.root), "--out", str(out),
            "--models", "sasrec,tallrec,collm", "--llm", str(llm_dir), "--history-window", str(W),
            "--gen-negatives", str(M), "--gen-test-users", "4", "--llm4rec-max-steps", "1",
            "--llm4rec-batch-size", "2", "--llm4rec-eval-users", "3", "--epochs", "2", "--eval-every", "1",
            "--no-progress"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "compare.json").read_text())
    assert list(res["models"]) == ["sasrec", "tallrec", "collm"]
    for name in ("tallrec", "collm"):
        run = res["models"][name]["runs"]["0"]
        assert set(run) == {"original", "shuffled-training"}
        assert set(run["original"]) >= {"test", "test-shuffled"} and "test-shuffled" not in run["shuffled-training"]
        assert run["original"]["eval_users"] == {"test": 4, "test-shuffled": 4}
    sas = res["models"]["sasrec"]["runs"]["0"]
    assert set(sas["original"]) == {"test", "test-shuffled"} and set(sas["shuffled-training"]) == {"test"}
    md = (out / "compare.md").read_text()
    assert "| TALLRec |" in md and "HR@1 shuffled training" in md and "original, mean" in md
    assert set(res["models"]["collm"]["runs"]["0"]["original"]["scorings"]) == {"sum", "mean"}
    again = CliRunner().invoke(main, args)  # every run reused
    assert again.exit_code == 0 and "training ->" not in again.output
    assert json.loads((out / "compare.json").read_text())["models"] == res["models"]
    bad = CliRunner().invoke(main, ["compare", "--data", str(ds.root), "--out", str(tmp_path / "x"),
                                    "--models", "sasrec", "--gen-negatives", "3"])
    assert bad.exit_code == 2 and "--approach generative only" in bad.output
