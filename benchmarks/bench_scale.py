"""Heads training and evaluation at scale: in memory vs streamed from the cache file.

For each user count, a synthetic cache with planted structure (every user's state is its
target item's state plus noise, so the heads learn something measurable) is written in the
layout of docs/cache-schema.md: the bundled model's width (H 576, SASRec d 64), readout
``out`` (the default heads' ``layers+slots`` readout holds (1 + W) x nL states per user,
44x the bytes with W 10 and 4 layers: far too large at millions of users), chunked states with row checksums, views
``train``, ``valid``, ``test``. Then, one subprocess per mode (so peak RSS is the mode's):

- ``in-memory``: the views read whole (``CacheReader``, what ``train --in-memory`` does;
  skipped when they would not fit in half the available memory),
- ``streamed``: ``llmsrec.cache.stream`` (what ``train --stream`` does, shuffle buffer
  ``--shuffle-buffer``),

each runs one epoch of heads training (the default heads and Adam; 3 sampled negatives,
the authors' code, since the full-catalogue softmax's per-step cost would measure the item
table, not the data path; one validation at the end of the epoch) and one full evaluation
of the test view. Reported per mode: peak RSS, load seconds, training rows/s (training
steps only), evaluation rows/s, bytes read from the cache (one process; under torchrun
each rank reads ~1/N of them, tests/test_distributed_train.py), test NDCG@10 (a random
ranking of 101 candidates gives ~0.046).

    python benchmarks/bench_scale.py --users 100000,1000000,4000000 \\
        --out benchmarks/results/scale.json [--dir /big/disk] [--batch-size 20]

Disk: ~7 GB per million users (3 views x float32 states). Timings are only comparable
within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H, D_CF, N_ITEMS, N_CAND = 576, 64, 10_000, 101
VIEWS = ("train", "valid", "test")
BLOCK = 65_536  # rows generated at once


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed pseudo-random uint64 of each uint64."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def targets_of(view: str, users: np.ndarray) -> np.ndarray:
    """int64 target item (1..N) of ``users`` in ``view`` (a fixed hash; row 0 has none)."""
    salt = np.uint64(VIEWS.index(view) + 1) << np.uint64(40)
    with np.errstate(over="ignore"):
        t = (_mix64(users.astype(np.uint64) + salt) % np.uint64(N_ITEMS)).astype(np.int64) + 1
    return np.where(users > 0, t, 0)


class HashedCandidates:
    """The (U, 101) candidates of a split without storing them: column 0 the target, then
    100 items from a fixed hash of (user, column) (may repeat the target: a pessimistic tie,
    the same in both modes). Rows are sliced like an array (``[lo:hi]``)."""

    def __init__(self, split: str, n_users: int):
        self.split, self.shape = split, (n_users, N_CAND)

    def __getitem__(self, key):
        lo, hi, _ = key.indices(self.shape[0])
        users = np.arange(lo + 1, hi + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            h = _mix64(users[:, None] * np.uint64(1 << 8) + np.arange(1, N_CAND, dtype=np.uint64)
                       + (np.uint64(7) << np.uint64(50)))
        neg = (h % np.uint64(N_ITEMS)).astype(np.int64) + 1
        return np.concatenate([targets_of(self.split, users.astype(np.int64))[:, None], neg], axis=1)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[0 : self.shape[0]], dtype=dtype)


class NoHistory:
    """``train_exclude`` of users without a stored history (nothing excluded but the target)."""

    EMPTY = np.zeros(0, dtype=np.int64)

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return self.EMPTY


def build_cache(path: Path, n_users: int, seed: int = 0) -> float:
    """Write the synthetic cache; return its size in GB."""
    import h5py

    from llmsrec.cache.store import state_chunks
    from llmsrec.cache.verify import row_crcs

    rng = np.random.default_rng(seed)
    item_h = rng.standard_normal((N_ITEMS + 1, H), dtype=np.float32)
    item_h[0] = 0
    proj = (rng.standard_normal((H, D_CF), dtype=np.float32) / np.sqrt(H)).astype(np.float32)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f["items/hidden"] = item_h
        f["items/cf"] = rng.standard_normal((N_ITEMS + 1, D_CF), dtype=np.float32)
        f["progress/items"] = np.ones(1, dtype=bool)
        for v in VIEWS:
            rows = n_users + 1
            hd = f.create_dataset(f"users/{v}/hidden", shape=(rows, H), dtype=np.float32,
                                  chunks=state_chunks((rows, H), 4))
            cf = f.create_dataset(f"users/{v}/cf", shape=(rows, D_CF), dtype=np.float32)
            crc = f.create_dataset(f"checksums/users/{v}/hidden", shape=(rows,), dtype=np.uint32)
            for s in range(0, rows, BLOCK):
                u = np.arange(s, min(s + BLOCK, rows), dtype=np.int64)
                h = item_h[targets_of(v, u)] + rng.standard_normal((len(u), H), dtype=np.float32)
                h[u == 0] = 0
                hd[s : s + len(u)] = h
                cf[s : s + len(u)] = h @ proj
                crc[s : s + len(u)] = row_crcs(h)
            f[f"users/{v}/target"] = targets_of(v, np.arange(rows, dtype=np.int64))
            f[f"progress/users/{v}"] = np.ones(1, dtype=bool)
        f.attrs["provenance"] = json.dumps({"synthetic": "benchmarks/bench_scale.py", "users": n_users,
                                            "seed": seed})
    os.replace(tmp, path)
    return path.stat().st_size / 1e9


def run_mode(cache: Path, n_users: int, mode: str, batch_size: int, shuffle_buffer: int, hidden: int = 2048,
             train_users: int = 0) -> dict:
    """One mode in this process: load, one epoch, one test evaluation."""
    import torch

    from llmsrec.cache import open_cache
    from llmsrec.cache.stream import RowStore
    from llmsrec.heads.train import CachedTensors, TrainConfig, evaluate_on_tensors, fit_heads

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t = time.perf_counter()
    with open_cache(cache) as r:
        item_h, targets = r.item_hidden(), r.targets("train")
        if mode == "streamed":
            store = RowStore(cache)
            hid = {v: store.rows(f"users/{v}/hidden") for v in VIEWS}
            train_cf = store.rows("users/train/cf")
        else:
            store = None
            hid = {v: r.user_hidden(v) for v in VIEWS}
            train_cf = r.user_cf("train")
    cands = {s: HashedCandidates(s, n_users) for s in ("valid", "test")}
    if mode != "streamed":
        cands = {s: np.asarray(c) for s, c in cands.items()}
    data = CachedTensors(n_items=N_ITEMS, item_hidden=item_h, train_hidden=hid["train"], train_cf=train_cf,
                         train_targets=targets, train_exclude=NoHistory(n_users + 1),
                         eval_hidden={"valid": hid["valid"], "test": hid["test"]}, candidates=cands,
                         train_users=np.arange(1, 1 + (train_users or n_users), dtype=np.int64),
                         shuffle_buffer=shuffle_buffer if mode == "streamed" else 0)
    load = time.perf_counter() - t
    cfg = TrainConfig(epochs=1, evals_per_epoch=1, batch_size=batch_size, train_negatives=3, hidden=hidden)
    fit = fit_heads(data, cfg, progress=False)
    read_fit = store.bytes_read if store else 0
    t = time.perf_counter()
    test = evaluate_on_tensors(fit.heads, data, ("test",))["test"]
    ev = time.perf_counter() - t
    return {"mode": mode, "users": n_users, "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "load_s": round(load, 2), "train_rows_per_s": round(len(data.train_users) / fit.step_seconds),
            "train_rows": len(data.train_users),
            "validation_s": round(fit.validation_seconds, 2), "eval_rows_per_s": round(n_users / ev),
            "bytes_read_training_GB": round(read_fit / 1e9, 3),
            "bytes_read_total_GB": round((store.bytes_read if store else 0) / 1e9, 3),
            "test_NDCG@10": round(test["NDCG@10"], 4), "valid_NDCG@10": round(fit.best["metrics"]["NDCG@10"], 4),
            "shuffle_buffer": data.shuffle_buffer, "batch_size": batch_size, "hidden": hidden}


def fits_in_memory(n_users: int) -> bool:
    from llmsrec.cache.stream import available_memory

    need = len(VIEWS) * (n_users + 1) * H * 4 + (n_users + 1) * D_CF * 4 + 2 * n_users * N_CAND * 8
    return need < available_memory() // 2


def bench(users=(100_000,), out=None, workdir=None, batch_size: int = 20, shuffle_buffer: int = 65_536,
          keep: bool = False, hidden: int = 2048, train_users: int = 0) -> list[dict]:
    """Build each cache, run both modes in subprocesses, print a table, write ``out`` (JSON)."""
    rows = []
    print(f"## heads at scale: H {H}, {N_ITEMS:,} items, readout out, batch {batch_size}, heads hidden {hidden}, "
          f"shuffle buffer {shuffle_buffer:,} rows")
    print(f"{'users':>10} {'mode':>10} {'peak RSS MB':>12} {'load s':>7} {'train rows/s':>13} "
          f"{'eval rows/s':>12} {'read GB':>8} {'test NDCG@10':>13}")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for n in users:
            cache = Path(tmp) / f"scale-{n}.h5"
            t = time.perf_counter()
            gb = build_cache(cache, n)
            print(f"# {n:,} users: cache {gb:.2f} GB written in {time.perf_counter() - t:.0f} s", flush=True)
            for mode in ("in-memory", "streamed"):
                if mode == "in-memory" and not fits_in_memory(n):
                    rows.append({"mode": mode, "users": n, "skipped": "does not fit in half the available memory"})
                    print(f"{n:>10,} {mode:>10} skipped: does not fit in half the available memory")
                    continue
                cmd = [sys.executable, __file__, "--run-mode", mode, "--cache", str(cache), "--users", str(n),
                       "--batch-size", str(batch_size), "--shuffle-buffer", str(shuffle_buffer), "--hidden", str(hidden),
                       "--train-users", str(train_users)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    raise RuntimeError(f"{mode} at {n} users failed:\n{p.stderr[-3000:]}")
                r = json.loads(p.stdout.strip().splitlines()[-1])
                rows.append(r)
                print(f"{n:>10,} {mode:>10} {r['peak_rss_MB']:>12,} {r['load_s']:>7.1f} {r['train_rows_per_s']:>13,} "
                      f"{r['eval_rows_per_s']:>12,} {r['bytes_read_total_GB']:>8.2f} {r['test_NDCG@10']:>13.4f}",
                      flush=True)
            if not keep:
                cache.unlink()
    mem = {r["users"]: r for r in rows if r["mode"] == "in-memory" and "skipped" not in r}
    for r in rows:
        if r["mode"] == "streamed" and r["users"] in mem:
            r["train_rows_per_s_vs_in_memory"] = round(r["train_rows_per_s"] / mem[r["users"]]["train_rows_per_s"], 3)
            print(f"{r['users']:>10,} streamed / in-memory training rows/s: {r['train_rows_per_s_vs_in_memory']:.2f}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        doc = {"H": H, "items": N_ITEMS, "batch_size": batch_size, "hidden": hidden, "shuffle_buffer": shuffle_buffer,
               "train_users": train_users or "all",
               "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None, "results": rows}
        Path(out).write_text(json.dumps(doc, indent=1) + "\n")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", default="100000", help="comma-separated user counts")
    ap.add_argument("--out", default=None, help="JSON file for the results (e.g. benchmarks/results/scale.json)")
    ap.add_argument("--dir", default=None, help="folder for the synthetic caches (default: the temp dir)")
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--shuffle-buffer", type=int, default=65_536)
    ap.add_argument("--hidden", type=int, default=2048, help="the heads' hidden width (default: the paper's)")
    ap.add_argument("--train-users", type=int, default=0,
                    help="train on users 1..N only (a partial epoch, for a quick run; 0: all, one epoch)")
    ap.add_argument("--keep", action="store_true", help="keep the caches")
    ap.add_argument("--run-mode", choices=["in-memory", "streamed"], help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.run_mode:
        print(json.dumps(run_mode(Path(a.cache), int(a.users), a.run_mode, a.batch_size, a.shuffle_buffer, a.hidden,
                                  a.train_users)))
        return 0
    bench([int(x) for x in a.users.split(",")], a.out, a.dir, a.batch_size, a.shuffle_buffer, a.keep, a.hidden,
          a.train_users)
    return 0


if __name__ == "__main__":
    sys.exit(main())
