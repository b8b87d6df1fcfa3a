"""Head sweeps on one cache: full trainings per minute, 1 process vs 2 processes.

Trains the same 8-variant grid (lr x uniform x seed, the paper's head schedule: 3 sampled
negatives, up to 10 epochs, 10 validations per epoch, patience 10) on the ml-100k cache of
``$LLMSREC_BENCH_RUN`` (default ``runs/demo``, made by ``make demo``) with ``--jobs 1`` and
``--jobs 2``, side by side, and prints variants per minute (goal: >= 20 on 2 cores).
Run alone: ``python benchmarks/bench_sweep.py``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

GRID = """
[grid]
lr = [1e-4, 3e-4]
uniform = [true, false]
seed = [0, 1]

[fixed]
train_negatives = 3
epochs = 10
patience = 10
"""


def bench() -> None:
    from llmsrec.experiments.sweep import sweep

    run = Path(os.environ.get("LLMSREC_BENCH_RUN", "runs/demo"))
    print("## sweep: 8 head variants (paper schedule) on the ml-100k cache")
    if not (run / "cache" / "cache.h5").is_file():
        print(f"skipped: no cache at {run}/cache/cache.h5 (run `make demo` first)")
        return
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / "grid.toml"
        grid.write_text(GRID)
        for jobs in (1, 2):
            t = time.perf_counter()
            res = sweep(run / "data", run / "cache" / "cache.h5", grid, Path(tmp) / f"j{jobs}",
                        jobs=jobs, progress=False, log=lambda m: None)
            wall = time.perf_counter() - t
            rates[jobs] = 60 * res["variants"] / wall
            print(f"--jobs {jobs}: {res['variants']} variants in {wall:.1f} s incl. loading and the best's "
                  f"retrain+test ({rates[jobs]:.1f} variants/minute; best valid NDCG@10 "
                  f"{res['best']['valid']['NDCG@10']:.4f})")
    print(f"ratio --jobs 2 / --jobs 1: {rates[2] / rates[1]:.2f}x; goal >= 20 variants/minute: "
          f"{'met' if max(rates.values()) >= 20 else 'missed'} ({max(rates.values()):.1f})")


if __name__ == "__main__":
    bench()
