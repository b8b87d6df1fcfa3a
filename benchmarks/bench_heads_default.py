"""The default heads on the ml-100k cache: where a training step's time goes, and today's
trainer side by side with the per-step work it used to redo.

The default heads (``llmsrec.defaults``: 5 prefix samples per user, f_user on
``layers+slots``, f_item on ``layers+soft``, full-catalogue softmax, batch 20, 10
validations per epoch) need every item's f_item at every step, so a step costs about three
matrix products of (N+1) x (2 d_llm) x hidden = 1,350 x 1,152 x 2,048 whatever the batch.
Printed, in CPU seconds of this process (``time.process_time``, steadier than wall time on a
shared machine; wall time is printed beside it):

* a profile of one training step by part: f_user / f_item forward, losses, backward, Adam;
  and of one validation (943 users x 100 candidates);
* the same slice of training (``--steps`` steps and 2 validations, seed 0) three ways, side
  by side in one process: ``per step`` (the states layer-normalised and the slot masks found
  again at every step and validation, as the trainer did before ``Prepared``), ``prepared``
  (today's default: done once per training; identical weights, checked here) and
  ``--step-dtype bf16`` (bfloat16 autocast of the steps; not identical);
* what a whole default training of seed 0 then costs (its schedule: 1,534 steps and 65
  validations) and the cache read of ``llmsrec train``.

Needs the cache of ``$LLMSREC_BENCH_RUN`` (default ``runs/demo``: ``data/`` + ``cache/cache.h5``
of ``llmsrec run``); skipped without it. Run alone: ``python benchmarks/bench_heads_default.py
[--steps N] [--threads T]``. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: the schedule of the seed-0 default training on the ml-100k cache (its results.json: early
#: stop after 1,534 steps, validation every 23-24 steps); used to scale the measured slice
SEED0_STEPS, SEED0_VALIDATIONS = 1534, 65


class _Clock:
    """CPU and wall seconds of a block."""

    def __enter__(self):
        self.c, self.w = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu, self.wall = time.process_time() - self.c, time.perf_counter() - self.w
        return False


@contextlib.contextmanager
def per_step_states():
    """The trainer as before ``Prepared``: ``prepare_user`` / ``prepare_item`` hand the raw
    states on, so every forward layer-normalises them and finds the slot masks again."""
    from llmsrec.heads.model import LLMSRecHeads

    saved = LLMSRecHeads.prepare_user, LLMSRecHeads.prepare_item
    LLMSRecHeads.prepare_user = LLMSRecHeads.prepare_item = lambda self, h: h
    try:
        yield
    finally:
        LLMSRecHeads.prepare_user, LLMSRecHeads.prepare_item = saved


@contextlib.contextmanager
def loop_cpu_clock():
    """``llmsrec.training``'s loop times its steps and validations in CPU seconds of this
    process instead of wall seconds (the machine may be shared)."""
    import types

    from llmsrec import training

    saved = training.time
    training.time = types.SimpleNamespace(perf_counter=time.process_time)
    try:
        yield
    finally:
        training.time = saved


def load_default(run_dir: Path):
    """The default heads' cached tensors of ``run_dir`` (valid view only) and the read's seconds."""
    from llmsrec.data import load_prepared
    from llmsrec.defaults import LLMSREC_HEADS
    from llmsrec.heads.train import load_cached_tensors

    ds = load_prepared(run_dir / "data")
    with _Clock() as c:
        data = load_cached_tensors(ds, run_dir / "cache" / "cache.h5", eval_views=("valid",), **LLMSREC_HEADS)
    return data, c


def step_profile(data, steps: int = 6) -> dict:
    """CPU seconds of each part of a default training step (mean of ``steps``) and of a validation."""
    import torch

    from llmsrec.defaults import LLMSREC_HEADS
    from llmsrec.heads.losses import LossConfig, exclusion_mask, full_retrieval_loss, total_loss
    from llmsrec.heads.model import HeadsConfig, LLMSRecHeads
    from llmsrec.heads.train import _rows, score_candidates
    from llmsrec.metrics import ranking_metrics

    torch.manual_seed(0)
    heads = LLMSRecHeads(HeadsConfig(d_llm=data.d_llm, d_cf=data.d_cf, user_readout=LLMSREC_HEADS["user_readout"],
                                     item_readout=LLMSREC_HEADS["item_readout"], n_layers=data.n_layers,
                                     n_slots=data.n_slots))
    opt = torch.optim.Adam(heads.parameters(), lr=1e-4, betas=(0.9, 0.98), fused=True)
    item_h = heads.prepare_item(torch.from_numpy(data.item_hidden))
    user_h = heads.prepare_user(torch.from_numpy(data.train_hidden))
    cf = torch.from_numpy(data.train_cf)
    lcfg = LossConfig()
    order = np.random.default_rng(0).permutation(data.train_users)
    parts = dict.fromkeys(["f_user forward", "f_item forward (all items)", "losses", "backward", "Adam"], 0.0)
    for i in range(steps + 1):
        users = order[i * 20 : (i + 1) * 20]
        idx = torch.from_numpy(users)
        tg = data.train_targets[users]
        t = [time.process_time()]
        u = heads.user(_rows(user_h, idx))
        t.append(time.process_time())
        e = heads.item(item_h)
        t.append(time.process_time())
        mask = exclusion_mask([data.train_exclude[x] for x in users], tg, data.n_items)
        r = full_retrieval_loss(u, e, torch.from_numpy(tg), mask)
        loss, _ = total_loss(r, u, heads.cf_user(cf[idx]), lcfg)
        t.append(time.process_time())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.process_time())
        opt.step()
        t.append(time.process_time())
        if i:  # the first step warms up
            for k, a, b in zip(parts, t, t[1:]):
                parts[k] += (b - a) / steps
    valid_h = heads.prepare_user(torch.from_numpy(data.eval_hidden["valid"]))
    cand = torch.from_numpy(data.candidates["valid"])
    ranking_metrics(score_candidates(heads, valid_h, item_h, cand))  # warm-up: numba's first call
    with _Clock() as v:
        ranking_metrics(score_candidates(heads, valid_h, item_h, cand))
    with per_step_states(), _Clock() as v_raw:
        ranking_metrics(score_candidates(heads, torch.from_numpy(data.eval_hidden["valid"]),
                                         torch.from_numpy(data.item_hidden), cand))
    return {"parts": parts, "validation": v.cpu, "validation_per_step_states": v_raw.cpu}


def slice_run(data, steps: int, mode: str) -> dict:
    """``steps`` default training steps and 2 validations of seed 0 (the first ``20 * steps``
    training samples as the epoch): CPU/wall seconds, the loop's split, a digest of the weights."""
    import torch

    from llmsrec.defaults import LLMSREC_HEADS
    from llmsrec.heads.train import CachedTensors, TrainConfig, fit_heads

    sub = CachedTensors(**{**{f: getattr(data, f) for f in data.__dataclass_fields__},
                           "train_users": np.asarray(data.train_users[: 20 * steps])})
    cfg = TrainConfig(epochs=1, evals_per_epoch=2, **LLMSREC_HEADS)
    ctx = per_step_states() if mode == "per step" else contextlib.nullcontext()
    with ctx, loop_cpu_clock(), _Clock() as c:
        fit = fit_heads(sub, cfg, progress=False, step_dtype="bf16" if mode == "bf16" else "fp32")
    h = hashlib.sha256()
    for v in fit.heads.state_dict().values():
        h.update(v.numpy().tobytes())
    return {"cpu": c.cpu, "wall": c.wall, "step": fit.step_seconds / fit.steps, "validation": fit.validation_seconds / 2,
            "setup": c.cpu - fit.seconds, "digest": h.hexdigest()[:12], "ndcg": fit.best["metrics"]["NDCG@10"]}


def bench(steps: int = 40, threads: int | None = None) -> None:
    """Profile of a default-heads step; the training slice per step vs prepared vs bf16."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(os.environ.get("LLMSREC_BENCH_RUN", "runs/demo"))
    print("## default heads on the ml-100k cache: where a step's time goes; per-step states vs prepared vs bf16")
    if not (run_dir / "cache" / "cache.h5").is_file():
        print(f"skipped: no cache at {run_dir}/cache/cache.h5 (run `make demo` first)")
        return
    data, read = load_default(run_dir)
    print(f"torch threads {torch.get_num_threads()}; cache read (llmsrec train's load_cached_tensors, valid view): "
          f"{read.wall:.1f} s wall; {len(data.train_users):,} training samples, items x T_i "
          f"{data.item_hidden.shape[0]} x {data.item_hidden.shape[1]}, users x T_u {data.train_hidden.shape[1]}")
    p = step_profile(data)
    total = sum(p["parts"].values())
    print(f"one step, CPU ms (mean of 6): " + ", ".join(f"{k} {1000 * v:.0f} ({100 * v / total:.0f}%)"
                                                        for k, v in p["parts"].items()) + f"; total {1000 * total:.0f}")
    print(f"one validation, CPU ms: {1000 * p['validation']:.0f} prepared vs {1000 * p['validation_per_step_states']:.0f} "
          f"with the states normalised again")
    runs = {}
    for mode in ("per step", "prepared", "bf16", "per step", "prepared", "bf16"):  # interleaved, best of 2
        r = slice_run(data, steps, mode)
        if mode not in runs or r["cpu"] < runs[mode]["cpu"]:
            runs[mode] = r
    print(f"{steps} steps + 2 validations of seed 0 (best of 2, interleaved; CPU time; setup = reading the "
          f"arrays onto the device and preparing the states):")
    print(f"{'trainer':<12} {'CPU s':>7} {'wall s':>7} {'ms/step':>8} {'ms/valid':>9} {'setup s':>8} "
          f"{'valid NDCG@10':>13} {'weights':>13}")
    for mode, r in runs.items():
        print(f"{mode:<12} {r['cpu']:>7.2f} {r['wall']:>7.2f} {1000 * r['step']:>8.0f} {1000 * r['validation']:>9.0f} "
              f"{r['setup']:>8.2f} {r['ndcg']:>13.4f} {r['digest']:>13}")
    same = runs["per step"]["digest"] == runs["prepared"]["digest"]
    base = runs["per step"]
    print(f"per step / prepared: {base['step'] / runs['prepared']['step']:.2f}x a step, "
          f"{base['validation'] / runs['prepared']['validation']:.2f}x a validation, identical weights: {same}; "
          f"per step / bf16: {base['step'] / runs['bf16']['step']:.2f}x a step")
    est = {m: r["setup"] + SEED0_STEPS * r["step"] + SEED0_VALIDATIONS * r["validation"] for m, r in runs.items()}
    print(f"a whole seed-0 default training ({SEED0_STEPS} steps, {SEED0_VALIDATIONS} validations) at these rates, "
          f"CPU s: " + ", ".join(f"{m} {s:.0f}" for m, s in est.items())
          + f"; prepared {est['per step'] / est['prepared']:.2f}x, bf16 {est['per step'] / est['bf16']:.2f}x faster")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="training steps of the timed slice")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's choice]")
    a = ap.parse_args()
    bench(a.steps, a.threads)
