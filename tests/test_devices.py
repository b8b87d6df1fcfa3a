"""Device options (cpu / cuda / hpu) without the hardware: dtype defaults, 8-bit and Gaudi
refusals, missing libraries, distributed backends, and that CPU users never import Habana
or bitsandbytes."""

import builtins
import socket
import subprocess
import sys
import types

import pytest
import torch
from click.testing import CliRunner

from llmsrec import distributed as dd
from llmsrec.cli import main
from llmsrec.devices import mark_step, prepare_hpu, resolve_device, to_device
from llmsrec.errors import InputError
from llmsrec.precompute.llm import prepare_gaudi, check_llm_options, load_llm, resolve_dtype


def fail_import(monkeypatch, prefix):
    """Make ``import prefix...`` raise ImportError, as if the library were not installed."""
    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == prefix or name.startswith(prefix + "."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    for m in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        monkeypatch.delitem(sys.modules, m)


def test_dtype_defaults_per_device():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype(None, "cuda") == torch.bfloat16
    assert resolve_dtype(None, "hpu") == torch.bfloat16
    assert resolve_dtype("fp16", "cuda") == torch.float16 and resolve_dtype("fp32", "hpu") == torch.float32
    with pytest.raises(InputError, match="--dtype int4"):
        resolve_dtype("int4", "cuda")


def test_8bit_refused_off_cuda_and_without_bitsandbytes(monkeypatch):
    with pytest.raises(InputError, match=r"^--load-in-8bit: needs --device cuda \(bitsandbytes\), got --device cpu$"):
        check_llm_options("cpu", load_in_8bit=True)
    with pytest.raises(InputError, match="not supported on Gaudi"):
        check_llm_options("hpu", load_in_8bit=True)
    # refused before anything is loaded (the bundled model is never touched)
    with pytest.raises(InputError, match="--load-in-8bit"):
        load_llm("smollm2-135m", device="cpu", load_in_8bit=True)
    fail_import(monkeypatch, "bitsandbytes")
    with pytest.raises(InputError, match=r"^--load-in-8bit: bitsandbytes is not installed \(pip install "):
        check_llm_options("cuda:1", load_in_8bit=True)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    check_llm_options("cuda", load_in_8bit=True)  # installed + CUDA: accepted
    check_llm_options("cpu")
    with pytest.raises(InputError, match="--hpu-graphs: needs --device hpu"):
        check_llm_options("cuda", hpu_graphs=True)
    with pytest.raises(InputError, match="--device tpu"):
        check_llm_options("tpu")


def test_cli_refuses_8bit_before_work(tmp_path):
    r = CliRunner().invoke(main, ["precompute", "--data", str(tmp_path / "none"), "--sasrec", str(tmp_path),
                                  "--out", str(tmp_path / "c.h5"), "--load-in-8bit", "--device", "hpu"])
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: --load-in-8bit: not supported on Gaudi (--device hpu); use --dtype bf16"


def test_gaudi_missing_libraries_and_lazy_mode(monkeypatch):
    monkeypatch.delenv("PT_HPU_LAZY_MODE", raising=False)
    fail_import(monkeypatch, "habana_frameworks")
    with pytest.raises(InputError, match=r"^--device hpu: habana_frameworks is not installed"):
        resolve_device("hpu")
    import os

    assert os.environ["PT_HPU_LAZY_MODE"] == "1"  # lazy mode by default, set before the import
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "0")
    with pytest.raises(InputError):
        prepare_hpu()
    assert os.environ["PT_HPU_LAZY_MODE"] == "0"  # the user's choice is kept
    fail_import(monkeypatch, "optimum")
    with pytest.raises(InputError, match=r"^--device hpu: optimum-habana is not installed"):
        prepare_gaudi()
    mark_step(torch.device("cpu"))  # a no-op off Gaudi


def test_backends_and_distributed_init_errors(monkeypatch):
    assert {d: dd.backend_for(d) for d in ("cpu", "cuda", "cuda:1", "hpu")} == \
        {"cpu": "gloo", "cuda": "nccl", "cuda:1": "nccl", "hpu": "hccl"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(InputError, match="start it with torchrun"):
        dd.init_distributed("cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="--device cuda: CUDA/nccl is not available"):
            dd.init_distributed("cuda")
    fail_import(monkeypatch, "habana_frameworks")
    with pytest.raises(InputError, match="--device hpu: habana_frameworks is not installed"):
        dd.init_distributed("hpu")
    monkeypatch.undo()
    # a one-process gloo group: joins, reports its backend, leaves
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    assert dd.init_distributed("cpu") == "gloo"
    try:
        assert dd.active() == (0, 1)
        assert dd.init_distributed("cpu") == "gloo"  # idempotent
        assert dd.broadcast_json({"a": [1, 2.5, "x"]}) == {"a": [1, 2.5, "x"]}
        x = torch.arange(6.0).view(3, 2)
        assert torch.equal(dd.all_gather_rows(x, 3), x)
    finally:
        dd.shutdown_distributed()
    assert dd.active() is None


def test_to_device_on_cpu_is_a_no_op():
    t = torch.arange(4)
    assert to_device(t, "cpu") is t and to_device(t, torch.device("cpu")) is t


def test_importing_llmsrec_never_imports_habana_or_bitsandbytes():
    code = (
        "import sys, llmsrec, llmsrec.cli, llmsrec.devices, llmsrec.distributed, llmsrec.doctor, "
        "llmsrec.precompute.llm, llmsrec.precompute.engine, llmsrec.heads.train\n"
        "from llmsrec.devices import resolve_device\n"
        "from llmsrec.precompute.llm import check_llm_options\n"
        "resolve_device('cpu'); check_llm_options('cpu')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('habana_frameworks', 'bitsandbytes', 'optimum'))\n"
        "print('BAD', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "BAD []"
