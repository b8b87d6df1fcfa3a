"""Prefix training samples: one prompt tree per user vs one forward per sample.

On the first N MovieLens-100k users with K prefix samples each (history window 10), runs
the same samples two ways with the bundled SmolLM2-135M, side by side in one process:

* ``tree``: ``llmsrec.precompute.readouts.forward_readouts`` on one prompt tree per user
  (the precompute path of ``--prefixes K``);
* ``naive``: ``llmsrec.precompute.engine.forward_batch`` on every sample's own prompt.

Prints tokens run, seconds and their ratios, and the largest difference between the two
results (they are equal up to float rounding).

Run alone: ``python benchmarks/bench_prefixes.py [--users N] [--k K]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch


def bench(n_users: int = 32, k: int = 5) -> None:
    from llmsrec.cfsrec import SASRec, SASRecConfig
    from llmsrec.data.loaders import prepare_ml100k
    from llmsrec.precompute.engine import forward_batch, make_batches, tokenize_prompts
    from llmsrec.precompute.fit import fit_moment_matched
    from llmsrec.precompute.llm import USER_OUT, load_llm
    from llmsrec.precompute.prompts import build_prefix_view
    from llmsrec.precompute.readouts import forward_readouts, tokenize_tree

    with tempfile.TemporaryDirectory(prefix="bench-prefixes-") as tmp:
        ds = prepare_ml100k(os.path.join(tmp, "ml"))
    torch.manual_seed(0)
    sas = SASRec(SASRecConfig(n_items=ds.n_items)).eval()  # random E: speed only
    llm = load_llm("smollm2-135m")
    E = sas.item_embeddings().detach().numpy()
    W, b = fit_moment_matched(E[1:], llm.embed.numpy())
    soft = torch.from_numpy(E @ W.T + b).float()
    out = llm.embed.mean(0)
    users = list(range(1, n_users + 1))
    vp = build_prefix_view(ds, k, users=users)
    trees = [tokenize_tree(llm, vp.prompts[u], USER_OUT) for u in users]
    flat = [t for u in users for t in tokenize_prompts(llm, vp.prompts[u], USER_OUT)]
    budget = 4096

    def run_tree():
        lengths = np.asarray([len(t) for t in trees])
        outs = []
        for bb in make_batches(lengths, np.argsort(lengths, kind="stable"), budget):
            outs.append((bb, forward_readouts(llm, [trees[i] for i in bb], soft, out, (), 10)["hidden"]))
        return outs

    def run_naive():
        lengths = np.asarray([len(t) for t in flat])
        res = np.zeros((len(flat), llm.d_llm), dtype=np.float32)
        for bb in make_batches(lengths, np.argsort(lengths, kind="stable"), budget):
            res[bb] = forward_batch(llm, [flat[i] for i in bb], soft, out).numpy()
        return res

    run_tree()  # warm-up
    t = time.perf_counter()
    tree_out = run_tree()
    t_tree = time.perf_counter() - t
    t = time.perf_counter()
    naive = run_naive()
    t_naive = time.perf_counter() - t
    # samples in tree order: per user its samples 0..K-1, in the order users were batched
    offsets = np.cumsum([0] + [len(t.out_pos) for t in trees])
    diff = 0.0
    for bb, h in tree_out:
        rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in bb])
        diff = max(diff, float(np.abs(h - naive[rows]).max()))
    n_tree, n_naive = sum(len(t) for t in trees), sum(len(t) for t in flat)
    print(f"{n_users} users x K={k} prefix samples ({len(flat)} samples), torch threads {torch.get_num_threads()}")
    print(f"tree : {n_tree:>8,} tokens {t_tree:7.1f} s  {n_tree / t_tree:6.0f} tokens/s")
    print(f"naive: {n_naive:>8,} tokens {t_naive:7.1f} s  {n_naive / t_naive:6.0f} tokens/s")
    print(f"naive / tree: {n_naive / n_tree:.2f}x tokens, {t_naive / t_tree:.2f}x seconds; "
          f"max |difference| of the [UserOut] states {diff:.2e}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--k", type=int, default=5)
    a = p.parse_args()
    bench(a.users, a.k)
