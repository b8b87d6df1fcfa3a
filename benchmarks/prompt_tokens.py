"""Prompt tokens the frozen LLM would read for a prepared dataset, without running it.

Builds and tokenizes exactly the prompts ``llmsrec run`` precomputes by default (the
train-prefix view as one prompt tree per user, the ``defaults.PRECOMPUTE`` views, and the
item prompts), with the bundled model's tokenizer; the LLM never runs a forward. The
tree's tokens are what precompute forwards; "one forward per sample" is what the K
prefix samples would cost as separate prompts.

It also counts the tokens every prompt of a view shares at its start (the template's fixed
opening): what computing that prefix's keys and values once, instead of in every prompt,
would save at most.

    python benchmarks/prompt_tokens.py --data data/ml-1m
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmsrec.data import load_prepared  # noqa: E402
from llmsrec.defaults import HISTORY_WINDOW, LLM, LLMSREC_HEADS, PRECOMPUTE  # noqa: E402
from llmsrec.precompute.engine import tokenize_prompts  # noqa: E402
from llmsrec.precompute.llm import ITEM_OUT, USER_OUT, load_llm  # noqa: E402
from llmsrec.precompute.prompts import build_prefix_view, build_view, item_prompt  # noqa: E402
from llmsrec.precompute.readouts import tokenize_tree  # noqa: E402


def common_prefix(seqs) -> int:
    """Length of the longest token prefix shared by every sequence of ``seqs`` (int arrays)."""
    seqs = list(seqs)
    n = min(len(x) for x in seqs)
    first = seqs[0][:n]
    for x in seqs[1:]:
        neq = (x[:n] != first[:n]).nonzero()[0]
        if len(neq):
            n = int(neq[0])
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="prepared dataset folder")
    ap.add_argument("--llm", default=LLM["llm"])
    ap.add_argument("--prefixes", type=int, default=LLMSREC_HEADS["prefixes"])
    ap.add_argument("--views", default=",".join(PRECOMPUTE["views"]))
    ap.add_argument("--history-window", type=int, default=HISTORY_WINDOW)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    ds = load_prepared(a.data)
    llm = load_llm(a.llm)
    t = time.perf_counter()
    users = range(1, ds.n_users + 1)
    total, shared = 0, 0
    if a.prefixes:
        vp = build_prefix_view(ds, a.prefixes, history_window=a.history_window)
        trees = [tokenize_tree(llm, vp.prompts[u], USER_OUT) for u in users if vp.prompts[u]]
        n, naive = sum(len(x) for x in trees), sum(x.sample_tokens for x in trees)
        total += n
        c = common_prefix(x.ids for x in trees)
        shared += c * (len(trees) - 1)
        print(f"train-prefix (K={a.prefixes}, one tree per user): {len(trees):,} users, {n:,} tokens "
              f"({n / max(len(trees), 1):.1f}/user; one forward per sample: {naive:,})")
    for v in a.views.split(","):
        vpv = build_view(ds, v, history_window=a.history_window, seed=a.seed)
        ps = [vpv.prompts[u] for u in users if vpv.prompts[u] is not None]
        toks = tokenize_prompts(llm, ps, USER_OUT)
        n = sum(len(x) for x in toks)
        total += n
        c = common_prefix(x.ids for x in toks)
        shared += c * (len(toks) - 1)
        print(f"{v}: {len(ps):,} prompts, {n:,} tokens ({n / max(len(ps), 1):.1f}/prompt; "
              f"{c} shared by all)")
    items = tokenize_prompts(llm, [item_prompt(ds.titles, i) for i in range(1, ds.n_items + 1)], ITEM_OUT)
    n = sum(len(x) for x in items)
    total += n
    c = common_prefix(x.ids for x in items)
    shared += c * (len(items) - 1)
    print(f"items: {len(items):,} prompts, {n:,} tokens ({c} shared by all)")
    print(f"total: {total:,} tokens (built and tokenized in {time.perf_counter() - t:.1f} s)")
    print(f"shared prefix: a keys/values cache of each view's common opening would skip at most "
          f"{shared:,} tokens ({shared / total:.1%} of the total)")


if __name__ == "__main__":
    main()
