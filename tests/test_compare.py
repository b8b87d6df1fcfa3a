"""``llmsrec compare``: runs, reuse, compare.json numbers, the Table 6-style compare.md."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from llmsrec.cfsrec import evaluate_cfsrec
from llmsrec.cli import main
from llmsrec.data import prepare_from_interactions
from llmsrec.errors import InputError
from llmsrec.experiments.compare import compare, format_compare_md, parse_models, parse_seeds

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_ITEMS = 30
CF = dict(epochs=2, eval_every=1, patience=2)
SMALL = {"*": {"maxlen": 10, "hidden": 16}}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    rng = np.random.default_rng(0)
    inter = []
    for u in range(40):
        length, start = int(rng.integers(6, 10)), int(rng.integers(0, N_ITEMS))
        for t in range(length):
            inter.append((f"u{u}", f"i{(start + t) % N_ITEMS}", 820_000_000 + 86_400 * t))
    titles = {f"i{i}": f"Movie Story {i} ({1990 + i % 10})" for i in range(N_ITEMS)}
    return prepare_from_interactions(inter, titles, tmp_path_factory.mktemp("data") / "walk", kcore=1,
                                     num_negatives=15, stats_extra={"dataset": "walk"})


@pytest.fixture(scope="module")
def two_models(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "out"
    logs: list[str] = []
    res = compare(ds, out, models=["sasrec", "gru4rec"], seeds=[0, 1], cf_options=CF, model_options=SMALL,
                  progress=False, log=logs.append)
    return out, res, logs


def test_parse_models_and_seeds():
    assert parse_models("sasrec, llmsrec,GRU4Rec,sasrec") == ["gru4rec", "sasrec", "llmsrec"]
    assert parse_seeds("2,0, 2") == [2, 0]
    with pytest.raises(InputError, match="unknown model 'caser'"):
        parse_models("sasrec,caser")
    with pytest.raises(InputError, match="not an integer"):
        parse_seeds("0,x")
    with pytest.raises(InputError, match="at least one seed"):
        parse_seeds(" , ")


def test_runs_and_summary(two_models, ds):
    out, res, logs = two_models
    assert {p.name for p in out.iterdir()} == {"gru4rec-seed0", "gru4rec-seed1", "sasrec-seed0", "sasrec-seed1",
                                               "compare.json", "compare.md"}
    assert json.loads((out / "compare.json").read_text()) == res
    assert list(res["models"]) == ["gru4rec", "sasrec"]  # Table 6 order, not --models order
    assert res["columns"] == ["GRU4Rec", "SASRec"]
    assert res["protocol"]["seeds"] == [0, 1] and res["protocol"]["negatives"] == 15
    assert res["data"]["digest"] == ds.digest
    for name in ("gru4rec", "sasrec"):
        entry = res["models"][name]
        for seed in ("0", "1"):
            run = entry["runs"][seed]
            assert run["test"] == evaluate_cfsrec(ds, out / f"{name}-seed{seed}")["test"]
            req = json.loads((out / f"{name}-seed{seed}" / "request.json").read_text())
            assert req["model"] == name and req["seed"] == int(seed) and req["model_options"]["maxlen"] == 10
        for split in ("valid", "test"):
            for k in ("NDCG@10", "NDCG@20", "HR@10", "HR@20"):
                vals = [entry["runs"][s][split][k] for s in ("0", "1")]
                assert entry["mean"][split][k] == pytest.approx(np.mean(vals), abs=1e-12)
                assert entry["std"][split][k] == pytest.approx(np.std(vals, ddof=1), abs=1e-12)
    # the two seeds really differ
    assert res["models"]["sasrec"]["runs"]["0"]["valid"] != res["models"]["sasrec"]["runs"]["1"]["valid"]
    assert sum("training" in m for m in logs) == 4


def test_markdown_table_format(two_models):
    out, res, _ = two_models
    md = (out / "compare.md").read_text()
    assert md == format_compare_md(res) + "\n"
    lines = md.splitlines()
    assert lines[0] == "# walk: CF-SRec baselines and LLM-SRec (Table 6 protocol)"
    assert "Mean ± sample std over seeds 0, 1; best mean per row in bold." in md
    head = lines.index("| Dataset | Metric | GRU4Rec | SASRec |")
    assert lines[head - 2] == "**test**" and lines[head + 1] == "|---|---|---:|---:|"
    cell = re.compile(r"^(\*\*)?(\d\.\d{4}) ± (\d\.\d{4})(\*\*)?$")
    for split, start in (("test", head + 2), ("valid", lines.index("**valid**") + 4)):
        for row, k in zip(lines[start : start + 4], ("NDCG@10", "NDCG@20", "HR@10", "HR@20")):
            parts = [p.strip() for p in row.strip("|").split("|")]
            assert parts[:2] == ["walk", k]
            means = []
            for name, text in zip(("gru4rec", "sasrec"), parts[2:]):
                m = cell.match(text)
                assert m, text
                assert float(m[2]) == round(res["models"][name]["mean"][split][k], 4)
                assert float(m[3]) == round(res["models"][name]["std"][split][k], 4)
                means.append((float(m[2]), bool(m[1])))
            best = max(v for v, _ in means)
            assert [b for _, b in means] == [v == best for v, _ in means]


def test_format_exact_single_seed_and_ties():
    def entry(display, test, seconds):
        metrics = dict(zip(("NDCG@10", "NDCG@20", "HR@10", "HR@20"), test))
        split = {"valid": metrics, "test": metrics}
        zeros = {s: {k: 0.0 for k in metrics} for s in ("valid", "test")}
        return {"display": display, "runs": {"0": {**split, "seconds": seconds}}, "mean": split, "std": zeros}

    res = {"dataset": "toy", "protocol": {"seeds": [0], "negatives": 99},
           "models": {"gru4rec": entry("GRU4Rec", (0.1, 0.2, 0.50001, 0.7), 2.0),
                      "sasrec": entry("SASRec", (0.3, 0.1, 0.5, 0.7), 4.0)}}
    table = ["| Dataset | Metric | GRU4Rec | SASRec |", "|---|---|---:|---:|",
             "| toy | NDCG@10 | 0.1000 | **0.3000** |", "| toy | NDCG@20 | **0.2000** | 0.1000 |",
             "| toy | HR@10 | **0.5000** | **0.5000** |", "| toy | HR@20 | **0.7000** | **0.7000** |"]
    expected = "\n".join([
        "# toy: CF-SRec baselines and LLM-SRec (Table 6 protocol)", "",
        "Leave-last-out; every model ranks each user's target against the same 99 stored negatives; "
        "checkpoint selected on validation NDCG@10, test evaluated once.",
        "Seed 0; best mean per row in bold.", "",
        "**test**", "", *table, "", "**valid**", "", *table, "",
        "Training wall time per run (s, mean over seeds; LLM-SRec: heads only): GRU4Rec 2.0, SASRec 4.0"])
    assert format_compare_md(res) == expected


def test_reuse_and_retrain(two_models, ds):
    out, res, _ = two_models
    weights = out / "sasrec-seed0" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    logs: list[str] = []
    again = compare(ds, out, models=["sasrec"], seeds=[0], cf_options=CF, model_options=SMALL, progress=False,
                    log=logs.append)
    assert logs == [f"[sasrec seed 0] reused {out / 'sasrec-seed0'}"]
    assert weights.stat().st_mtime_ns == stamp
    assert again["models"]["sasrec"]["runs"]["0"]["test"] == res["models"]["sasrec"]["runs"]["0"]["test"]
    assert again["models"]["sasrec"]["std"]["test"]["NDCG@10"] == 0.0
    # another option retrains that run (and only that one)
    logs.clear()
    compare(ds, out, models=["sasrec"], seeds=[0], cf_options={**CF, "epochs": 1}, model_options=SMALL,
            progress=False, log=logs.append)
    assert logs == [f"[sasrec seed 0] training -> {out / 'sasrec-seed0'}"]
    assert json.loads((out / "sasrec-seed0" / "request.json").read_text())["train"]["epochs"] == 1


def test_cli_compare(ds, tmp_path):
    runner = CliRunner()
    out = tmp_path / "c"
    r = runner.invoke(main, ["compare", "--data", str(ds.root), "--out", str(out), "--models", "nextitnet",
                             "--epochs", "1", "--eval-every", "1", "--maxlen", "10", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "| Dataset | Metric | NextItNet |" in r.output and "±" not in r.output
    assert json.loads((out / "nextitnet-seed0" / "config.json").read_text())["maxlen"] == 10
    r = runner.invoke(main, ["compare", "--data", str(ds.root), "--out", str(out), "--models", "caser"])
    assert r.exit_code == 2 and "unknown model 'caser'" in r.output
    # --cache / --teacher: refused (one line, naming the option given) when no asked model reads a teacher
    given = ["--cache", str(tmp_path / "x.h5")]
    for models, opt in (("sasrec", given), ("tallrec", given), ("nextitnet", ["--teacher", "gru4rec"])):
        r = runner.invoke(main, ["compare", "--data", str(ds.root), "--out", str(out), "--models", models, *opt])
        assert r.exit_code == 2 and r.output == f"error: {opt[0]} applies when --models includes llmsrec, llara, " \
                                                "collm, allmrec or llmsrec-nodistill\n", r.output
    for models in ("llmsrec", "llara"):  # the baselines read the cache's teacher: --cache is theirs too
        r = runner.invoke(main, ["compare", "--data", str(ds.root), "--out", str(out), "--models", models,
                                 "--cache", str(tmp_path / "missing.h5")])
        assert r.exit_code == 2 and r.output == f"error: --cache {tmp_path / 'missing.h5'}: no such file\n", r.output
    r = runner.invoke(main, ["compare", "--data", str(ds.root), "--out", str(out), "--models", "collm",
                             "--cache", str(tmp_path / "x.h5"), "--teacher", "sasrec"])
    assert r.exit_code == 2 and "not both" in r.output
    # --llm4rec-* without an LLM4Rec model do nothing: refused before any training
    r = runner.invoke(main, ["compare", "--data", str(ds.root), "--out", str(tmp_path / "none"), "--models", "sasrec",
                             "--llm4rec-max-steps", "3", "--llm4rec-epochs", "10"])
    assert r.exit_code == 2 and r.output == ("error: --llm4rec-epochs, --llm4rec-max-steps: apply when --models "
                                             "includes tallrec, llara, collm or allmrec\n"), r.output
    assert not (tmp_path / "none").exists()
    # LLM options without a model that runs the LLM do nothing either (--cache: llmsrec trains heads only)
    for models, extra in (("sasrec", []), ("llmsrec", ["--cache", str(tmp_path / "x.h5")])):
        r = runner.invoke(main, ["compare", "--data", str(ds.root), "--out", str(tmp_path / "none"), "--models",
                                 models, *extra, "--dtype", "bf16", "--llm", "smollm2-135m"])
        assert r.exit_code == 2 and r.output == ("error: --llm, --dtype: apply when a model runs the LLM: llmsrec "
                                                 "without --cache, tallrec, llara, collm or allmrec\n"), r.output
    assert not (tmp_path / "none").exists()


# --- LLM-SRec with another teacher, on a tiny random LLaMA ---------------------------------------


def _tiny_llm():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from llmsrec.precompute.llm import load_llm

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["This user has watched movies in the following order Movie Story 1995"] * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    return load_llm("tiny-llama", model=model, tokenizer=hf_tok)


def test_llmsrec_column_with_a_gru4rec_teacher(ds, tmp_path):
    from llmsrec.cache import open_cache
    from llmsrec.atomic import sha256_file

    llm = _tiny_llm()
    out = tmp_path / "ll"
    kw = dict(models=["llmsrec"], seeds=[0, 1], teacher="gru4rec", llm=llm, cf_options=CF, model_options=SMALL,
              precompute_options={"history_window": 4}, head_options={"epochs": 2, "hidden": 32},
              progress=False, log=lambda m: None)
    res = compare(ds, out, **kw)
    cache = out / "cache-gru4rec-seed0" / "cache.h5"
    with open_cache(cache) as reader:
        assert reader.provenance["sasrec_sha256"] == sha256_file(out / "gru4rec-seed0" / "model.safetensors")
        assert reader.item_cf().shape == (ds.n_items + 1, 16)
    assert list(res["models"]) == ["llmsrec"] and res["columns"] == ["LLM-SRec"]
    assert res["llmsrec"]["teacher"].startswith("GRU4Rec seed 0")
    assert res["llmsrec"]["cache_sha256"] == sha256_file(cache)
    runs = res["models"]["llmsrec"]["runs"]
    assert set(runs) == {"0", "1"} and runs["0"]["test"] != runs["1"]["test"]
    assert "the seeds vary the heads only" in (out / "compare.md").read_text()
    # everything is reused on a second call: the cache file is not rewritten
    stamp = cache.stat().st_mtime_ns
    logs: list[str] = []
    again = compare(ds, out, **{**kw, "log": logs.append})
    assert cache.stat().st_mtime_ns == stamp
    assert any("reused" in m and "llmsrec-seed1" in m for m in logs)
    assert again["models"]["llmsrec"]["mean"] == res["models"]["llmsrec"]["mean"]
    # the same cache passed with --cache: its teacher is recognised by its weights digest
    given = compare(ds, out, models=["llmsrec"], seeds=[1], cache=cache, head_options=kw["head_options"],
                    progress=False, log=logs.append)
    assert given["llmsrec"]["teacher"] == f"GRU4Rec ({out / 'gru4rec-seed0'})"
    assert given["models"]["llmsrec"]["runs"]["1"] == runs["1"]
    with pytest.raises(InputError, match="not both"):
        compare(ds, out, models=["llmsrec"], cache=cache, teacher="sasrec")


def test_llmsrec_and_its_no_distill_ablation_share_one_cache(ds, tmp_path):
    """``llmsrec-nodistill``: the same heads without L_Distill, on the cache LLM-SRec's run built
    (with the readouts and prefix view llmsrec's heads read), side by side in compare.md."""
    from llmsrec.defaults import LLMSREC_HEADS

    out = tmp_path / "abl"
    res = compare(ds, out, models=["llmsrec", "llmsrec-nodistill"], seeds=[0], teacher="gru4rec", llm=_tiny_llm(),
                  cf_options=CF, model_options=SMALL, precompute_options={"history_window": 4},
                  head_options={**LLMSREC_HEADS, "epochs": 2, "hidden": 32}, progress=False, log=lambda m: None)
    assert res["columns"] == ["LLM-SRec", "LLM-SRec w/o L_Distill"]
    assert sorted(p.name for p in out.glob("cache-*")) == ["cache-gru4rec-seed0"]  # built once
    cfg = {m: json.loads((out / f"{m}-seed0" / "heads_config.json").read_text())["train"]
           for m in ("llmsrec", "llmsrec-nodistill")}
    assert cfg["llmsrec"]["distill"] == "mse" and cfg["llmsrec-nodistill"]["distill"] == "none"
    assert {k: cfg["llmsrec-nodistill"][k] for k in LLMSREC_HEADS} == LLMSREC_HEADS
    for m in ("llmsrec", "llmsrec-nodistill"):  # the built cache has test-shuffled: a shuffled row for both
        assert "NDCG@10" in res["models"][m]["shuffle_change"]
    md = (out / "compare.md").read_text()
    assert "| LLM-SRec | LLM-SRec w/o L_Distill |" in md and "NDCG@10 change" in md
