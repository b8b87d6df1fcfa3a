"""Sharded precompute (torchrun): 1 vs 2 CPU processes, and a one-GPU estimate for Electronics.

Builds a slice of MovieLens-100k (the first ``--users`` users with all their interactions,
5-core ml-100k then re-prepared with ``kcore=1``, so its items are the items those users
rated), a random-weight SASRec (speed only), and runs ``llmsrec precompute --llm
smollm2-135m --views test`` on it twice, side by side: ``--nproc 1`` (one process, all
cores as torch threads) and ``--nproc 2`` (torchrun, cores split between the two). It
prints prompts/s and real tokens/s of the forward phase (items + user prompts; wall of
the slowest rank) and end to end (with process start and model loading), their ratio,
and the largest difference between the two caches' states.

Then an estimate of one GPU's precompute time for the paper's Electronics set (Table 10:
27,601 users, 31,533 items, 292,308 interactions) with LLaMA 3.2 3B (3.21 B parameters,
FLOP/token = 2 x params; attention over ~300-token prompts adds a few % and is ignored):
tokens = users x views x user-prompt tokens + items x item-prompt tokens, where the
template's own tokens are measured with the bundled tokenizer and the mean Electronics
title length is an assumption (``--title-tokens``, paper gives none); history slots per
prompt = min(W, mean input length) (an upper bound), padding as measured on the slice.

Run alone: ``python benchmarks/bench_distributed.py [--users 64] [--gpu-tflops 100]``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ELECTRONICS = {"users": 27_601, "items": 31_533, "interactions": 292_308}  # paper Table 10
LLAMA_3B_PARAMS = 3.21e9  # LLaMA 3.2 3B (-Instruct), embeddings included
VIEWS_DEFAULT = ("train", "valid", "test", "test-shuffled")  # `llmsrec precompute` default
_SUMMARY = re.compile(r"^precompute.*?: (\d+) prompts, (\d+) real tokens, padding ([\d.]+)%, "
                      r"wall ([\d.]+) s", re.M)


def make_slice(root: Path, users: int):
    """Prepared dataset of ml-100k's first ``users`` users (all their interactions)."""
    from llmsrec.data import prepare_from_interactions
    from llmsrec.data.loaders import prepare_ml100k

    if users < 2:
        raise SystemExit("--users: at least 2")
    full = prepare_ml100k(root / "ml-100k")
    inter = [(full.raw_users[u], full.raw_items[i], int(t))
             for u in range(1, min(users, full.n_users) + 1)
             for i, t in zip(full.seqs[u], full.timestamps[u])]
    titles = {full.raw_items[i]: full.titles[i] for i in range(1, full.n_items + 1)}
    # precompute never reads negatives: one each, so that tiny slices prepare too
    return prepare_from_interactions(inter, titles, root / "slice", kcore=1, num_negatives=1,
                                     stats_extra={"dataset": "ml-100k"})


def run(ds_root: Path, sasrec: Path, out: Path, nproc: int, threads: int) -> dict:
    """``llmsrec precompute --nproc N`` in a fresh process; its summary line parsed."""
    cmd = [sys.executable, "-m", "llmsrec", "precompute", "--data", str(ds_root), "--sasrec",
           str(sasrec), "--out", str(out), "--views", "test", "--llm", "smollm2-135m",
           "--nproc", str(nproc), "--threads", str(threads)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t
    found = _SUMMARY.findall(r.stderr)
    if r.returncode or not found:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    prompts, real, pad, fwd = found[-1]
    return {"prompts": int(prompts), "real": int(real), "padding": float(pad) / 100,
            "forward": float(fwd), "end_to_end": wall}


def template_tokens(window: int = 10) -> tuple[float, float, float]:
    """(user-prompt tokens besides its slots, tokens per slot besides its title, item-prompt
    tokens besides its title) of the current template with the bundled tokenizer.

    Measured with the placeholder title "Title": one more " Title" word per slot gives the
    title's own token count in context, which is subtracted."""
    from llmsrec.precompute.llm import load_llm
    from llmsrec.precompute.prompts import item_prompt, user_prompt

    tok = load_llm("smollm2-135m").tokenizer
    ts = np.full(window, 1_400_000_000)

    def user(title: str, k: int) -> int:
        p = user_prompt([""] + [title] * k, np.arange(1, k + 1), ts[:k], verb="purchases")
        return len(tok(p.text)["input_ids"])

    title = (user("Title Title", window) - user("Title", window)) / window
    per_slot = (user("Title", window) - user("Title", 1)) / (window - 1)
    base = user("Title", 1) - per_slot
    item = len(tok(item_prompt(["", "Title"], 1).text)["input_ids"]) - title
    return base, per_slot - title, item


def electronics_estimate(padding: float, title_tokens: float, gpu_tflops: float,
                         window: int = 10, views=VIEWS_DEFAULT) -> None:
    """Print the one-GPU precompute estimate for Electronics (see the module docstring)."""
    base, per_slot, item_base = template_tokens(window)
    mean_len = ELECTRONICS["interactions"] / ELECTRONICS["users"]
    cut = {"train": 3, "valid": 2, "test": 1}  # items left out of the input per view
    per_view = {v: ELECTRONICS["users"] * (base + min(window, mean_len - cut[v.removesuffix("-shuffled")])
                                          * (per_slot + title_tokens)) for v in views}
    user_tokens = sum(per_view.values())
    item_tokens = ELECTRONICS["items"] * (item_base + title_tokens)
    tokens = (user_tokens + item_tokens) / (1 - padding)
    flops = tokens * 2 * LLAMA_3B_PARAMS
    sec = flops / (gpu_tflops * 1e12)
    test_sec = sec * (per_view.get("test", 0.0) + item_tokens) / (user_tokens + item_tokens)
    print(f"Electronics estimate (one GPU, LLaMA 3.2 3B): {ELECTRONICS['users']:,} users x "
          f"{len(views)} views ({', '.join(views)}) + {ELECTRONICS['items']:,} items")
    print(f"  assumptions: mean title {title_tokens:.0f} tokens (--title-tokens; the paper gives "
          f"none), template {base:.0f} + {per_slot:.0f}/slot tokens per user prompt and "
          f"{item_base:.0f} per item prompt (bundled tokenizer), slots = min({window}, "
          f"{mean_len:.1f} - left-out items), padding {padding:.1%} (measured above)")
    print(f"  tokens: {user_tokens / 1e6:.1f} M user + {item_tokens / 1e6:.2f} M item "
          f"(+ padding) = {tokens / 1e6:.1f} M; x 2 x {LLAMA_3B_PARAMS / 1e9:.2f} B params = "
          f"{flops / 1e15:.0f} PFLOP")
    print(f"  at {gpu_tflops:.0f} TFLOP/s sustained (--gpu-tflops; e.g. ~1/3 of an A100's 312 "
          f"dense bf16 peak): {sec / 60:.1f} min ({tokens / sec:,.0f} tokens/s); the test view + "
          f"items alone: {test_sec / 60:.1f} min (paper Table 9: LLM-SRec inference on "
          f"Electronics 27.57 min on an A6000)")
    print("  with --nproc N on N such GPUs: about 1/N of that plus loading (the shards are "
          "token-balanced)")


def bench(users: int = 64, title_tokens: float = 25.0, gpu_tflops: float = 100.0) -> None:
    """1 vs 2 processes on a ml-100k slice, then the Electronics one-GPU estimate."""
    import h5py
    import torch

    from llmsrec.cfsrec import SASRec, SASRecConfig, save_sasrec

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        tmp = Path(tmp)
        ds = make_slice(tmp, users)
        torch.manual_seed(0)
        save_sasrec(SASRec(SASRecConfig(n_items=ds.n_items)).eval(), tmp / "sasrec")
        print(f"## sharded precompute: ml-100k slice of {ds.n_users} users / {ds.n_items} items "
              f"(items + test-view user prompts), SmolLM2-135M fp32, {cores} CPU cores")
        res = {}
        for n in (1, 2):
            res[n] = run(ds.root, tmp / "sasrec", tmp / f"c{n}.h5", n, max(1, cores // n))
        print(f"{'processes':>9} {'threads':>7} {'prompts':>7} {'tokens':>8} {'forward s':>9} "
              f"{'prompts/s':>9} {'tokens/s':>8} {'end-to-end s':>12} {'e2e prompts/s':>13}")
        for n, r in res.items():
            r["forward"] = max(r["forward"], 1e-9)
            print(f"{n:>9} {max(1, cores // n):>7} {r['prompts']:>7} {r['real']:>8} "
                  f"{r['forward']:>9.1f} {r['prompts'] / r['forward']:>9.1f} "
                  f"{r['real'] / r['forward']:>8.0f} {r['end_to_end']:>12.1f} "
                  f"{r['prompts'] / r['end_to_end']:>13.1f}")
        ratio = (res[2]["real"] / res[2]["forward"]) / (res[1]["real"] / res[1]["forward"])
        print(f"ratio 2 / 1 processes: forward tokens/s {ratio:.2f}x, end to end "
              f"{res[1]['end_to_end'] / res[2]['end_to_end']:.2f}x")
        with h5py.File(tmp / "c1.h5", "r") as a, h5py.File(tmp / "c2.h5", "r") as b:
            keys = ("items/hidden", "users/test/hidden")
            diff = max(float(np.abs(a[k][()] - b[k][()]).max()) for k in keys)
            scale = max(float(np.abs(a[k][()]).max()) for k in keys)
        print(f"largest |state difference| between the two caches: {diff:.2e} "
              f"(largest |state| {scale:.1f}; other batch shapes and thread counts)")
    electronics_estimate(res[1]["padding"], title_tokens, gpu_tflops)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=64, help="users of the ml-100k slice")
    ap.add_argument("--title-tokens", type=float, default=25.0,
                    help="assumed mean Electronics title length in tokens")
    ap.add_argument("--gpu-tflops", type=float, default=100.0,
                    help="assumed sustained GPU throughput of the forward, TFLOP/s")
    a = ap.parse_args()
    bench(a.users, a.title_tokens, a.gpu_tflops)
