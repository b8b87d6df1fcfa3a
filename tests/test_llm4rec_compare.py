"""The LLM4Rec baselines in ``llmsrec compare`` and ``llmsrec analyze --llm4rec``, on a tiny random
LLaMA (tests/test_precompute.py) and tiny datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_analyze import run_dir  # noqa: F401  (module fixture: a tiny `llmsrec run` folder)
from tiny import tiny_llama_folder, tiny_llm

from llmsrec.baselines import baseline_scores, evaluate_baseline_checkpoint
from llmsrec.baselines.common import metrics_of
from llmsrec.cfsrec import evaluate_cfsrec
from llmsrec.cli import main
from llmsrec.data import prepare_from_interactions
from llmsrec.errors import InputError
from llmsrec.evaluate import analyses as A
from llmsrec.experiments.analyze import analyze_run, parse_llm4rec
from llmsrec.experiments.compare import (
    LLM4REC_DEFAULTS,
    cf_shuffled_metrics,
    compare,
    format_compare_md,
    llm4rec_train_options,
    parse_models,
)
from llmsrec.atomic import sha256_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W = 4
N_ITEMS = 20
CF = dict(epochs=2, eval_every=1, patience=2)
SMALL_CF = {"*": {"maxlen": 10, "hidden": 16}}
# a two-step budget with small heads: seconds on the tiny LLM
BUDGET = dict(max_steps=2, batch_size=8, evals_per_epoch=1, eval_users=10, hidden=16, d_out=8, cf_hidden=8,
              lr=3e-3, batch_tokens=600)


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    torch.set_num_threads(1)  # numba's metrics reset torch's OpenMP thread count


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    rng = np.random.default_rng(0)
    inter = []
    for u in range(24):
        length, start = int(rng.integers(6, 9)), int(rng.integers(0, N_ITEMS))
        for t in range(length):
            inter.append((f"u{u}", f"i{(start + t) % N_ITEMS}", 820_000_000 + 86_400 * t))
    titles = {f"i{i}": f"Movie Story {i} ({1990 + i % 10})" for i in range(N_ITEMS)}
    return prepare_from_interactions(inter, titles, tmp_path_factory.mktemp("data") / "walk", kcore=1,
                                     num_negatives=9, stats_extra={"dataset": "walk"})


@pytest.fixture(scope="module")
def three_models(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "out"
    kw = dict(models=["llara", "sasrec", "tallrec"], seeds=[0], cf_options=CF, model_options=SMALL_CF,
              llm=tiny_llm(), precompute_options={"history_window": W}, llm4rec_options={**BUDGET, "lora": {"r": 4}},
              progress=False)
    logs: list[str] = []
    res = compare(ds, out, **kw, log=logs.append)
    return out, res, logs, kw


def test_parsing_and_option_defaults():
    from llmsrec.heads.train import TrainConfig

    assert parse_models("llmsrec,allmrec,sasrec,tallrec") == ["sasrec", "tallrec", "allmrec", "llmsrec"]
    assert parse_llm4rec(None) == () and parse_llm4rec("collm, tallrec") == ("tallrec", "collm")
    assert parse_llm4rec("all") == ("tallrec", "llara", "collm", "allmrec")
    with pytest.raises(InputError, match="unknown model 'sasrec'"):
        parse_llm4rec("sasrec")
    opts, lora, stage1 = llm4rec_train_options({"max_steps": 5, "eval_users": None, "lora": {"r": 2}},
                                               {"history_window": 7, "num_threads": 2, "device": "cpu"})
    assert opts == {"epochs": 10, "patience": 10, "history_window": 7, "device": "cpu", "threads": 2, "max_steps": 5}
    assert lora == {"r": 2} and stage1 == {}
    with pytest.raises(InputError, match="unknown LLM4Rec option"):
        llm4rec_train_options({"seed": 3})
    # the CLI's documented defaults are compare's (paper: 10 epochs, patience 10) and TrainConfig's
    for cmd in (main.commands["compare"], main.commands["analyze"]):
        d = {o.name: o.default for o in cmd.params}
        assert (d["llm4rec_epochs"], d["llm4rec_patience"]) == (LLM4REC_DEFAULTS["epochs"],
                                                                LLM4REC_DEFAULTS["patience"])
        assert (d["llm4rec_batch_size"], d["llm4rec_evals_per_epoch"]) == (TrainConfig().batch_size,
                                                                           TrainConfig().evals_per_epoch)
        assert d["llm4rec_max_steps"] is None and d["llm4rec_eval_users"] is None


def test_cf_shuffled_metrics_with_a_one_item_window_is_the_test(ds, three_models):
    out = three_models[0]
    assert cf_shuffled_metrics(ds, out / "sasrec-seed0", history_window=1) == evaluate_cfsrec(ds, out / "sasrec-seed0")["test"]


def test_compare_with_llm4rec_columns(ds, three_models):
    out, res, logs, _ = three_models
    assert {p.name for p in out.iterdir()} == {"sasrec-seed0", "tallrec-seed0", "llara-seed0", "compare.json",
                                               "compare.md"}
    assert res["columns"] == ["SASRec", "TALLRec", "LLaRA"] and list(res["models"]) == ["sasrec", "tallrec", "llara"]
    assert [m for m in logs if m.startswith("[")] == [
        f"[sasrec seed 0] training -> {out / 'sasrec-seed0'}",
        f"[sasrec seed 0] reused {out / 'sasrec-seed0'}",  # LLaRA's teacher: the first-seed SASRec
        f"[tallrec seed 0] training -> {out / 'tallrec-seed0'}",
        f"[llara seed 0] training -> {out / 'llara-seed0'}"]
    assert res["llm4rec"]["teacher"].startswith(f"SASRec seed 0 ({out / 'sasrec-seed0'})")
    assert res["llm4rec"]["options"]["max_steps"] == 2 and res["llm4rec"]["options"]["history_window"] == W
    for name in ("tallrec", "llara"):
        run = res["models"][name]["runs"]["0"]
        trained = json.loads((out / f"{name}-seed0" / "results.json").read_text())
        assert trained["steps"] == 2 and trained["e2e"]["history_window"] == W
        assert run["test"] == trained["test"] and run["test-shuffled"] == trained["test-shuffled"]
        assert run["valid_users"] == 10 and run["steps"] == 2
        req = json.loads((out / f"{name}-seed0" / "request.json").read_text())
        assert req["llm"] == "tiny-llama" and req["lora"] == {"r": 4} and req["data"] == ds.digest
        teacher = sha256_file(out / "sasrec-seed0" / "model.safetensors") if name == "llara" else None
        assert req["teacher_sha256"] == teacher
        ch = res["models"][name]["shuffle_change"]["NDCG@10"]
        assert ch["per_seed"] == [A.change_ratio(run["test"]["NDCG@10"], run["test-shuffled"]["NDCG@10"])]
    # the checkpoints evaluate to the same numbers from scratch
    ev = evaluate_baseline_checkpoint(ds, out / "llara-seed0", llm=tiny_llm(), batch_tokens=600,
                                      views=("test", "test-shuffled"))
    assert ev["test"] == res["models"]["llara"]["runs"]["0"]["test"]
    assert ev["test-shuffled"] == res["models"]["llara"]["runs"]["0"]["test-shuffled"]
    sas = res["models"]["sasrec"]["runs"]["0"]
    assert sas["test-shuffled"] == cf_shuffled_metrics(ds, out / "sasrec-seed0", history_window=W)
    # the table: three columns, a shuffled-inference table with the change ratios
    md = (out / "compare.md").read_text()
    assert md == format_compare_md(res) + "\n"
    assert md.startswith("# walk: CF-SRec and LLM4Rec baselines and LLM-SRec (Table 6 protocol)")
    assert "| Dataset | Metric | SASRec | TALLRec | LLaRA |" in md
    assert "on the seeded selection sample of 10 users" in md
    change = [line for line in md.splitlines() if line.startswith("| walk | NDCG@10 change |")]
    assert change == ["| walk | NDCG@10 change | " + " | ".join(
        f"{100 * res['models'][m]['shuffle_change']['NDCG@10']['mean']:+.2f}%" for m in ("sasrec", "tallrec", "llara"))
        + " |"]


def test_compare_reuses_llm4rec_runs(ds, three_models):
    out, res, _, kw = three_models
    stamp = (out / "llara-seed0" / "heads.safetensors").stat().st_mtime_ns
    logs: list[str] = []
    again = compare(ds, out, **{**kw, "llm": tiny_llm()}, log=logs.append)
    assert all("reused" in m for m in logs) and len(logs) == 4
    assert (out / "llara-seed0" / "heads.safetensors").stat().st_mtime_ns == stamp
    assert again["models"] == res["models"]
    # another budget retrains only the LLM4Rec runs
    logs.clear()
    compare(ds, out, **{**kw, "models": ["tallrec"], "llm": tiny_llm(),
                        "llm4rec_options": {**kw["llm4rec_options"], "max_steps": 1}}, log=logs.append)
    assert logs[0] == f"[tallrec seed 0] training -> {out / 'tallrec-seed0'}"
    assert json.loads((out / "tallrec-seed0" / "results.json").read_text())["steps"] == 1


def test_compare_baselines_with_a_cache_read_its_teacher(ds, three_models, tmp_path):
    """--cache without llmsrec: LLaRA's teacher is the checkpoint that built the cache (found by its
    weights digest in OUT), so the run of the fixture (same teacher, same request) is reused."""
    import h5py

    out, res, _, kw = three_models
    cache = tmp_path / "cache.h5"
    with h5py.File(cache, "w") as f:  # only the provenance is read
        f.attrs["provenance"] = json.dumps({"sasrec_sha256": sha256_file(out / "sasrec-seed0" / "model.safetensors")})
    logs: list[str] = []
    given = compare(ds, out, **{**kw, "models": ["llara"], "llm": tiny_llm(), "cache": cache}, log=logs.append)
    assert logs == [f"[llara seed 0] reused {out / 'llara-seed0'}"]
    assert given["llm4rec"]["teacher"] == f"SASRec ({out / 'sasrec-seed0'}), the checkpoint that built LLM-SRec's cache"
    assert given["models"]["llara"]["runs"] == res["models"]["llara"]["runs"]
    with pytest.raises(InputError, match="^--cache applies when --models includes llmsrec, llara, collm, allmrec or llmsrec-nodistill$"):
        compare(ds, out, **{**kw, "models": ["tallrec"], "cache": cache})


def test_cli_compare_llm4rec(ds, tmp_path):
    folder = tiny_llama_folder(tmp_path / "tiny-llm", layers=1)
    out = tmp_path / "c"
    r = CliRunner().invoke(main, ["compare", "--data", str(ds.root), "--out", str(out), "--models", "tallrec",
                                  "--llm", str(folder), "--history-window", str(W), "--batch-tokens", "600",
                                  "--llm4rec-max-steps", "1", "--llm4rec-eval-users", "5", "--llm4rec-batch-size",
                                  "8", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "| Dataset | Metric | TALLRec |" in r.output and "| walk | NDCG@10 change |" in r.output
    req = json.loads((out / "tallrec-seed0" / "request.json").read_text())
    assert req["options"] == {"epochs": 10, "patience": 10, "history_window": W, "batch_tokens": 600, "device": "cpu",
                              "fi": "moment", "max_steps": 1, "eval_users": 5, "evals_per_epoch": 10, "batch_size": 8}
    assert req["llm"] == str(folder) and req["teacher_sha256"] is None
    r = CliRunner().invoke(main, ["compare", "--data", str(ds.root), "--out", str(out), "--models", "sasrec",
                                  "--teacher", "gru4rec"])
    assert r.exit_code == 2 and "--teacher applies when --models includes llmsrec, llara" in r.output


# --- analyze --llm4rec -------------------------------------------------------------------------


def test_analyze_with_an_llm4rec_model(run_dir, tmp_path):  # noqa: F811
    from llmsrec.data import load_prepared

    out = tmp_path / "report"
    opts = {**BUDGET, "eval_users": 8}
    logs: list[str] = []
    only = "shuffled-inference,shuffled-training,similarity"
    docs = analyze_run(run_dir, out, only=only, llm4rec="llara", llm4rec_options=opts, llm=tiny_llm(),
                       progress=False, log=logs.append)
    si = docs["shuffled-inference"]["rows"]["LLaRA"]
    assert si["change"]["NDCG@10"]["per_seed"] == [A.change_ratio(si["original"]["NDCG@10"]["mean"],
                                                                  si["shuffled"]["NDCG@10"]["mean"])]
    assert "LLaRA" in docs["shuffled-inference"]["interpretation"]
    assert "LLM4Rec baselines LLaRA: LLM `tiny-llama`" in docs["shuffled-inference"]["scope"]
    # the original model's numbers are its checkpoint's, recomputed from scratch
    ds = load_prepared(run_dir / "data")
    ckpt = out / "models" / "llara-seed0"
    scores = baseline_scores(ds, ckpt, ("test", "test-shuffled"), llm=tiny_llm(), batch_tokens=600)
    ev = {v: metrics_of(s.scores) for v, s in scores.items()}
    assert si["original"]["NDCG@10"]["mean"] == pytest.approx(ev["test"]["NDCG@10"], abs=1e-12)
    assert si["shuffled"]["HR@10"]["mean"] == pytest.approx(ev["test-shuffled"]["HR@10"], abs=1e-12)
    sim = docs["similarity"]["rows"]["LLaRA (f_user(h_u))"]["mean"]
    assert sim == pytest.approx(A.mean_cosine_similarity(scores["test"].user, scores["test-shuffled"].user), abs=1e-6)
    # shuffled training: trained on the shuffled data (its digest says so), scored on the original test
    st = docs["shuffled-training"]["rows"]["LLaRA"]
    assert st["original"] == si["original"]
    cfg = json.loads((out / "models" / "llara-shuffled-training-seed0" / "heads_config.json").read_text())
    assert cfg["provenance"]["dataset_sha256"] == ds.digest + "+shuffled-training-seed0"
    assert "seq[:-2]` shuffled once per user as SASRec" in docs["shuffled-training"]["scope"]
    assert sum("training llara" in m for m in logs) == 2
    # a rerun reads the saved outputs: no training, no LLM forward
    logs.clear()
    again = analyze_run(run_dir, out, only=only, llm4rec="llara", llm4rec_options=opts, llm=tiny_llm(),
                        progress=False, log=logs.append)
    assert not [m for m in logs if m.startswith("[analyze] training")]
    assert again["similarity"]["rows"] == docs["similarity"]["rows"]
    assert again["shuffled-training"]["rows"] == docs["shuffled-training"]["rows"]


def test_analyze_refuses_llm4rec_options_that_do_nothing(tmp_path):
    base = ["analyze", "--run", str(tmp_path), "--no-progress"]
    cases = [
        (["--llm4rec-max-steps", "3"], "--llm4rec-max-steps: applies with --llm4rec only"),
        (["--device", "cpu", "--threads", "1", "--llm4rec", " "], "--device, --threads: apply with --llm4rec only"),
        (["--llm4rec", "tallrec", "--only", "warm-cold,case-studies"],
         "--llm4rec: the baselines feed shuffled-inference, shuffled-training, similarity only, and --only asks "
         "for none of them"),
    ]
    for args, msg in cases:
        r = CliRunner().invoke(main, [*base, *args])
        assert r.exit_code == 2 and r.output == f"error: {msg}\n", (args, r.output)
    assert list(tmp_path.iterdir()) == []  # refused before anything is written
