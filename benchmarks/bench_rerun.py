"""A head-only rerun of a finished run (``llmsrec run`` again with one head option changed: data,
SASRec and cache reused): where its time goes, and how far it is from the arithmetic floor.

The heads stage of such a rerun reads the cache (``load_cached_tensors``), trains
(``fit_heads``: steps and validations), evaluates the selected heads once on every view and
writes the heads folder; the run also hashes the cache to check that it may be reused. Each
part is timed here on the run of ``$LLMSREC_BENCH_RUN`` (default ``runs/demo``) with the run's
own head options (``heads/heads_config.json``). The training is timed on a slice (``--steps``
steps of the first training samples and 2 validations, seed 0), today's fp32 trainer and
``--step-dtype bf16`` side by side in one process (alternating, best of ``--reps``), and
scaled to the run's own schedule (its ``results.json``: steps run, validations). The floor is
a step's three matrix products over the item table (full-catalogue softmax) or the batch's
rows (sampled negatives) at the speed this CPU multiplies that shape (measured here).

The ``--fast`` recipe (``llmsrec.defaults.HEADS_FAST`` over the run's head options) is then
trained whole, fp32 and ``--step-dtype bf16``, on the same arrays: its training seconds, its
steps and its selected validation NDCG@10 beside the run's own, and the rerun it makes with the
same other parts.

Nothing here asserts a time; the goal line compares the reruns with 10 s. ``--clock cpu``
scales CPU seconds of this process instead of wall seconds (the steadier measure on a shared
machine with one torch thread). Run alone:
``python benchmarks/bench_rerun.py [--run RUN] [--steps N] [--reps R] [--threads T] [--clock cpu]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import types
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class _Clock:
    """Wall and CPU seconds of a block."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c
        return False


def _gflops(m: int, k: int, n: int, dtype, clock, reps: int = 5) -> float:
    """GFLOP/s of an (m, k) x (k, n) product in ``dtype`` on this CPU (best of ``reps``)."""
    import torch

    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    best = float("inf")
    for _ in range(reps):
        t = clock()
        a @ b
        best = min(best, clock() - t)
    return 2 * m * k * n / best / 1e9


@contextlib.contextmanager
def _loop_clock(clock):
    """``llmsrec.training``'s loop times its steps and validations with ``clock``."""
    from llmsrec import training

    saved = training.time
    training.time = types.SimpleNamespace(perf_counter=clock)
    try:
        yield
    finally:
        training.time = saved


def bench(run: str | None = None, steps: int = 20, reps: int = 2, clock: str = "wall") -> dict:
    """Time the parts of a head-only rerun; see the module docstring."""
    import torch

    tick = time.process_time if clock == "cpu" else time.perf_counter
    from llmsrec.data import load_prepared
    from llmsrec.heads.model import HeadsConfig, save_heads
    from llmsrec.heads.train import (
        EVAL_VIEWS, CachedTensors, TrainConfig, evaluate_on_tensors, fit_heads, load_cached_tensors, plot_history,
    )
    from llmsrec.run_layout import file_digest
    from llmsrec.training import write_history

    run = Path(run or os.environ.get("LLMSREC_BENCH_RUN", "runs/demo"))
    print(f"## head-only rerun of {run}: where the time goes (fp32 today vs --step-dtype bf16)")
    cache = run / "cache" / "cache.h5"
    if not cache.is_file() or not (run / "heads" / "results.json").is_file():
        print(f"skipped: no finished run at {run} (run `make demo` first)")
        return {}
    opts = json.loads((run / "heads" / "heads_config.json").read_text())["train"]
    done = json.loads((run / "heads" / "results.json").read_text())
    n_valid = sum(1 for _ in open(run / "heads" / "history.jsonl"))
    cfg = TrainConfig.from_options(**opts)
    ds = load_prepared(run / "data")
    parts: dict[str, _Clock] = {}
    with _Clock() as parts["hash the cache (stage check)"]:
        file_digest(cache)
    with _Clock() as parts["read the cache"]:
        data = load_cached_tensors(ds, cache, eval_views=EVAL_VIEWS, user_readout=cfg.user_readout,
                                   item_readout=cfg.item_readout, prefixes=cfg.prefixes)
    sub = CachedTensors(**{**{f: getattr(data, f) for f in data.__dataclass_fields__},
                           "train_users": np.asarray(data.train_users[: cfg.batch_size * steps])})
    sl = TrainConfig(**{**opts, "epochs": 1, "evals_per_epoch": 2})
    rates: dict[str, dict] = {}
    fit = None
    for r in range(reps):
        for mode in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
            with _loop_clock(tick):
                f = fit_heads(sub, sl, progress=False, step_dtype=mode)
            per = {"step": f.step_seconds / f.steps, "valid": f.validation_seconds / 2}
            if mode not in rates or per["step"] < rates[mode]["step"]:
                rates[mode] = per
            fit = f if mode == "fp32" else fit
    with _Clock() as parts["evaluate the selected heads (4 views)"]:
        evaluate_on_tensors(fit.heads, data, EVAL_VIEWS)
    with tempfile.TemporaryDirectory() as tmp, _Clock() as parts["write the heads folder"]:
        save_heads(fit.heads, tmp, extra={"train": opts})
        write_history(Path(tmp) / "history.jsonl", fit.history)
        plot_history(fit.history, Path(tmp) / "training_curve.png")
    other = sum(c.cpu if clock == "cpu" else c.wall for c in parts.values())
    print(f"{clock} seconds; torch threads {torch.get_num_threads()}; the run's schedule: {done['steps']} steps, {n_valid} "
          f"validations ({len(data.train_users):,} samples, batch {cfg.batch_size}, train_negatives "
          f"{cfg.train_negatives}, readouts {cfg.user_readout}/{cfg.item_readout})")
    for name, c in parts.items():
        print(f"  {name:<40} {c.wall:>7.2f} s wall {c.cpu:>7.2f} s CPU")
    train = {m: done["steps"] * v["step"] + n_valid * v["valid"] for m, v in rates.items()}
    print(f"training, slice of {steps} steps + 2 validations scaled to the schedule (best of {reps}, alternating):")
    print(f"  {'trainer':<8} {'ms/step':>8} {'ms/valid':>9} {'train s':>8} {'rerun s':>8}")
    for m, v in rates.items():
        print(f"  {m:<8} {1000 * v['step']:>8.0f} {1000 * v['valid']:>9.0f} {train[m]:>8.1f} {train[m] + other:>8.1f}")
    # the floor: three products per step over the rows f_item sees (and f_user's batch)
    h = HeadsConfig(d_llm=data.d_llm, d_cf=data.d_cf, hidden=cfg.hidden, user_readout=cfg.user_readout,
                    item_readout=cfg.item_readout, n_layers=data.n_layers, n_slots=data.n_slots)
    d_in_i = data.d_llm * (int("layers" in h.item_readout) + int("soft" in h.item_readout) or 1)
    d_in_u = data.d_llm * (int("layers" in h.user_readout) + int("slots" in h.user_readout) or 1)
    rows_i = data.n_items + 1 if cfg.train_negatives == "all" else cfg.batch_size * (1 + int(cfg.train_negatives))
    flop = 3 * 2 * cfg.hidden * (rows_i * d_in_i + cfg.batch_size * d_in_u)
    speed = {"fp32": _gflops(rows_i, d_in_i, cfg.hidden, torch.float32, tick),
             "bf16": _gflops(rows_i, d_in_i, cfg.hidden, torch.bfloat16, tick)}
    floor = {m: done["steps"] * flop / speed[m] / 1e9 for m in speed}
    print(f"floor: {flop / 1e9:.1f} GFLOP a step (f_item's {rows_i} x {d_in_i} x {cfg.hidden} products, forward, "
          f"weight and input gradients); this CPU: fp32 {speed['fp32']:.0f} GFLOP/s, bf16 {speed['bf16']:.0f} "
          f"-> the schedule's steps alone need {floor['fp32']:.0f} s fp32, {floor['bf16']:.0f} s bf16 "
          f"(measured steps {done['steps'] * rates['fp32']['step']:.0f} / {done['steps'] * rates['bf16']['step']:.0f} s)")
    best = min(train.values()) + other
    print(f"fp32 / bf16: {train['fp32'] / train['bf16']:.2f}x the training; goal rerun <= 10 s with the run's "
          f"head options: {'met' if best <= 10 else 'missed'} ({best:.0f} s at best)")
    fast = _fast(data, opts, tick, done, train["fp32"], other)
    return {"parts": {k: c.wall for k, c in parts.items()}, "rates": rates, "train": train, "floor": floor,
            "fast": fast}


def _fast(data, opts: dict, tick, done: dict, default_train: float, other: float) -> dict:
    """The --fast recipe trained whole on ``data`` (fp32 and bf16 steps), beside the run's own training."""
    from llmsrec.defaults import HEADS_FAST
    from llmsrec.heads.train import TrainConfig, fit_heads

    cfg = TrainConfig(**{**opts, **HEADS_FAST})
    print(f"--fast ({', '.join(f'{k} {v:g}' for k, v in HEADS_FAST.items())}), trained whole on the same arrays:")
    print(f"  {'trainer':<22} {'steps':>6} {'train s':>8} {'rerun s':>8} {'valid NDCG@10':>14} {'vs the run':>10}")
    print(f"  {'run (scaled, fp32)':<22} {done['steps']:>6} {default_train:>8.1f} {default_train + other:>8.1f} "
          f"{done['best']['metrics']['NDCG@10']:>14.4f}")
    out = {}
    for mode in ("fp32", "bf16"):
        with _loop_clock(tick):
            t = tick()
            f = fit_heads(data, cfg, progress=False, step_dtype=mode)
            sec = tick() - t
        v = f.best["metrics"]["NDCG@10"]
        out[mode] = {"steps": f.steps, "train": sec, "rerun": sec + other, "valid_ndcg10": v}
        print(f"  {'--fast, ' + mode:<22} {f.steps:>6} {sec:>8.1f} {sec + other:>8.1f} {v:>14.4f} "
              f"{default_train / sec:>9.1f}x")
    best = min(o["rerun"] for o in out.values())
    print(f"goal rerun <= 10 s with --fast: {'met' if best <= 10 else 'missed'} ({best:.1f} s at best; one seed, "
          f"the validation change over seeds 0-2 is in docs/results/speed.md)")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="finished run folder [default: $LLMSREC_BENCH_RUN or runs/demo]")
    ap.add_argument("--steps", type=int, default=20, help="training steps of the timed slice")
    ap.add_argument("--reps", type=int, default=2, help="repetitions of the slice, alternating fp32 and bf16")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's choice]")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="what is timed [default: wall]")
    a = ap.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    bench(a.run, a.steps, a.reps, a.clock)
