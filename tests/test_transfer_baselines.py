"""Cross-domain transfer (Table 8) of the LLM4Rec baselines, on a tiny random LLaMA
(tests/test_precompute.py) and tiny datasets: trained on A, scored on B."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file
from tiny import tiny_llama_folder, tiny_llm, tiny_sasrec

from llmsrec.baselines import BASELINES, evaluate_baseline_checkpoint, load_baseline_checkpoint
from llmsrec.baselines.allmrec import Alignment, aligned_features
from llmsrec.cfsrec import evaluate_cfsrec, save_sasrec
from llmsrec.cli import main
from llmsrec.data import prepare_from_interactions
from llmsrec.errors import InputError
from llmsrec.experiments.compare import cf_shuffled_metrics
from llmsrec.experiments.transfer import (
    TRANSFER_MODELS,
    format_transfer_md,
    load_transferred_baseline,
    match_items,
    parse_transfer_models,
    run_transfer,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W = 4
# two steps with small heads and LoRA: seconds per model on the tiny LLM
BUDGET = dict(max_steps=2, batch_size=4, evals_per_epoch=1, eval_users=5, hidden=16, d_out=8, cf_hidden=8,
              lr=3e-3, history_window=W, lora={"r": 4, "alpha": 8}, stage1={"epochs": 3, "latent": 8})
TOKENS = 600


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    torch.set_num_threads(1)  # numba's metrics reset torch's OpenMP thread count


def _interactions(renamed=()):
    """Twelve users over 16 items; items in ``renamed`` get another raw id and title (unseen by A)."""
    rng = np.random.default_rng(0)
    inter = []
    for u in range(12):
        n = 6 + u % 4
        t = 820_000_000 + u * 1000
        for i in rng.choice(16, size=n, replace=False):
            t += 86_400
            inter.append((f"u{u}", f"{'j' if i in renamed else 'i'}{i}", t))
    titles = {f"i{i}": f"Movie Story {i} ({1990 + i})" for i in range(16)}
    titles.update({f"j{i}": f"New Film {i} (2001)" for i in renamed})
    return inter, titles


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny `llmsrec run` folder without cache or heads: data/ and sasrec/ (what the baselines need)."""
    root = tmp_path_factory.mktemp("src") / "run"
    ds = prepare_from_interactions(*_interactions(), root / "data", kcore=1, num_negatives=3,
                                   stats_extra={"dataset": "tiny-a"})
    save_sasrec(tiny_sasrec(ds.n_items), root / "sasrec")
    return root, ds


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """B: the same users, items 3, 7 and 11 under new ids and titles (unseen by A with --match id)."""
    return prepare_from_interactions(*_interactions(renamed=(3, 7, 11)), tmp_path_factory.mktemp("b") / "data",
                                     kcore=1, num_negatives=3, seed=1, stats_extra={"dataset": "tiny-b"})


@pytest.fixture(scope="module")
def self_transfer(source, tmp_path_factory):
    """A -> A with --match id: every model, each baseline trained once on A."""
    root, ds = source
    out = tmp_path_factory.mktemp("xfer") / "self"
    logs: list[str] = []
    doc = run_transfer(root, root / "data", out, match="id", models=("sasrec", *BASELINES), llm=tiny_llm(),
                       llm4rec_options=BUDGET, batch_tokens=TOKENS, progress=False, log=logs.append)
    return out, doc, logs


def test_models_parse_in_table_order():
    assert TRANSFER_MODELS == ("sasrec", "tallrec", "llara", "collm", "allmrec", "llmsrec")
    assert parse_transfer_models("llmsrec, allmrec,sasrec,tallrec,sasrec") == ["sasrec", "tallrec", "allmrec", "llmsrec"]
    with pytest.raises(InputError, match="unknown model 'gru4rec'"):
        parse_transfer_models("sasrec,gru4rec")
    with pytest.raises(InputError, match="at least one"):
        parse_transfer_models(" , ")
    # the CLI: the default rows are the two of before, the --llm4rec-* budget is compare's
    opts = {name: {p.name: p.default for p in main.commands[name].params} for name in ("transfer", "compare")}
    assert opts["transfer"]["models"] == "sasrec,llmsrec" and opts["transfer"]["seed"] == 0
    budget = [k for k in opts["compare"] if k.startswith("llm4rec_")]
    assert len(budget) == 6 and all(opts["transfer"][k] == opts["compare"][k] for k in budget)


def test_self_transfer_equals_in_domain_evaluation(source, self_transfer):
    """The identity mapping on A's own data: each baseline scores exactly as `evaluate --model` on A."""
    root, ds = source
    out, doc, logs = self_transfer
    assert list(doc["models"]) == ["SASRec", "TALLRec", "LLaRA", "CoLLM", "A-LLMRec"]
    assert doc["match"] == {"rule": "id", "items": ds.n_items, "matched": ds.n_items, "test_targets_matched": 1.0}
    assert [m for m in logs if m.endswith("training -> " + str(out / "tallrec-seed0"))]
    for name in BASELINES:
        run = out / f"{name}-seed0"
        assert json.loads((run / "results.json").read_text())["steps"] == 2
        ev = evaluate_baseline_checkpoint(ds, run, llm=tiny_llm(), batch_tokens=TOKENS)
        row = doc["models"][{"tallrec": "TALLRec", "llara": "LLaRA", "collm": "CoLLM", "allmrec": "A-LLMRec"}[name]]
        for view in ("valid", "test", "test-shuffled"):
            assert row[view] == ev[view], (name, view)
        for view in ("test", "test-shuffled"):  # the source's valid row is on the 5 selection users
            assert doc["llm4rec"]["runs"][name]["source"][view] == ev[view], (name, view)
    sas = evaluate_cfsrec(ds, root / "sasrec")
    assert doc["models"]["SASRec"]["test"] == sas["test"] and doc["models"]["SASRec"]["valid"] == sas["valid"]
    # no cache in the source run: SASRec's shuffled test from the model itself, the default window
    assert doc["models"]["SASRec"]["test-shuffled"] == cf_shuffled_metrics(ds, root / "sasrec", history_window=10)
    b = doc["llm4rec"]
    assert b["llm"] == "tiny-llama" and b["seed"] == 0 and b["teacher"] == str(root / "sasrec")
    assert b["options"]["max_steps"] == 2 and b["options"]["history_window"] == W and b["lora"] == {"r": 4, "alpha": 8}
    md = (out / "transfer.md").read_text()
    assert md == format_transfer_md(doc)
    assert "| A-LLMRec |" in md and "LLM4Rec baselines trained on the source with L_Retrieval (LLM tiny-llama, " \
                                     "seed 0, at most 10 epochs, 2 steps at most, 5 validation users" in md


def test_rerun_reuses_the_source_runs(source, self_transfer):
    root, _ = source
    out, doc, _ = self_transfer
    stamp = (out / "collm-seed0" / "heads.safetensors").stat().st_mtime_ns
    logs: list[str] = []
    again = run_transfer(root, root / "data", out, match="id", models=("collm",), llm=tiny_llm(),
                         llm4rec_options=BUDGET, batch_tokens=TOKENS, progress=False, log=logs.append)
    assert f"[collm seed 0] reused {out / 'collm-seed0'}" in logs
    assert (out / "collm-seed0" / "heads.safetensors").stat().st_mtime_ns == stamp
    assert list(again["models"]) == ["CoLLM"] and again["models"]["CoLLM"] == doc["models"]["CoLLM"]


@pytest.mark.parametrize("name", ["llara", "collm", "allmrec"])
def test_unseen_items_get_the_mapped_mean_soft_token(name, source, target, self_transfer):
    """On B, an item A never saw gets f_I of the mean of A's item rows (A-LLMRec: through its
    stage-1 encoder); an item A knows gets its own soft token from A."""
    _, ds_a = source
    ckpt = self_transfer[0] / f"{name}-seed0"
    mapping = match_items(ds_a.raw_items, target.raw_items, "id")
    unseen = [j for j in range(1, target.n_items + 1) if mapping[j] == 0]
    assert sorted(target.raw_items[j] for j in unseen) == ["j11", "j3", "j7"]
    seen = int(np.flatnonzero(mapping)[1])
    tr_b = load_transferred_baseline(target, ckpt, mapping, llm=tiny_llm(), batch_tokens=TOKENS)
    tr_a = load_baseline_checkpoint(ds_a, ckpt, llm=tiny_llm(), batch_tokens=TOKENS)
    from llmsrec.cfsrec import load_cfsrec

    E = load_cfsrec(ckpt / "teacher").item_embeddings().detach().numpy()
    mean = E[1:].mean(0)
    if name == "allmrec":
        state = {k.removeprefix("stage1/"): torch.from_numpy(v) for k, v in
                 load_file(ckpt / "stage1.safetensors").items()}
        latent, d_text = state["enc_text.0.weight"].shape
        enc = Alignment(E.shape[1], int(d_text), int(latent))
        enc.load_state_dict(state)
        mean = aligned_features(enc.eval(), np.stack([np.zeros_like(mean), mean]))[1]
    with torch.no_grad():
        want = tr_a.inputs.f_I(torch.from_numpy(mean)[None])[0]
        got = tr_b.inputs.soft(torch.tensor(unseen))
        for row in got:
            torch.testing.assert_close(row, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(tr_b.inputs.soft(torch.tensor([seen]))[0],
                                   tr_a.inputs.soft(torch.tensor([int(mapping[seen])]))[0], rtol=0, atol=0)
    # the heads, out tokens and (LoRA models) adapters are A's
    for k, v in tr_a.heads.state_dict().items():
        assert torch.equal(tr_b.heads.state_dict()[k], v), k
    assert torch.equal(tr_b.inputs.user_out, tr_a.inputs.user_out)
    if name == "collm":  # the user-representation token: f_U of the re-indexed teacher's O_u on B's history
        from llmsrec.baselines import user_rep_id
        from llmsrec.cfsrec.teacher import teacher_user_reps
        from llmsrec.experiments.transfer import reindex_item_table
        from llmsrec.precompute.prompts import build_view

        u_n = target.n_users
        k = tr_b.data.views.index("test")
        vp = build_view(target, "test", history_window=W, seed=0)
        o_u = teacher_user_reps(reindex_item_table(load_cfsrec(ckpt / "teacher"), mapping), vp.cf_inputs,
                                list(range(1, u_n + 1)))
        np.testing.assert_array_equal(tr_b.data.user_cf[k * (u_n + 1) + 1 : (k + 1) * (u_n + 1)], o_u)
        ids = [user_rep_id(target.n_items, u_n, k, u) for u in (1, u_n)]
        with torch.no_grad():
            torch.testing.assert_close(tr_b.inputs.soft(torch.tensor(ids)),
                                       tr_a.inputs.f_U(torch.from_numpy(o_u[[0, u_n - 1]])), rtol=1e-6, atol=1e-6)


def test_transfer_to_other_data(source, target, self_transfer, tmp_path):
    """A -> B by id (3 items unseen): rows for TALLRec and LLaRA from A's runs, scored on B's candidates."""
    root, _ = source
    runs = self_transfer[0]
    doc = run_transfer(root, target.root, tmp_path / "ab", match="id", models=("tallrec", "llara"), llm=tiny_llm(),
                       llm4rec_options=BUDGET, llm4rec_runs=runs, batch_tokens=TOKENS, progress=False,
                       log=lambda m: None)
    assert doc["match"]["matched"] == target.n_items - 3
    assert list(doc["models"]) == ["TALLRec", "LLaRA"]
    for row in doc["models"].values():
        assert set(row) == {"valid", "test", "test-shuffled"}
        assert all(0.0 <= row["test"][k] <= 1.0 for k in ("HR@10", "NDCG@10"))
    assert doc["llm4rec"]["runs"]["llara"]["dir"] == str(runs / "llara-seed0")
    assert not (tmp_path / "ab" / "llara-seed0").exists()  # reused from --llm4rec-runs
    with pytest.raises(InputError, match="item mapping: 2 items"):
        load_transferred_baseline(target, runs / "llara-seed0", np.zeros(3, dtype=np.int64), llm=tiny_llm())
    with pytest.raises(InputError, match="needs its CF-SRec re-indexed"):
        load_baseline_checkpoint(target, runs / "llara-seed0", llm=tiny_llm(), other_dataset=True)
    with pytest.raises(InputError, match="trained on dataset"):  # in-domain loading still checks the data
        load_baseline_checkpoint(target, runs / "tallrec-seed0", llm=tiny_llm())


def test_cli_transfer_with_a_baseline(source, tmp_path):
    root, _ = source
    folder = tiny_llama_folder(tmp_path / "tiny-llm", layers=1)
    out = tmp_path / "cli"
    r = CliRunner().invoke(main, ["transfer", "--source", str(root), "--data", str(root / "data"), "--out", str(out),
                                  "--match", "id", "--models", "tallrec", "--llm", str(folder), "--batch-tokens",
                                  str(TOKENS), "--llm4rec-max-steps", "1", "--llm4rec-eval-users", "3",
                                  "--llm4rec-batch-size", "4", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "| TALLRec |" in r.output and "| SASRec |" not in r.output
    req = json.loads((out / "tallrec-seed0" / "request.json").read_text())
    assert req["llm"] == str(folder) and req["options"]["max_steps"] == 1 and req["options"]["history_window"] == 10
    r = CliRunner().invoke(main, ["transfer", "--source", str(root), "--data", str(root / "data"), "--out", str(out),
                                  "--llm4rec-max-steps", "1"])
    assert r.exit_code == 2 and "--llm4rec-max-steps: applies when --models includes tallrec" in r.output
    r = CliRunner().invoke(main, ["transfer", "--source", str(root), "--data", str(root / "data"), "--out", str(out),
                                  "--models", "sasrec,bert4rec"])
    assert r.exit_code == 2 and "unknown model 'bert4rec'" in r.output


def test_all_six_models_on_a_tiny_run_onto_its_own_data(tmp_path):
    """A whole `llmsrec run` on the tiny LLM (cache, heads), transferred onto its own data by id with
    every model: SASRec and LLM-SRec score as in the run, each baseline as `evaluate --model`."""
    from llmsrec.pipeline import run_pipeline

    inter, titles = _interactions()
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                                      + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in inter))
    (tmp_path / "x.item").write_text("item_id:token\ttitle:token_seq\n" + "".join(f"{i}\t{t}\n" for i, t in titles.items()))
    llm_dir = tiny_llama_folder(tmp_path / "tiny-llm", layers=1)
    run = tmp_path / "run"
    res = run_pipeline(run, dataset="atomic", files={"inter": str(tmp_path / "x.inter"), "item": str(tmp_path / "x.item")},
                       llm=str(llm_dir), data_opts=dict(kcore=1, num_negatives=3),
                       sasrec_opts=dict(epochs=2, eval_every=1, hidden=8, maxlen=10, batch_size=8),
                       precompute_opts=dict(history_window=W, batch_tokens=TOKENS),
                       head_opts=dict(epochs=1, hidden=16, d_out=8, cf_hidden=8, evals_per_epoch=1, batch_size=4),
                       progress=False, log=lambda m: None)
    budget = {k: v for k, v in BUDGET.items() if k != "history_window"}  # inherited from the run's cache
    doc = run_transfer(run, run / "data", tmp_path / "self", match="id", models=TRANSFER_MODELS,
                       llm4rec_options=budget, batch_tokens=TOKENS, progress=False, log=lambda m: None)
    assert list(doc["models"]) == ["SASRec", "TALLRec", "LLaRA", "CoLLM", "A-LLMRec", "LLM-SRec"]
    assert doc["llm4rec"]["llm"] == str(llm_dir) and doc["llm4rec"]["options"]["history_window"] == W
    for name in ("SASRec", "LLM-SRec"):
        for view in ("valid", "test"):
            assert doc["models"][name][view] == pytest.approx(res["models"][name][view], abs=1e-6), (name, view)
    assert set(doc["timings"]) == {"precompute", "evaluate", *BASELINES, "total"}
    from llmsrec.data import load_prepared

    ds = load_prepared(run / "data")
    for name, display in (("tallrec", "TALLRec"), ("allmrec", "A-LLMRec")):
        ev = evaluate_baseline_checkpoint(ds, tmp_path / "self" / f"{name}-seed0", batch_tokens=TOKENS)
        assert doc["models"][display] == ev, name
