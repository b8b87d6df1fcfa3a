"""What storing the cached states in half precision would change: trained heads scored on
states rounded to float16 / bfloat16 (and read back as float32) against the float32 cache.

The states of a cache are what the LLM computed; a half-precision store would keep them
rounded to 11 (float16) or 8 (bfloat16) significant bits. This script rounds the states of
an existing float32 cache in memory (no second cache is written, the LLM does not run) and
evaluates the given heads (``llmsrec train``'s output folder) on each rounding: the drift of
valid / test / test-shuffled NDCG@10 and HR@10, the largest state magnitude (float16 holds
up to 65,504) and the size of the state datasets. It measures the evaluation side only: heads
trained on rounded states were not measured here.

Run: ``python benchmarks/store_dtype_drift.py --run runs/demo [--heads runs/demo/heads]``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` (float32) rounded to ``dtype`` (``fp32`` = unchanged, ``fp16``, ``bf16``) and back to float32."""
    import torch

    if dtype == "fp32":
        return x
    t = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    return torch.from_numpy(np.ascontiguousarray(x)).to(t).float().numpy()


def state_bytes(cache: Path) -> tuple[int, int]:
    """(bytes of the float32 state datasets: hidden, out_layers, slots; bytes of the whole file)."""
    import h5py

    n = 0
    with h5py.File(cache, "r") as f:
        def visit(name, obj):
            nonlocal n
            if isinstance(obj, h5py.Dataset) and name.rsplit("/", 1)[-1] in ("hidden", "out_layers", "slots"):
                n += obj.size * obj.dtype.itemsize
        f.visititems(visit)
    return n, cache.stat().st_size


def main(run: Path, heads_dir: Path) -> dict:
    from llmsrec.data import load_prepared
    from llmsrec.heads.model import load_heads
    from llmsrec.heads.train import EVAL_VIEWS, evaluate_on_tensors, load_cached_tensors

    heads = load_heads(heads_dir)
    train = json.loads((heads_dir / "heads_config.json").read_text())["train"]
    cache = run / "cache" / "cache.h5"
    data = load_cached_tensors(load_prepared(run / "data"), cache, eval_views=EVAL_VIEWS,
                               user_readout=train["user_readout"], item_readout=train["item_readout"],
                               prefixes=train["prefixes"])
    peak = max(float(np.abs(data.item_hidden).max()), *(float(np.abs(h).max()) for h in data.eval_hidden.values()))
    out = {"heads": str(heads_dir), "cache": str(cache), "max_abs_state": peak}
    ref = None
    for dt in ("fp32", "fp16", "bf16"):
        sub = data if dt == "fp32" else replace(
            data, item_hidden=rounded(data.item_hidden, dt),
            eval_hidden={v: rounded(h, dt) for v, h in data.eval_hidden.items()})
        out[dt] = evaluate_on_tensors(heads, sub, EVAL_VIEWS)
        ref = ref or out[dt]
    n_state, n_file = state_bytes(cache)
    out["state_bytes_fp32"], out["file_bytes"] = n_state, n_file
    print(f"heads {heads_dir} on {cache}; largest |state| {peak:.1f} (float16 max 65,504)")
    print(f"{'view':<15} {'metric':<8} {'fp32':>8} {'fp16 - fp32':>12} {'bf16 - fp32':>12}")
    for v in ref:
        for m in ("NDCG@10", "HR@10"):
            print(f"{v:<15} {m:<8} {ref[v][m]:>8.4f} {out['fp16'][v][m] - ref[v][m]:>+12.5f} "
                  f"{out['bf16'][v][m] - ref[v][m]:>+12.5f}")
    print(f"state datasets: {n_state / 2**20:,.0f} MiB as float32 of a {n_file / 2**20:,.0f} MiB file; "
          f"half precision would store them in {n_state / 2**21:,.0f} MiB (file ~{(n_file - n_state / 2) / 2**20:,.0f} MiB, "
          f"{(n_file - n_state / 2) / n_file:.2f}x)")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="a run folder: data/ and cache/cache.h5")
    ap.add_argument("--heads", type=Path, default=None, help="trained heads folder [default: RUN/heads]")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = ap.parse_args()
    res = main(a.run, a.heads or a.run / "heads")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
