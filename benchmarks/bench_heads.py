"""One LLM-SRec training epoch on cached states vs the same epoch with the LLM in the loop.

Prints, on MovieLens-100k (943 users, 1,349 items, SmolLM2-135M, d_llm 576, SASRec d 64):

* ``cached``: one epoch of :func:`llmsrec.heads.train.fit_heads` with the paper's settings
  (batch 20 users, 3 training negatives, heads 576 -> 2048 -> 128), including its 10
  validations, and the training steps alone;
* ``LLM in the loop``: the same epoch when every step runs the frozen LLM forward and
  backward (gradients to f_I and the two token vectors, as the paper's end-to-end
  training does) over the same prompts: each training user's ``train``-view prompt plus
  the item prompts of its target and 3 negatives. Measured on a slice of users (real
  tokens/s of forward+backward) and scaled by the epoch's real token count;
* their ratio (goal: >= 300x, cached epoch under 2 s on 2 cores).

Cached states come from ``$LLMSREC_BENCH_RUN`` (default ``runs/demo``: ``data/`` +
``cache/cache.h5`` of ``llmsrec run``) when present; otherwise random states with the
ml-100k shapes are used (the epoch's cost depends only on the shapes) and the output
says so. Run alone: ``python benchmarks/bench_heads.py [--slice-users N]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _tensors(ds, run_dir: Path):
    from llmsrec.heads.train import CachedTensors, load_cached_tensors

    cache = run_dir / "cache" / "cache.h5"
    if cache.is_file() and (run_dir / "data").is_dir():
        from llmsrec.data import load_prepared

        rds = load_prepared(run_dir / "data")
        return load_cached_tensors(rds, cache), f"cache {cache}"
    rng = np.random.default_rng(0)
    U, N, H, D = ds.n_users, ds.n_items, 576, 64
    inputs, targets = ds.view("train")
    data = CachedTensors(
        n_items=N,
        item_hidden=rng.standard_normal((N + 1, H), dtype=np.float32),
        train_hidden=rng.standard_normal((U + 1, H), dtype=np.float32),
        train_cf=rng.standard_normal((U + 1, D), dtype=np.float32),
        train_targets=np.asarray(targets, dtype=np.int64),
        train_exclude=[np.zeros(0, np.int64)] + [np.asarray(s[:-2]) for s in ds.seqs[1:]],
        eval_hidden={"valid": rng.standard_normal((U + 1, H), dtype=np.float32)},
        candidates={"valid": ds.candidates("valid")},
        train_users=np.array([u for u in range(1, U + 1) if len(inputs[u])], dtype=np.int64),
    )
    return data, f"random states with the ml-100k shapes (no {cache}; run `make demo` for the real cache)"


def cached_epoch(data, repeats: int = 3, train_negatives: int | str = 3) -> dict:
    """Seconds of one heads epoch (with its 10 validations) and of one validation."""
    import torch

    from llmsrec.metrics import ranking_metrics
    from llmsrec.heads.train import TrainConfig, fit_heads, score_candidates

    cfg = TrainConfig(epochs=1, seed=0, train_negatives=train_negatives)
    fit_heads(data, cfg, progress=False)  # warm-up: numba load, allocator, thread pool
    best = min(fit_heads(data, cfg, progress=False).seconds for _ in range(repeats))
    fit = fit_heads(data, TrainConfig(epochs=1, seed=0, evals_per_epoch=1, train_negatives=train_negatives),
                    progress=False)
    heads = fit.heads
    vh = torch.from_numpy(data.eval_hidden["valid"])
    ih = torch.from_numpy(data.item_hidden)
    vc = torch.from_numpy(data.candidates["valid"])
    t_val = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        ranking_metrics(score_candidates(heads, vh, ih, vc))
        t_val = min(t_val, time.perf_counter() - t)
    return {"epoch": best, "validation": t_val, "steps": max(best - 10 * t_val, 1e-9),
            "users": int(len(data.train_users)), "threads": torch.get_num_threads()}


def llm_in_the_loop(ds, slice_users: int = 4, window: int = 10, negatives: int = 3) -> dict:
    """Forward+backward tokens/s of the frozen LLM on a slice, and the epoch's real tokens."""
    import torch
    from torch import nn

    from llmsrec.heads.losses import sample_negatives
    from llmsrec.precompute.engine import tokenize_prompts
    from llmsrec.precompute.llm import ITEM_OUT, USER_OUT, load_llm
    from llmsrec.precompute.prompts import build_view, item_prompt

    t = time.perf_counter()
    llm = load_llm("smollm2-135m")
    t_load = time.perf_counter() - t
    H = llm.d_llm
    inputs, targets = ds.view("train")
    users = [u for u in range(1, ds.n_users + 1) if len(inputs[u])]
    vp = build_view(ds, "train", history_window=window)
    user_toks = tokenize_prompts(llm, [vp.prompts[u] for u in users], USER_OUT)
    item_toks = tokenize_prompts(llm, [item_prompt(ds.titles, i) for i in range(1, ds.n_items + 1)], ITEM_OUT)
    rng = np.random.default_rng(0)
    neg = sample_negatives([np.asarray(ds.seqs[u][:-2]) for u in users], targets[users], ds.n_items,
                           negatives, rng)
    per_user_items = np.concatenate([targets[users][:, None], neg], axis=1)  # (n, 1+K)
    item_len = np.array([len(t) for t in item_toks])
    epoch_tokens = int(sum(len(t) for t in user_toks) + item_len[per_user_items - 1].sum())

    # the trainable parts of the paper's end-to-end training (on top of the frozen LLM)
    torch.manual_seed(0)
    E = torch.randn(ds.n_items + 1, 64)
    f_I = nn.Sequential(nn.Linear(64, H), nn.LayerNorm(H), nn.LeakyReLU(), nn.Linear(H, H))
    tok_user = nn.Parameter(llm.embed.mean(0).clone())
    tok_item = nn.Parameter(llm.embed.mean(0).clone())
    head = nn.Linear(H, 128)
    params = [*f_I.parameters(), tok_user, tok_item, *head.parameters()]
    embed = llm.decoder.get_input_embeddings()

    def fwd_bwd(batch, out_vec):
        b, lmax = len(batch), max(len(p) for p in batch)
        ids = torch.zeros((b, lmax), dtype=torch.long)
        mask = torch.zeros((b, lmax), dtype=torch.long)
        for k, p in enumerate(batch):
            ids[k, : len(p)] = torch.from_numpy(p.ids)
            mask[k, : len(p)] = 1
        x = embed(ids).detach().clone()
        soft = f_I(E)
        for k, p in enumerate(batch):
            if len(p.soft_pos):
                x[k, torch.from_numpy(p.soft_pos)] = soft[torch.from_numpy(p.soft_items)]
            x[k, p.out_pos] = out_vec
        h = llm.decoder(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
        z = head(h[torch.arange(b), torch.tensor([p.out_pos for p in batch])])
        return z

    def step(i):
        u = user_toks[i]
        its = [item_toks[j - 1] for j in per_user_items[i]]
        zu = fwd_bwd([u], tok_user)
        zi = fwd_bwd(its, tok_item)
        loss = nn.functional.cross_entropy((zi @ zu[0])[None], torch.zeros(1, dtype=torch.long))
        for p in params:
            p.grad = None
        loss.backward()
        return len(u) + sum(len(x) for x in its)

    step(0)  # warm-up
    t = time.perf_counter()
    n_tok = sum(step(i) for i in range(1, 1 + slice_users))
    sec = time.perf_counter() - t
    return {"tokens_per_s": n_tok / sec, "slice_tokens": n_tok, "slice_seconds": sec, "slice_users": slice_users,
            "epoch_tokens": epoch_tokens, "epoch_seconds": epoch_tokens / (n_tok / sec), "load_seconds": t_load,
            "users": len(users)}


def bench(slice_users: int = 4, threads: int | None = None) -> None:
    """Cached heads epoch vs LLM-in-the-loop epoch on ml-100k, as a ratio."""
    import torch

    from llmsrec.data import load_prepared
    from llmsrec.data.loaders import prepare_ml100k

    if threads:
        torch.set_num_threads(threads)

    print("## LLM-SRec heads: one training epoch on cached states vs with the LLM in the loop (ml-100k)")
    run_dir = Path(os.environ.get("LLMSREC_BENCH_RUN", "runs/demo"))
    with tempfile.TemporaryDirectory() as tmp:
        ds = load_prepared(prepare_ml100k(Path(tmp) / "ml-100k").root)
        data, source = _tensors(ds, run_dir)
        c = cached_epoch(data)  # 3 negatives: the same work as the LLM-in-the-loop epoch below
        c_all = cached_epoch(data, train_negatives="all")
        print(f"cached states: {source}")
        print(f"torch threads {c['threads']}; {c['users']} training users, batch 20, 3 negatives, "
              f"heads {data.d_llm}->2048->128")
        print(f"cached epoch incl. 10 validations: {c['epoch']:.3f} s; training steps alone: "
              f"{c['steps']:.3f} s; one validation ({data.candidates['valid'].shape[0]} users x "
              f"{data.candidates['valid'].shape[1]} candidates): {c['validation'] * 1000:.1f} ms")
        l = llm_in_the_loop(ds, slice_users=slice_users)
        print(f"LLM in the loop (SmolLM2-135M fp32, forward+backward, f_I + tokens + head trainable): "
              f"{l['tokens_per_s']:.0f} real tokens/s measured on {l['slice_users']} users "
              f"({l['slice_tokens']:,} tokens, {l['slice_seconds']:.1f} s; model load {l['load_seconds']:.1f} s)")
        print(f"the epoch has {l['epoch_tokens']:,} real tokens ({l['users']} user prompts + 4 item prompts each)"
              f" -> {l['epoch_seconds']:,.0f} s = {l['epoch_seconds'] / 60:.1f} min (no padding counted)")
        print(f"{'epoch':<40} {'seconds':>10}")
        print(f"{'LLM in the loop (scaled)':<40} {l['epoch_seconds']:>10.1f}")
        print(f"{'cached, incl. 10 validations':<40} {c['epoch']:>10.3f}")
        print(f"{'cached, training steps alone':<40} {c['steps']:>10.3f}")
        print(f"{'cached, default full-catalogue softmax':<40} {c_all['epoch']:>10.3f}  (incl. validations; "
              f"{c_all['steps']:.3f} s steps alone)")
        print(f"speed-up: {l['epoch_seconds'] / c['epoch']:,.0f}x (incl. validations), "
              f"{l['epoch_seconds'] / c['steps']:,.0f}x (steps alone); goal >= 300x and < 2 s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slice-users", type=int, default=4, help="users whose prompts are timed with the LLM")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's choice]")
    a = p.parse_args()
    bench(a.slice_users, a.threads)
