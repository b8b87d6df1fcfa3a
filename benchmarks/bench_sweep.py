"""Head sweeps on one cache: today's path (one variant after another) vs ``--stack`` (variants
trained together, ``llmsrec.heads.stacked``), side by side in one process.

The grid is the demo's (``examples/sweep.toml``: lr x training negatives x distillation loss x
L_Uniform, up to 10 epochs, patience 10) on top of the run's own head options, as
``llmsrec sweep --run RUN --grid examples/sweep.toml [--stack N]`` trains it, on the cache of
``$LLMSREC_BENCH_RUN`` (default ``runs/demo``). The cache is read once; then each stack group
(variants that differ only in how they are optimised) is trained both ways, the order
alternating between repetitions, and the best of the repetitions is kept. Printed per group
and in all: seconds and variants per minute of both paths, their ratio, and whether both
select the same step with the same validation metrics (goal: >= 20 variants per minute).
``--clock cpu`` times CPU seconds of this process instead of wall seconds (on a shared
machine, with one torch thread, the steadier measure of the ratio).

A reduced schedule for a loaded machine: ``--samples N`` trains on the first N training
samples only, ``--epochs`` and ``--evals-per-epoch`` override the grid's (``make bench`` runs
``--samples 400 --epochs 1 --reps 2``: the demo's own schedule is hours per path). Run alone:
``python benchmarks/bench_sweep.py [--run RUN] [--grid FILE] [--stack N] [--samples N] ...``.
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GRID = Path(__file__).resolve().parents[1] / "examples" / "sweep.toml"


def _time(fn, clock=time.perf_counter):
    t = clock()
    out = fn()
    return clock() - t, out


def bench(run: str | None = None, grid: str | Path = GRID, stack: int = 12, samples: int | None = None,
          epochs: int | None = None, evals_per_epoch: int | None = None, reps: int = 1, clock: str = "wall") -> dict:
    """Today's path vs stacked on the grid (see the module docstring); returns the totals."""
    from llmsrec.data import load_prepared
    from llmsrec.experiments.sweep import expand_grid, load_grid
    from llmsrec.heads.stacked import fit_stacked, stack_groups
    from llmsrec.heads.train import CachedTensors, fit_heads, load_cached_tensors

    run = Path(run or os.environ.get("LLMSREC_BENCH_RUN", "runs/demo"))
    print(f"## sweep: today's path (one variant at a time) vs --stack {stack}, {Path(grid).name} on {run}")
    if not (run / "cache" / "cache.h5").is_file():
        print(f"skipped: no cache at {run}/cache/cache.h5 (run `make demo` first)")
        return {}
    try:
        base = json.loads((run / "heads" / "heads_config.json").read_text())["train"]
    except (OSError, ValueError, KeyError):
        base = {}
    g, fixed = load_grid(grid)
    over = {k: v for k, v in (("epochs", epochs), ("evals_per_epoch", evals_per_epoch)) if v is not None}
    variants = expand_grid(g, {**fixed, **over}, base)
    cfgs = [c for _, c in variants]
    ds = load_prepared(run / "data")
    c0 = cfgs[0]
    t_read, data = _time(lambda: load_cached_tensors(ds, run / "cache" / "cache.h5", eval_views=("valid",),
                                                     user_readout=c0.user_readout, item_readout=c0.item_readout,
                                                     prefixes=c0.prefixes))
    if len({(c.user_readout, c.item_readout, c.prefixes) for c in cfgs}) > 1:
        print("skipped: the grid varies what is read from the cache (readouts, prefixes); one read is timed here")
        return {}
    if samples:
        data = CachedTensors(**{**{f: getattr(data, f) for f in data.__dataclass_fields__},
                                "train_users": np.asarray(data.train_users[:samples])})
    import torch

    print(f"{len(cfgs)} variants, torch threads {torch.get_num_threads()}, {len(data.train_users):,} training "
          f"samples{' (reduced)' if samples else ''}, epochs {c0.epochs}, {c0.evals_per_epoch} validations/epoch; "
          f"cache read once: {t_read:.1f} s")
    groups = stack_groups(cfgs, stack)
    tick = time.process_time if clock == "cpu" else time.perf_counter
    print(f"{clock} seconds; {reps} repetition(s), the order alternating, best kept")
    print(f"{'group':<44} {'n':>3} {'today s':>8} {'stacked s':>9} {'ratio':>6} {'same best step':>14} "
          f"{'max |dNDCG@10|':>14}")
    tot = {"today": 0.0, "stacked": 0.0}
    for gi in groups:
        gc = [cfgs[i] for i in gi]
        best = {"today": float("inf"), "stacked": float("inf")}
        res = {}
        for r in range(reps):
            for path in (("today", "stacked") if r % 2 == 0 else ("stacked", "today")):
                if path == "today":
                    s, out = _time(lambda: [fit_heads(data, c, progress=False) for c in gc], tick)
                else:
                    s, out = _time(lambda: fit_stacked(data, gc), tick)
                best[path] = min(best[path], s)
                res[path] = out
        same = sum(a.best["step"] == b.best["step"] for a, b in zip(res["today"], res["stacked"]))
        diff = max(abs(a.best["metrics"]["NDCG@10"] - b.best["metrics"]["NDCG@10"])
                   for a, b in zip(res["today"], res["stacked"]))
        label = ", ".join(f"{k}={variants[gi[0]][0][k]}" for k in variants[gi[0]][0]
                          if len({str(variants[i][0][k]) for i in gi}) == 1) or "-"
        print(f"{label[:44]:<44} {len(gi):>3} {best['today']:>8.1f} {best['stacked']:>9.1f} "
              f"{best['today'] / best['stacked']:>5.2f}x {f'{same}/{len(gi)}':>14} {diff:>14.2e}")
        for k in tot:
            tot[k] += best[k]
    rate = {k: 60 * len(cfgs) / v for k, v in tot.items()}
    print(f"all {len(cfgs)} variants: today {tot['today']:.1f} s ({rate['today']:.1f} variants/minute), stacked "
          f"{tot['stacked']:.1f} s ({rate['stacked']:.1f} variants/minute): {tot['today'] / tot['stacked']:.2f}x; "
          + ("goal (>= 20 variants/minute on the grid's own schedule): not measured, reduced schedule"
             if samples or over else f"goal >= 20 variants/minute: {'met' if rate['stacked'] >= 20 else 'missed'}"))
    return {"seconds": tot, "variants_per_minute": rate, "read_seconds": t_read}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="run folder [default: $LLMSREC_BENCH_RUN or runs/demo]")
    ap.add_argument("--grid", default=str(GRID), help="sweep grid TOML [default: examples/sweep.toml]")
    ap.add_argument("--stack", type=int, default=12, help="variants trained together at most")
    ap.add_argument("--samples", type=int, default=None, help="train on the first N samples only (reduced)")
    ap.add_argument("--epochs", type=int, default=None, help="override the grid's epochs (reduced)")
    ap.add_argument("--evals-per-epoch", type=int, default=None, help="override the validations per epoch")
    ap.add_argument("--reps", type=int, default=1, help="repetitions, alternating the order; best kept")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's choice]")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="what is timed [default: wall]")
    a = ap.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    bench(a.run, a.grid, a.stack, a.samples, a.epochs, a.evals_per_epoch, a.reps, a.clock)
