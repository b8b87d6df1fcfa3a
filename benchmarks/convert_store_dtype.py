"""Copy a float32 cache with its states stored as float16 (``precompute --store-dtype float16``'s
layout) without running the LLM again: the LLM's outputs are the same, only their storage
changes.

Every dataset and attribute is copied; the state datasets (``hidden``, ``out_layers``,
``slots``) are rounded to float16 (to nearest), their sha256 attributes and row checksums are
recomputed over the stored values, and the provenance gains ``store_dtype: float16``. The
copy is written as ``OUT.tmp`` and renamed when complete.

Run: ``python benchmarks/convert_store_dtype.py runs/demo/cache/cache.h5 runs/fp16/cache.h5``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np


def convert(src: Path, out: Path) -> dict:
    """Write ``out``, a float16-store copy of the float32 cache ``src``; returns sizes and seconds."""
    from llmsrec.cache.store import is_state, read_provenance
    from llmsrec.cache.verify import CHECKSUMS, crc_name, row_crcs, sha256_of

    t = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(src, "r") as a, h5py.File(tmp, "w", track_order=True) as b:
        prov = read_provenance(a, src)
        if prov.get("store_dtype", "float32") != "float32":
            raise SystemExit(f"{src}: already stored as {prov['store_dtype']}")
        for k, v in a.attrs.items():
            b.attrs[k] = v
        b.attrs["provenance"] = json.dumps({**prov, "store_dtype": "float16"}, sort_keys=True)
        names: list[str] = []
        a.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for n in names:
            if n.startswith(CHECKSUMS + "/"):
                continue
            ds = a[n]
            v = ds[()]
            if is_state(n):
                v = v.astype(np.float16)
            nd = b.create_dataset(n, data=v, track_times=False)
            for k, x in ds.attrs.items():
                nd.attrs[k] = sha256_of(v) if k == "sha256" else x
        for n in names:  # the row checksums of the (now float16) hidden datasets
            if not n.startswith(CHECKSUMS + "/"):
                continue
            stored = a[n][()]
            state = n[len(CHECKSUMS) + 1:]
            assert crc_name(state) == n
            new = np.where(stored != 0, row_crcs(b[state][()], np.float16), 0).astype(np.uint32)
            nd = b.create_dataset(n, data=new, track_times=False)
            for k, x in a[n].attrs.items():
                nd.attrs[k] = sha256_of(new) if k == "sha256" else x
    os.replace(tmp, out)
    return {"src_bytes": src.stat().st_size, "out_bytes": out.stat().st_size, "seconds": time.perf_counter() - t}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="a float32 cache (.h5)")
    ap.add_argument("out", type=Path, help="the float16 copy to write")
    a = ap.parse_args()
    r = convert(a.src, a.out)
    print(f"{a.out}: {r['out_bytes'] / 2**20:,.0f} MiB from {r['src_bytes'] / 2**20:,.0f} MiB "
          f"({r['out_bytes'] / r['src_bytes']:.3f}x) in {r['seconds']:.0f} s")
