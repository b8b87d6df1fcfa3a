"""One e2e epoch (the real ``llmsrec train --mode e2e`` trainer) next to one cached-heads epoch.

On MovieLens-100k with SmolLM2-135M (fp32, CPU unless ``--device``):

* ``e2e``: :class:`llmsrec.e2e.loop.E2ETrainer` steps -- batch 20 users, 3 training
  negatives, the frozen LLM forward and backward over the batch's ``train`` prompts and
  their candidates' item prompts, Adam on the heads, f_I and both tokens. ``--steps`` steps
  are timed after one warm-up step and scaled to the epoch's step count; one validation
  (every item prompt + every ``valid`` user prompt, no grad) is timed on a slice of
  prompts and scaled by the real token count. Epoch = steps + 10 validations, as the
  trainer's schedule does it. Measured on the real trainer, scaled only in the number of
  steps/prompts (the printout says which numbers are scaled);
* ``cached``: one epoch of the heads on cached states with the same 3 negatives and the
  same 10 validations (:func:`bench_heads.cached_epoch`);
* their ratio.

Inputs come from ``$LLMSREC_BENCH_RUN`` (default ``runs/demo``: ``data/``, ``sasrec/``,
``cache/cache.h5``) when present; otherwise a freshly prepared ml-100k, an untrained SASRec
and random cached states of the same shapes (timing depends only on shapes and prompt
lengths). Run alone: ``python benchmarks/bench_e2e.py [--steps N] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def e2e_epoch(ds, sasrec, *, steps: int = 2, device: str = "cpu", dtype: str | None = None,
              grad_batch_tokens: int = 2048, slice_users: int = 24, slice_items: int = 96,
              batch_size: int = 20) -> dict:
    """Seconds of e2e training steps (measured, scaled to an epoch) and of one validation.

    ``batch_size`` other than the paper's 20 is for smoke runs only (the epoch then has
    more, cheaper steps).
    """
    import torch

    from llmsrec.e2e.loop import E2EOptions, E2ETrainer, LLMInputs, compute_states, load_e2e_data
    from llmsrec.heads.train import TrainConfig
    from llmsrec.precompute.llm import ITEM_OUT, USER_OUT, load_llm

    t = time.perf_counter()
    llm = load_llm("smollm2-135m", device=device, dtype=dtype)
    data = load_e2e_data(ds, sasrec, llm, views=("train", "valid"))
    t_load = time.perf_counter() - t
    cfg = TrainConfig(seed=0, train_negatives=3, batch_size=batch_size)
    opts = E2EOptions(device=device, dtype=dtype, grad_batch_tokens=grad_batch_tokens)
    tr = E2ETrainer(data, llm, LLMInputs.initial(llm, data.E), cfg, opts)
    order = tr.rng.permutation(data.train_users)
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    sync = torch.cuda.synchronize if llm.device.type == "cuda" else (lambda: None)
    tr.step(batches[0])  # warm-up
    sync()
    t = time.perf_counter()
    for b in batches[1 : 1 + steps]:
        tr.step(b)
    sync()
    per_step = (time.perf_counter() - t) / steps
    step_tokens = [sum(len(data.user_toks["train"][u]) for u in b) for b in batches[1 : 1 + steps]]

    # one validation = every item prompt + every valid user prompt, no grad: time a slice
    vt = [data.user_toks["valid"][u] for u in range(1, data.n_users + 1)]
    rng = np.random.default_rng(0)
    us = [vt[i] for i in rng.choice(len(vt), size=min(slice_users, len(vt)), replace=False)]
    its = [data.item_toks[i] for i in rng.choice(len(data.item_toks), size=min(slice_items, len(data.item_toks)),
                                                 replace=False)]
    compute_states(llm, tr.inputs, us[:4], USER_OUT)  # warm-up
    t = time.perf_counter()
    compute_states(llm, tr.inputs, us, USER_OUT)
    compute_states(llm, tr.inputs, its, ITEM_OUT)
    sync()
    t_slice = time.perf_counter() - t
    slice_tok = sum(len(x) for x in us) + sum(len(x) for x in its)
    all_tok = sum(len(x) for x in vt) + sum(len(x) for x in data.item_toks)
    validation = t_slice * all_tok / slice_tok
    n_batches = len(batches)
    return {"per_step": per_step, "steps_timed": steps, "n_batches": n_batches,
            "epoch_steps": per_step * n_batches, "validation": validation,
            "epoch": per_step * n_batches + 10 * validation, "load": t_load,
            "user_tokens_per_step": float(np.mean(step_tokens)), "valid_tokens": all_tok,
            "no_grad_tokens_per_s": slice_tok / t_slice, "device": str(llm.device),
            "dtype": str(llm.dtype).removeprefix("torch."), "threads": torch.get_num_threads()}


def bench(steps: int = 2, device: str = "cpu", dtype: str | None = None, threads: int | None = None,
          grad_batch_tokens: int = 2048) -> None:
    """e2e epoch (measured steps, scaled) vs cached-heads epoch on ml-100k, as a ratio."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_heads import _tensors, cached_epoch

    from llmsrec.data import load_prepared
    from llmsrec.data.loaders import prepare_ml100k

    if threads:
        torch.set_num_threads(threads)
    print("## LLM-SRec: one e2e epoch (f_I + tokens + heads through the frozen LLM) vs one cached epoch (ml-100k)")
    run_dir = Path(os.environ.get("LLMSREC_BENCH_RUN", "runs/demo"))
    with tempfile.TemporaryDirectory() as tmp:
        if (run_dir / "data").is_dir() and (run_dir / "sasrec" / "model.safetensors").is_file():
            ds = load_prepared(run_dir / "data")
            sasrec, source = run_dir / "sasrec", f"{run_dir}/data + {run_dir}/sasrec"
        else:
            from llmsrec.cfsrec import SASRec, SASRecConfig

            ds = load_prepared(prepare_ml100k(Path(tmp) / "ml-100k").root)
            torch.manual_seed(0)
            sasrec = SASRec(SASRecConfig(n_items=ds.n_items)).eval()
            source = "freshly prepared ml-100k + an untrained SASRec (timing depends only on shapes)"
        data, csource = _tensors(ds, run_dir)
        c = cached_epoch(data)
        e = e2e_epoch(ds, sasrec, steps=steps, device=device, dtype=dtype, grad_batch_tokens=grad_batch_tokens)
    print(f"inputs: {source}; cached states: {csource}")
    print(f"e2e: SmolLM2-135M {e['dtype']} on {e['device']}, torch threads {e['threads']}, batch 20 users, "
          f"3 negatives, grad-batch-tokens {grad_batch_tokens}; load + tokenize {e['load']:.1f} s")
    print(f"e2e step: {e['per_step']:.2f} s (mean of {e['steps_timed']} measured steps after a warm-up; "
          f"{e['user_tokens_per_step']:,.0f} user-prompt tokens per step + 4 item prompts per user)")
    print(f"e2e validation: {e['validation']:.1f} s (scaled from a slice at {e['no_grad_tokens_per_s']:.0f} "
          f"tokens/s to {e['valid_tokens']:,} tokens: every item + every valid user prompt)")
    print(f"{'epoch':<52} {'seconds':>10}")
    print(f"{'e2e, steps (measured per step x ' + str(e['n_batches']) + ')':<52} {e['epoch_steps']:>10.1f}")
    print(f"{'e2e, incl. 10 validations (scaled)':<52} {e['epoch']:>10.1f}")
    print(f"{'cached, 3 negatives, incl. 10 validations':<52} {c['epoch']:>10.3f}")
    print(f"{'cached, training steps alone':<52} {c['steps']:>10.3f}")
    print(f"speed-up of the cache: {e['epoch'] / c['epoch']:,.0f}x per epoch incl. validations, "
          f"{e['epoch_steps'] / c['steps']:,.0f}x training steps alone "
          f"(e2e epoch = {e['epoch'] / 60:.1f} min, {math.ceil(e['n_batches'])} steps)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2, help="e2e steps timed after the warm-up step")
    p.add_argument("--device", default="cpu", help="cpu, cuda or hpu")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 [default: fp32 on CPU, bf16 elsewhere]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's choice]")
    p.add_argument("--grad-batch-tokens", type=int, default=2048, help="e2e graph-keeping forward budget")
    a = p.parse_args()
    bench(a.steps, a.device, a.dtype, a.threads, a.grad_batch_tokens)
