"""Stage bookkeeping and the results table of `llmsrec run` (no LLM needed)."""

import json

import pytest

from llmsrec.errors import InputError
from llmsrec.pipeline import Stage, format_results_md, input_fingerprint
from llmsrec.run_layout import file_digest


def test_stage_reuse_rules(tmp_path):
    out = tmp_path / "sasrec"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    digest = lambda: file_digest(out / "model.safetensors")  # noqa: E731

    st = Stage(tmp_path, "sasrec", {"epochs": 5, "views": ("a", "b")}, {"data": "d1"})
    assert not st.reusable(digest)  # no record yet
    st.start()
    assert json.loads((out / "stage.json").read_text())["status"] == "running"
    assert not st.reusable(digest)  # a killed stage is not reusable
    st.done(digest(), 1.5)
    rec = json.loads((out / "stage.json").read_text())
    assert rec["status"] == "done" and rec["options"] == {"epochs": 5, "views": ["a", "b"]}
    assert rec["output_digest"] == file_digest(out / "model.safetensors") and rec["seconds"] == 1.5
    assert Stage(tmp_path, "sasrec", {"epochs": 5, "views": ["a", "b"]}, {"data": "d1"}).reusable(digest)
    assert not Stage(tmp_path, "sasrec", {"epochs": 6, "views": ["a", "b"]}, {"data": "d1"}).reusable(digest)
    assert not Stage(tmp_path, "sasrec", {"epochs": 5, "views": ["a", "b"]}, {"data": "d2"}).reusable(digest)
    (out / "model.safetensors").write_bytes(b"changed")  # output edited since: rebuild
    assert not st.reusable(digest)
    (out / "model.safetensors").unlink()
    assert not st.reusable(digest)


def test_input_fingerprint(tmp_path):
    p = tmp_path / "x.inter"
    p.write_text("a\n")
    assert input_fingerprint(p) == "sha256:" + file_digest(p)
    with pytest.raises(InputError, match="no such file"):
        input_fingerprint(tmp_path / "missing")


def test_results_md_table():
    m = lambda a: {"NDCG@10": a, "NDCG@20": a + 0.1, "HR@10": a + 0.2, "HR@20": a + 0.3}  # noqa: E731
    res = {"dataset": "ml-100k", "protocol": {"split": "leave-last-out", "negatives": 99, "seed": 0},
           "models": {"SASRec": {"valid": m(0.2), "test": m(0.2)}, "LLM-SRec": {"valid": m(0.25), "test": m(0.1)}},
           "timings": {"prepare": 1.0, "train": 2.5}}
    md = format_results_md(res)
    assert "| Dataset | Metric | SASRec | LLM-SRec | LLM-SRec vs SASRec |" in md
    assert "| ml-100k | NDCG@10 | 0.2000 | 0.1000 | -50.0% |" in md  # test comes first
    assert "| ml-100k | NDCG@10 | 0.2000 | 0.2500 | +25.0% |" in md
    assert md.index("**test**") < md.index("**valid**")
    assert "prepare 1.0, train 2.5" in md
