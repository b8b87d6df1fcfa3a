"""Chunk shape of the cache's state datasets: read and write speed of each candidate.

A ``(rows, 576)`` float32 dataset (the bundled model's width) is written the way precompute
writes it (chunks of 256 rows scattered over the view: prompts are sorted by length) and
read the three ways streamed training reads it (``llmsrec.cache.stream``): blocks of
consecutive rows (scoring), windows of whole chunks in a shuffled order (one process's
epoch), and half of every batch's rows (one of two torchrun ranks). The file's pages are
dropped from the OS cache before every pass (``posix_fadvise``), so reads come from the
disk. Prints MB/s per pattern and chunk shape, and the rows per chunk that llmsrec uses.

    python benchmarks/bench_chunks.py [--rows 65536] [--out benchmarks/results/chunks.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmsrec.cache.stream import RowStore, epoch_order  # noqa: E402

D = 576


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(path: Path, rows: int, chunk_rows: int | None) -> dict:
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("h", shape=(rows, D), dtype=np.float32, chunks=None if chunk_rows is None else
                              (chunk_rows, D), data=np.zeros((rows, D), np.float32))
        perm = rng.permutation(rows)
        for s in range(0, rows, 256):
            idx = np.sort(perm[s : s + 256])
            ds[idx] = rng.standard_normal((len(idx), D), dtype=np.float32)
    write = time.perf_counter() - t
    mb = rows * D * 4 / 1e6
    out = {"chunk_rows": chunk_rows, "write_MBps": round(mb / write, 1)}
    users = np.arange(1, rows, dtype=np.int64)
    cr = chunk_rows or 1024
    patterns = {
        "blocks": lambda: [np.arange(s, min(s + 2048, rows)) for s in range(0, rows, 2048)],
        "windows": lambda: np.array_split(epoch_order(users, cr, 8192, rng), max(1, rows // 8192)),
        "half_of_each_batch": lambda: [g[: len(g) // 2] for g in
                                       np.array_split(rng.permutation(users), max(1, rows // 20))],
    }
    for name, groups in patterns.items():
        gs = groups()
        if name == "half_of_each_batch":  # a rank reads ~4096 of its rows at once
            gs = np.array_split(np.concatenate(gs), max(1, rows // 8192))
        _drop_cache(path)
        store = RowStore(path)
        h = store.rows("h")
        t = time.perf_counter()
        for g in gs:
            h.read(g)
        secs = time.perf_counter() - t
        out[f"{name}_MBps"] = round(store.bytes_read / 1e6 / secs, 1)
        store.close()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--chunks", default="16,64,128,256,1024,contiguous")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the chunk shapes (alternating); best kept")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    res = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        best: dict[str, dict] = {}
        for _ in range(a.repeats):
            for c in a.chunks.split(","):
                r = measure(Path(tmp) / "c.h5", a.rows, None if c == "contiguous" else int(c))
                b = best.setdefault(c, r)
                for k, v in r.items():
                    if k.endswith("MBps"):
                        b[k] = max(b[k], v)
        for r in best.values():
            res.append(r)
            print(json.dumps(r), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"rows": a.rows, "d": D, "results": res}, indent=1) + "\n")
    return {"rows": a.rows, "results": res}


if __name__ == "__main__":
    main()
