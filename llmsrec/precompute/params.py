"""The trainable LLM-input parameters as a file: f_I and the ``[UserOut]``/``[ItemOut]`` vectors.

A *params file* is a safetensors file (no pickle) with float32 tensors

=====================  ================  ===================================================
key                    shape             meaning
=====================  ================  ===================================================
``f_I/weight``         (d_llm, d_cf)     linear f_I: ``f_I(e) = e @ weight.T + bias``
``f_I/bias``           (d_llm,)
``tokens/user_out``    (d_llm,)          input embedding of ``[UserOut]``
``tokens/item_out``    (d_llm,)          input embedding of ``[ItemOut]``
=====================  ================  ===================================================

(the names and meaning of the cache's ``/params`` group). An MLP f_I (``llmsrec train
--mode e2e --fi-arch mlp``, the authors' Linear-LayerNorm-LeakyReLU-Linear) is stored as
``f_I/0.weight``, ``f_I/0.bias``, ``f_I/1.weight``, ``f_I/1.bias``, ``f_I/3.weight``,
``f_I/3.bias`` with the metadata ``f_I_arch = "mlp"``; the metadata ``f_I_arch`` is
``"linear"`` otherwise. ``llmsrec refine-tokens`` and ``llmsrec train --mode e2e`` write
params files; ``llmsrec precompute --params FILE`` builds a cache from a linear one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from safetensors import safe_open

from llmsrec.atomic import atomic_file
from llmsrec.errors import InputError
from llmsrec.safetensors_io import save_numpy

FORMAT = "llmsrec-llm-params-v1"
LINEAR_KEYS = ("f_I/weight", "f_I/bias", "tokens/user_out", "tokens/item_out")


def write_params(path: str | os.PathLike, arrays: dict[str, np.ndarray], *, arch: str = "linear",
                 extra: dict[str, str] | None = None) -> Path:
    """Write a params file atomically.

    Args:
        path: the ``.safetensors`` file to write.
        arrays: ``tokens/user_out``, ``tokens/item_out`` and the ``f_I/...`` tensors
            (numpy or torch, any float dtype; stored as float32).
        arch: ``linear`` (needs ``f_I/weight`` and ``f_I/bias``) or ``mlp``.
        extra: more string metadata (e.g. where the values came from).
    Returns:
        ``Path(path)``.
    Raises:
        InputError: a required key is missing or ``arch`` is unknown.
    """
    if arch not in ("linear", "mlp"):
        raise InputError(f"params: f_I arch {arch!r}: expected 'linear' or 'mlp'")
    need = LINEAR_KEYS if arch == "linear" else LINEAR_KEYS[2:]
    missing = [k for k in need if k not in arrays]
    if missing:
        raise InputError(f"params: missing {', '.join(missing)}")
    out = {}
    for k, v in arrays.items():
        if hasattr(v, "detach"):
            v = v.detach().float().cpu().numpy()
        out[k] = np.ascontiguousarray(v, dtype=np.float32)
    meta = {"format": FORMAT, "f_I_arch": arch, **(extra or {})}
    with atomic_file(path, "wb") as f:
        f.write(save_numpy(out, metadata=meta))
    return Path(path)


def read_params(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a params file: (float32 arrays by key, metadata).

    Raises:
        InputError: missing/unreadable file, or the token vectors are missing.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such params file")
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            arrays = {k: np.asarray(f.get_tensor(k), dtype=np.float32) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise InputError(f"{p}: not a safetensors params file ({str(e).splitlines()[0]})") from None
    missing = [k for k in LINEAR_KEYS[2:] if k not in arrays]
    if missing:
        raise InputError(f"{p}: field '{missing[0]}' missing (not an llmsrec params file)")
    meta.setdefault("f_I_arch", "linear" if "f_I/weight" in arrays else "mlp")
    return arrays, meta


def read_linear_params(path: str | os.PathLike, d_llm: int, d_cf: int) -> dict[str, np.ndarray]:
    """The four arrays of a linear params file, shape-checked (what precompute can store).

    Returns:
        ``{"f_I/weight": (d_llm, d_cf), "f_I/bias": (d_llm,), "tokens/user_out": (d_llm,),
        "tokens/item_out": (d_llm,)}`` float32.
    Raises:
        InputError: an MLP f_I, or a shape that does not fit the model / SASRec.
    """
    arrays, meta = read_params(path)
    if meta["f_I_arch"] != "linear" or "f_I/weight" not in arrays:
        raise InputError(f"{path}: f_I is an MLP; a cache stores a linear f_I only (evaluate an e2e "
                         f"checkpoint with `llmsrec evaluate --model llmsrec-e2e`)")
    want = {"f_I/weight": (d_llm, d_cf), "f_I/bias": (d_llm,), "tokens/user_out": (d_llm,),
            "tokens/item_out": (d_llm,)}
    for k, shape in want.items():
        if k not in arrays:
            raise InputError(f"{path}: field '{k}' missing")
        if arrays[k].shape != shape:
            raise InputError(f"{path}: field '{k}' has shape {arrays[k].shape}, expected {shape} "
                             f"(d_llm of the LLM, d_cf of SASRec)")
    return {k: arrays[k] for k in want}
