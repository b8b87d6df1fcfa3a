"""Precompute throughput on the bundled model.

Prints three numbers side by side, in real (non-padding) tokens per second, on 256
MovieLens-100k ``test``-view user prompts (history window 10):

* ``batched``: the precompute path (prompts sorted by length, token-budget batches,
  right padding, ``torch.inference_mode``, sdpa attention, no KV cache);
* ``one-by-one``: the same prompts, one forward each;
* ``roofline``: measured fp32 matmul GFLOP/s / (2 x non-embedding parameters) FLOPs/token;
* ``bf16``: the batched path with the model loaded in bfloat16 (``precompute --dtype bf16``),
  and how far its ``[UserOut]`` states are from fp32's (relative L2 error, cosine);
* ``int8``: the batched path with torch's dynamic int8 quantization of every linear layer
  (weights per tensor, activations per batch), measured only: it is not a precompute option,
  because its states drift by about 40% relative L2 (SmolLM2's activations have outliers);
* ``1 thread``: the batched fp32 path with one torch thread instead of all.

Run alone: ``python benchmarks/bench_precompute.py [--prompts N] [--budgets 2048,4096]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    """Best-of-``reps`` fp32 GFLOP/s of an ``n x n @ n x n`` matmul (2 n^3 FLOPs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _setup(n_prompts: int):
    from llmsrec.cfsrec import SASRec, SASRecConfig
    from llmsrec.data.loaders import prepare_ml100k
    from llmsrec.precompute.engine import tokenize_prompts
    from llmsrec.precompute.fit import fit_ridge, title_embedding_means
    from llmsrec.precompute.llm import USER_OUT, load_llm
    from llmsrec.precompute.prompts import build_view

    with tempfile.TemporaryDirectory(prefix="bench-precompute-") as tmp:
        ds = prepare_ml100k(os.path.join(tmp, "ml"))
    torch.manual_seed(0)
    sas = SASRec(SASRecConfig(n_items=ds.n_items)).eval()  # random E: speed only
    llm = load_llm("smollm2-135m")
    E = sas.item_embeddings().detach().numpy()
    emb = llm.embed.numpy()
    W, b = fit_ridge(E[1:], title_embedding_means(llm.tokenizer, emb, ds.titles)[1:])
    soft = torch.from_numpy(E @ W.T + b)
    users = range(1, n_prompts + 1)
    vp = build_view(ds, "test", history_window=10, users=users)
    toks = tokenize_prompts(llm, [vp.prompts[u] for u in users], USER_OUT)
    out = torch.from_numpy(emb.mean(0))
    return llm, toks, soft, out


def _batched(llm, toks, soft, out, budget, mask=True):
    """(real tokens/s, padding fraction, batches, float32 [UserOut] states (n, d)) of the
    precompute path, timed after one warm-up batch."""
    from llmsrec.precompute.engine import forward_batch, make_batches

    lengths = np.asarray([len(t) for t in toks])
    order = np.argsort(lengths, kind="stable")
    batches = make_batches(lengths, order, budget)
    forward_batch(llm, [toks[i] for i in batches[0]], soft, out, attention_mask=mask)
    states = np.zeros((len(toks), soft.shape[1]), np.float32)
    t = time.perf_counter()
    padded = 0
    for bb in batches:
        states[bb] = forward_batch(llm, [toks[i] for i in bb], soft, out, attention_mask=mask).float().numpy()
        padded += int(lengths[bb].max()) * len(bb)
    wall = time.perf_counter() - t
    return lengths.sum() / wall, 1 - lengths.sum() / padded, len(batches), states


def _one_by_one(llm, toks, soft, out):
    from llmsrec.precompute.engine import forward_batch

    t = time.perf_counter()
    for p in toks:
        forward_batch(llm, [p], soft, out)
    return sum(len(p) for p in toks) / (time.perf_counter() - t)


def _drift(h, h32) -> str:
    rel = np.linalg.norm(h - h32, axis=1) / np.linalg.norm(h32, axis=1)
    cos = (h * h32).sum(1) / (np.linalg.norm(h, axis=1) * np.linalg.norm(h32, axis=1))
    return (f"[UserOut] states vs fp32: relative L2 mean {rel.mean():.4f}, max {rel.max():.4f}; "
            f"cosine mean {cos.mean():.5f}, min {cos.min():.5f}")


def _int8(llm):
    """A shallow copy of ``llm`` whose decoder's linear layers are dynamically int8-quantized."""
    import copy
    import warnings

    q = copy.copy(llm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = torch.ao.quantization.quantize_dynamic(copy.deepcopy(llm.decoder), {torch.nn.Linear},
                                                     dtype=torch.qint8)
    object.__setattr__(q, "decoder", dec)
    return q


def bench(n_prompts: int = 256, budgets=(4096,), extra: bool = False) -> None:
    """Print batched vs one-by-one vs roofline tokens/s for the bundled SmolLM2-135M."""
    llm, toks, soft, out = _setup(n_prompts)
    n_params = sum(p.numel() for p in llm.decoder.parameters())
    n_emb = llm.decoder.get_input_embeddings().weight.numel()
    flops_tok = 2 * (n_params - n_emb)
    gflops = matmul_gflops()
    roof = gflops * 1e9 / flops_tok
    real = sum(len(t) for t in toks)
    print(f"precompute bench: {len(toks)} ml-100k test-view user prompts, {real} real tokens "
          f"(mean {real / len(toks):.0f}), {torch.get_num_threads()} threads")
    print(f"  roofline   {roof:8.0f} tok/s  (fp32 matmul {gflops:.0f} GFLOP/s, "
          f"{flops_tok / 1e6:.0f} MFLOP/token = 2 x {(n_params - n_emb) / 1e6:.1f} M non-embedding params)")
    h32 = None
    for budget in budgets:
        tps, pad, nb, states = _batched(llm, toks, soft, out, budget)
        if h32 is None:
            t32, h32 = tps, states
        print(f"  batched    {tps:8.0f} tok/s  ({tps / roof:.0%} of roofline; budget {budget} "
              f"tokens, {nb} batches, padding {pad:.1%})")
        if extra:
            tps2 = _batched(llm, toks, soft, out, budget, mask=False)[0]
            print(f"  batched, no attention mask {tps2:8.0f} tok/s ({tps2 / roof:.0%})")
    tps1 = _one_by_one(llm, toks, soft, out)
    print(f"  one-by-one {tps1:8.0f} tok/s  ({tps1 / roof:.0%} of roofline)")
    from llmsrec.precompute.llm import load_llm

    llm16 = load_llm("smollm2-135m", dtype="bf16")
    t16, _, _, h16 = _batched(llm16, toks, soft.to(torch.bfloat16), out.to(torch.bfloat16), budgets[0])
    print(f"  bf16       {t16:8.0f} tok/s  ({t16 / t32:.2f}x batched fp32 at budget {budgets[0]}; "
          f"{_drift(h16, h32)})")
    del llm16
    t8, _, _, h8 = _batched(_int8(llm), toks, soft, out, budgets[0])
    print(f"  int8       {t8:8.0f} tok/s  ({t8 / t32:.2f}x; dynamic quantization of the linear layers, "
          f"not an option: {_drift(h8, h32)})")
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
        t1 = _batched(llm, toks, soft, out, budgets[0])[0]
        torch.set_num_threads(threads)
        print(f"  1 thread   {t1:8.0f} tok/s  ({t1 / t32:.2f}x batched fp32 with {threads} threads)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--budgets", default="4096")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--extra", action="store_true", help="also time without attention mask")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    bench(a.prompts, tuple(int(x) for x in a.budgets.split(",")), a.extra)
