"""Table 9 on this machine: training minutes per epoch and inference minutes of the LLM4Rec
baselines and of LLM-SRec (e2e mode and cache mode), measured in one run on ml-100k.

Every model runs its real trainer on the same prompts (SmolLM2-135M, CPU fp32 unless
``--device``; batch 20 users, 3 sampled negatives, history window 10, as the paper):

* TALLRec, LLaRA, CoLLM (LoRA r 8 on q/v) and A-LLMRec (frozen LLM, stage 1 first):
  :class:`llmsrec.baselines.common.BaselineTrainer`; LLM-SRec e2e:
  :class:`llmsrec.e2e.loop.E2ETrainer` (f_I, the two tokens and the heads through the
  frozen LLM, Eq. 1-4).
  **train (min/epoch)** = the mean of ``--steps`` steps timed after one warm-up step, times
  the epoch's step count ceil(train users / 20): *scaled* from the measured steps, training
  steps only (an epoch's 10 validations are extra: each costs about one inference pass over
  the valid view). A-LLMRec's stage 1 (a one-off before the epochs) is printed apart.
  **inference (min)** = every item prompt + every ``test`` user prompt through the LLM with
  the model's inputs (no grad; the states change with training, so all are recomputed) +
  the heads' scores of 943 users x 100 candidates: the LLM part timed on a slice of
  ``--slice-users`` user and ``--slice-items`` item prompts and *scaled* by the real token
  counts of the test set; the scoring measured.
* LLM-SRec cache mode: **train** = one heads epoch on the cached tensors, *measured* in
  full (``llmsrec train`` defaults, full-catalogue softmax), its 10 validations included
  (milliseconds each; counting them only makes the ratios smaller);
  **inference** = the cache precompute of the ``test`` view (the frozen LLM over every test
  user prompt, the same ``forward_batch`` path as ``llmsrec precompute``, *scaled* from the
  same slice as LLM-SRec e2e) + the heads' scores (measured). The item states are in the
  cache already (computed once, before training), so they are not counted.

Ratios are against LLM-SRec cache mode. Inputs: ``$LLMSREC_BENCH_RUN`` (default
``runs/demo``: ``data/``, ``sasrec/``, ``cache/cache.h5``) when present, otherwise a fresh
ml-100k with an untrained SASRec and random cached states of the real shapes (the cost
depends only on shapes and prompt lengths). ``--quick``: a 40-user slice of ml-100k, batch
2, one timed step, slices of 2 user / 4 item prompts (a smoke run: its numbers are not
Table 9's).
Run alone: ``python benchmarks/bench_llm4rec.py [--quick] [--steps N] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODELS = ("tallrec", "llara", "collm", "allmrec", "llmsrec-e2e")
DISPLAY = {"tallrec": "TALLRec", "llara": "LLaRA", "collm": "CoLLM", "allmrec": "A-LLMRec",
           "llmsrec-e2e": "LLM-SRec (e2e)", "llmsrec-cache": "LLM-SRec (cache)"}


def _sync(llm):
    import torch

    if llm.device.type == "cuda":
        torch.cuda.synchronize()


def _trainer(model: str, ds, sasrec, llm, cfg_kw: dict, opts):
    """(trainer, stage-1 seconds or None) built as ``fit_baseline`` / ``train_e2e`` build them."""
    from llmsrec.e2e.loop import E2ETrainer, LLMInputs, load_e2e_data
    from llmsrec.heads.train import TrainConfig

    if model == "llmsrec-e2e":
        data = load_e2e_data(ds, sasrec, llm, views=("train", "test"))
        inputs = LLMInputs.initial(llm, data.E, titles=ds.titles)
        return E2ETrainer(data, llm, inputs, TrainConfig(**cfg_kw), opts), None
    from llmsrec.baselines import LoraOptions, Stage1Options, apply_lora, get_spec, load_baseline_data
    from llmsrec.baselines.common import BaselineTrainer, initial_inputs

    spec = get_spec(model)
    if spec.lora:
        apply_lora(llm, LoraOptions(), seed=0)
    data = load_baseline_data(ds, sasrec if spec.needs_sasrec else None, llm, model, views=("train", "test"))
    features, stage = data.E, None
    if spec.item_features is not None:
        t = time.perf_counter()
        features, _, _ = spec.item_features(ds, llm, data, Stage1Options(), 0, None)
        stage = time.perf_counter() - t
    inputs = initial_inputs(spec, llm, data, features, titles=ds.titles)
    if spec.lora:
        inputs.attach_lora(llm)
    cfg = TrainConfig(**{**cfg_kw, "distill": "none", "uniform": False})
    return BaselineTrainer(data, llm, inputs, cfg, opts), stage


def measure(model: str, ds, sasrec, *, steps: int = 2, batch_size: int = 20, slice_users: int = 24,
            slice_items: int = 96, device: str = "cpu", dtype: str | None = None, batch_tokens: int = 4096,
            grad_batch_tokens: int = 2048) -> dict:
    """Seconds of one training step (mean of ``steps`` after a warm-up) and of the test-set
    inference (LLM over every item and test user prompt, scaled from slices by tokens)."""
    import torch

    from llmsrec.e2e.loop import E2EOptions, compute_states, score_states
    from llmsrec.precompute.llm import ITEM_OUT, USER_OUT, load_llm

    t = time.perf_counter()
    llm = load_llm("smollm2-135m", device=device, dtype=dtype)
    opts = E2EOptions(device=device, dtype=dtype, batch_tokens=batch_tokens, grad_batch_tokens=grad_batch_tokens)
    tr, stage = _trainer(model, ds, sasrec, llm, dict(seed=0, train_negatives=3, batch_size=batch_size), opts)
    t_load = time.perf_counter() - t - (stage or 0.0)
    data = tr.data
    order = tr.rng.permutation(data.train_users)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    tr.step(batches[0])  # warm-up
    _sync(llm)
    timed = batches[1 : 1 + steps] or batches[:1]
    t = time.perf_counter()
    for b in timed:
        tr.step(b)
    _sync(llm)
    per_step = (time.perf_counter() - t) / len(timed)

    tr.heads.eval()
    tr.inputs.eval()
    test = [x for x in data.user_toks["test"][1:] if x is not None]
    rng = np.random.default_rng(0)
    us = [test[i] for i in rng.choice(len(test), size=min(slice_users, len(test)), replace=False)]
    its = [data.item_toks[i] for i in rng.choice(len(data.item_toks), size=min(slice_items, len(data.item_toks)),
                                                 replace=False)]
    with torch.no_grad():
        compute_states(llm, tr.inputs, us[:2], USER_OUT, batch_tokens)  # warm-up
        _sync(llm)
        t = time.perf_counter()
        compute_states(llm, tr.inputs, us, USER_OUT, batch_tokens)
        _sync(llm)
        t_users = time.perf_counter() - t
        t = time.perf_counter()
        compute_states(llm, tr.inputs, its, ITEM_OUT, batch_tokens)
        _sync(llm)
        t_items = time.perf_counter() - t
    tok = lambda xs: sum(len(x) for x in xs)  # noqa: E731
    users_s = t_users * tok(test) / tok(us)
    items_s = t_items * tok(data.item_toks) / tok(its)
    cand = data.candidates["test"]
    g = np.random.default_rng(1)
    uh = g.standard_normal((cand.shape[0], llm.d_llm), dtype=np.float32)
    ih = g.standard_normal((data.n_items + 1, llm.d_llm), dtype=np.float32)
    score_states(tr.heads, uh, ih, cand)  # warm-up
    t = time.perf_counter()
    score_states(tr.heads, uh, ih, cand)
    scoring = time.perf_counter() - t
    n_batches = len(batches)
    out = {"per_step": per_step, "steps_timed": len(timed), "n_batches": n_batches, "epoch": per_step * n_batches,
           "users_seconds": users_s, "items_seconds": items_s, "scoring": scoring,
           "inference": users_s + items_s + scoring, "user_ms": 1000 * t_users / len(us),
           "item_ms": 1000 * t_items / len(its), "test_prompts": len(test), "items": len(data.item_toks),
           "user_tokens": tok(test) / len(test), "item_tokens": tok(data.item_toks) / len(data.item_toks),
           "load": t_load, "stage1": stage, "device": str(llm.device),
           "dtype": str(llm.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
           "train_users": int(len(data.train_users))}
    del tr, llm, data
    gc.collect()
    return out


def cache_mode(data, repeats: int = 3) -> dict:
    """Seconds of one cached heads epoch (``llmsrec train`` defaults, its 10 validations
    included; best of ``repeats``) and of scoring the valid users x 100 candidates."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_heads import cached_epoch

    from llmsrec.heads.train import TrainConfig, fit_heads, score_candidates

    c = cached_epoch(data, repeats=repeats, train_negatives="all")
    heads = fit_heads(data, TrainConfig(epochs=1, seed=0, evals_per_epoch=1), progress=False).heads
    h = torch.from_numpy(data.eval_hidden["valid"])
    ih = torch.from_numpy(data.item_hidden)
    cand = torch.from_numpy(data.candidates["valid"])
    score_candidates(heads, h, ih, cand)
    t = time.perf_counter()
    score_candidates(heads, h, ih, cand)
    return {"epoch": c["epoch"], "validation": c["validation"], "scoring": time.perf_counter() - t,
            "users": c["users"]}


def _inputs(quick: bool, tmp: str):
    import torch

    from llmsrec.data import load_prepared
    from llmsrec.data.loaders import prepare_ml100k

    run_dir = Path(os.environ.get("LLMSREC_BENCH_RUN", "runs/demo"))
    if not quick and (run_dir / "data").is_dir() and (run_dir / "sasrec" / "model.safetensors").is_file():
        return load_prepared(run_dir / "data"), run_dir / "sasrec", run_dir, f"{run_dir}/data + {run_dir}/sasrec"
    from llmsrec.cfsrec import SASRec, SASRecConfig

    ds = load_prepared(prepare_ml100k(Path(tmp) / "ml-100k", max_users=40 if quick else None).root)
    torch.manual_seed(0)
    sas = SASRec(SASRecConfig(n_items=ds.n_items)).eval()
    what = "a 40-user slice of ml-100k" if quick else "freshly prepared ml-100k"
    return ds, sas, Path(tmp) / "no-run", f"{what} + an untrained SASRec (timing depends only on shapes)"


def bench(steps: int = 2, quick: bool = False, device: str = "cpu", dtype: str | None = None,
          threads: int | None = None, models=MODELS) -> dict:
    """Table 9 rows for the LLM4Rec baselines and LLM-SRec (e2e, cache), with ratios to cache mode."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_heads import _tensors

    if threads:
        torch.set_num_threads(threads)
    kw = dict(steps=1, batch_size=2, slice_users=2, slice_items=4) if quick else \
        dict(steps=steps, batch_size=20, slice_users=24, slice_items=96)
    print("## LLM4Rec baselines vs LLM-SRec: train minutes per epoch and inference minutes (Table 9, ml-100k)"
          + (" -- QUICK SMOKE, not Table 9" if quick else ""))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        ds, sasrec, run_dir, source = _inputs(quick, tmp)
        data, csource = _tensors(ds, run_dir)
        c = cache_mode(data, repeats=1 if quick else 3)
        print(f"inputs: {source}; cached states: {csource}")
        for m in models:
            t = time.perf_counter()
            rows[m] = r = measure(m, ds, sasrec, device=device, dtype=dtype, **kw)
            stage = f", stage 1 {r['stage1']:.1f} s (once)" if r["stage1"] is not None else ""
            print(f"{DISPLAY[m]:<16} step {r['per_step']:.2f} s (mean of {r['steps_timed']} after a warm-up) x "
                  f"{r['n_batches']} steps; per prompt: user {r['user_ms']:.0f} ms ({r['user_tokens']:.0f} tokens), "
                  f"item {r['item_ms']:.0f} ms ({r['item_tokens']:.0f} tokens); load + tokenize {r['load']:.1f} s"
                  f"{stage}; bench {time.perf_counter() - t:.0f} s", flush=True)
    e = rows.get("llmsrec-e2e")
    any_row = next(iter(rows.values()))
    rows["llmsrec-cache"] = {"epoch": c["epoch"], "inference": (e["users_seconds"] if e else math.nan) + c["scoring"]}
    print(f"setup: SmolLM2-135M {any_row['dtype']} on {any_row['device']}, torch threads {any_row['threads']}, "
          f"batch {kw['batch_size']} users, 3 sampled negatives; {any_row['train_users']} training users, "
          f"{any_row['test_prompts']} test user prompts, {any_row['items']} item prompts")
    base = rows["llmsrec-cache"]
    print(f"{'model':<18} {'train (min/epoch)':>18} {'inference (min)':>16} {'train x cache':>14} "
          f"{'inference x cache':>18}")
    for m, r in rows.items():
        print(f"{DISPLAY[m]:<18} {r['epoch'] / 60:>18.2f} {r['inference'] / 60:>16.2f} "
              f"{r['epoch'] / base['epoch']:>13,.0f}x {r['inference'] / base['inference']:>17,.1f}x")
    print("train: measured step time x steps per epoch (scaled), training steps only; LLM-SRec (cache): one heads "
          f"epoch measured, {c['epoch']:.2f} s incl. its 10 validations ({1000 * c['validation']:.1f} ms each)")
    print("inference: LLM over every item + test user prompt scaled by tokens from slices of "
          f"{kw['slice_users']} user / {kw['slice_items']} item prompts + heads scoring (measured); LLM-SRec (cache): "
          f"the test view's precompute (scaled the same way) + scoring ({1000 * c['scoring']:.1f} ms), items cached")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2, help="training steps timed after the warm-up step")
    p.add_argument("--quick", action="store_true", help="smoke run on a 40-user slice (numbers not Table 9's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or hpu")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 [default: fp32 on CPU, bf16 elsewhere]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's choice]")
    p.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    a = p.parse_args()
    bench(a.steps, a.quick, a.device, a.dtype, a.threads, tuple(x for x in a.models.split(",") if x))
