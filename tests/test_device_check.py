"""benchmarks/device_check.py (`make device-check`): its comparison logic on synthetic arrays and
caches, its report, and its no-accelerator exits. No GPU and no model needed; the full run with
the CPU standing in for the accelerator is `python benchmarks/device_check.py --device cpu`."""

import importlib.util
import json
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dc():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "benchmarks" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_vector_errors_relative_l2_per_vector(dc):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 3, 8)).astype(np.float32)
    a[0] = 0.0  # padding row: skipped when both sides are zero
    b = a.copy()
    b[1, 0] *= 1.01  # relative error 0.01 on one vector
    b[2, 2] += 0.5 * np.linalg.norm(a[2, 2]) * np.eye(8, dtype=np.float32)[0]  # exactly 0.5
    e = dc.vector_errors(a, b)
    assert e["vectors"] == 12 and e["zero_mismatch"] == 0 and e["nonfinite"] == 0
    assert e["max"] == pytest.approx(0.5, rel=1e-6)
    assert e["mean"] == pytest.approx((0.01 + 0.5) / 12, rel=1e-5)
    assert dc.vector_errors(a, a)["max"] == 0.0


def test_vector_errors_flags_zero_pattern_and_nonfinite(dc):
    a = np.ones((4, 6), np.float32)
    a[3] = 0.0
    b = a.copy()
    b[3, 0] = 1.0  # a padding row that the other side filled
    b[1, 2] = np.nan
    e = dc.vector_errors(a, b)
    assert e["zero_mismatch"] == 1 and e["nonfinite"] == 1 and e["max"] == np.inf
    with pytest.raises(ValueError, match="shapes differ"):
        dc.vector_errors(a, a[:3])


def _cache(path: Path, scale: float = 1.0, drop: str | None = None) -> Path:
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        for name, shape in (("items/hidden", (4, 8)), ("users/test/hidden", (3, 8)),
                            ("users/test/slots", (3, 2, 4, 8)), ("users/test/cf", (3, 5))):
            if name != drop:
                x = rng.standard_normal(shape).astype(np.float32)
                x[0] = 0.0
                f[name] = x * (scale if "hidden" in name else 1.0)
        f["users/test/target"] = np.arange(3)  # integer: not a state
        f["params/f_I/weight"] = np.ones((8, 5), np.float32)  # not under items/users
    return path


def test_compare_caches_per_dataset_and_all(dc, tmp_path):
    ref = _cache(tmp_path / "a.h5")
    assert dc.float_datasets(ref) == ["items/hidden", "users/test/cf", "users/test/hidden", "users/test/slots"]
    res = dc.compare_caches(ref, _cache(tmp_path / "b.h5", scale=1.02))
    assert res["items/hidden"]["max"] == pytest.approx(0.02, rel=1e-4)
    assert res["users/test/cf"]["max"] == 0.0 and res["users/test/slots"]["max"] == 0.0
    a = res["all"]
    assert a["vectors"] == 3 + 2 + 2 + 16 and a["max"] == pytest.approx(0.02, rel=1e-4)
    assert a["mean"] == pytest.approx(0.02 * 5 / 23, rel=1e-4)
    with pytest.raises(ValueError, match="no dataset users/test/slots"):
        dc.compare_caches(ref, _cache(tmp_path / "c.h5", drop="users/test/slots"))


def _states(mx: float, mean: float, bad: int = 0) -> dict:
    return {"all": {"max": mx, "mean": mean, "vectors": 10, "zero_mismatch": bad, "nonfinite": 0}}


def test_run_checks_against_the_stated_tolerances(dc):
    tol = dc.TOLERANCES
    heads = {dc.REF_HEADS: {"test_ndcg10": 0.30}, "cuda heads, cpu fp32 cache": {"test_ndcg10": 0.305},
             "cuda heads, cuda bf16 cache": {"test_ndcg10": 0.30 - 2 * tol["ndcg10"]}}
    checks = dc.run_checks({"fp32": _states(5e-4, 2e-5), "bf16": _states(0.2, 0.02, bad=1)}, heads)
    ok = {c["name"]: c["ok"] for c in checks}
    assert ok == {"fp32 states: max relative error": True, "fp32 states: mean relative error": True,
                  "fp32 states: zero-pattern / non-finite vectors": True,
                  "bf16 states: max relative error": False, "bf16 states: mean relative error": True,
                  "bf16 states: zero-pattern / non-finite vectors": False,
                  f"test NDCG@10 |cuda heads, cpu fp32 cache - {dc.REF_HEADS}|": True,
                  f"test NDCG@10 |cuda heads, cuda bf16 cache - {dc.REF_HEADS}|": False}
    assert all(c["tolerance"] in tol.values() or c["tolerance"] == 0 for c in checks)


def test_parse_summary_reads_the_precompute_summary_line(dc):
    from llmsrec.precompute.job import summary

    job = types.SimpleNamespace(t0=0.0, out="x.h5")
    line = summary({"prompts": 139, "real": 13366, "padded": 15000, "wall": 43.1}, job)
    p = dc.parse_summary(["something else", line])
    assert p["prompts"] == 139 and p["real_tokens"] == 13366 and p["forward_s"] == 43.1
    assert p["tokens_per_s"] == pytest.approx(13366 / 43.1) and p["padding"] == pytest.approx(0.109)
    assert dc.parse_summary(["x.h5: already complete for items and views test"]) is None


def test_markdown_report(dc):
    rep = {"device": "cuda", "device_label": "nvidia-h200", "torch": "2.13.0", "llm": "smollm2-135m",
           "slice": {"max_users": 200, "users": 200, "items": 871, "negatives": 99, "history_window": 10,
                     "views": ["valid", "test", "train-prefix"], "sasrec_epochs": 20, "heads_epochs": 10},
           "precompute": {"reference": {"tokens_per_s": 2000.0, "real_tokens": 100, "forward_s": 1.0,
                                        "total_s": 2.0, "peak_bytes": None},
                          "bf16": {"total_s": 1.0, "peak_bytes": 3 * 2**20}},
           "states": {"bf16": _states(0.05, 0.01)},
           "heads": {dc.REF_HEADS: {"test_ndcg10": 0.3, "valid_ndcg10": 0.31, "total_s": 5.0, "peak_bytes": None}},
           "checks": dc.run_checks({"bf16": _states(0.05, 0.01)}, {}), "passed": True, "wall_s": 300.0,
           "budget_s": dc.BUDGET_S}
    md = dc.format_markdown(rep)
    assert md.startswith("# device-check: nvidia-h200 (cuda)") and "**PASS**" in md
    assert "| cpu fp32 (reference) | 2000 | 100 |" in md and "| cuda bf16 | 0 | 0 | 0.0 | 1.0 | 3 |" in md
    assert "| bf16 states: max relative error | 0.05 | 0.15 | ok |" in md
    json.dumps(rep)  # the JSON report is plain data


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_one_line_and_exit_0(dc, capsys):
    assert dc.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("device-check: CUDA is not available")


def test_hpu_without_habana_one_line_and_exit_2(dc, capsys, monkeypatch):
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "1")  # prepare_hpu sets it; restored afterwards
    if importlib.util.find_spec("habana_frameworks") is not None:
        pytest.skip("habana_frameworks is installed")
    assert dc.main(["--device", "hpu"]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "habana_frameworks is not installed" in out


def test_unknown_device_one_line_and_exit_2(dc, capsys):
    assert dc.main(["--device", "tpu"]) == 2
    assert capsys.readouterr().out == "device-check: --device tpu: expected cuda, cuda:N, hpu or cpu\n"


def test_help_states_the_tolerances(dc, capsys):
    with pytest.raises(SystemExit) as e:
        dc.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for k in ("fp32 max 0.001 / mean 0.0001", "bf16 max 0.15 / mean 0.05", "<= 0.02"):
        assert k in text


def test_main_exit_1_on_a_mismatch_and_writes_the_report(dc, tmp_path, monkeypatch, capsys):
    bad = dc.run_checks({"fp32": _states(2e-3, 1e-5)}, {})
    rep = {"device": "cpu", "device_label": "cpu-selftest", "torch": "x", "llm": "m",
           "slice": {"max_users": 20, "users": 20, "items": 79, "negatives": 5, "history_window": 3,
                     "views": ["test"], "sasrec_epochs": 2, "heads_epochs": 2},
           "precompute": {}, "states": {"fp32": _states(2e-3, 1e-5)}, "heads": {}, "checks": bad,
           "passed": all(c["ok"] for c in bad), "wall_s": 1.0, "budget_s": dc.BUDGET_S}
    seen = {}

    def fake(args, work, say=print):
        seen.update(users=args.users, window=args.history_window, negatives=args.negatives)
        return rep

    monkeypatch.setattr(dc, "device_check", fake)
    assert dc.main(["--device", "cpu", "--out", str(tmp_path)]) == 1
    assert seen == {"users": 20, "window": 3, "negatives": 5}  # the self-test's small defaults
    out = capsys.readouterr().out
    assert "FAIL fp32 states: max relative error: 0.002 (tolerance 0.001)" in out
    assert "device-check: FAIL" in out
    assert json.loads((tmp_path / "device-check-cpu-selftest.json").read_text())["passed"] is False
    assert "**FAIL**" in (tmp_path / "device-check-cpu-selftest.md").read_text()
