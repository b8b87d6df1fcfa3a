"""Benchmarks, run by ``make bench``: each section prints its own lines.

Add a section by writing a function that prints its results and appending it to
``BENCHES``. ``python benchmarks/bench.py NAME...`` runs only the named sections
(``--list`` shows them). Sections in ``OPTIONAL`` (long, or needing a lot of disk) run only
when named: ``make bench BENCH=scale SCALE_USERS=100000,1000000``. Timings are wall-clock
seconds on this machine; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _numpy_positive_ranks(scores: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """Reference: pessimistic 0-based rank of column 0 with a plain numpy argsort.

    The columns are reversed so the positive comes last; a stable descending sort then
    puts it after every candidate that ties with it, so its position is the number of
    other candidates with score >= it. Chunked only to bound the argsort's memory.
    """
    out = np.empty(scores.shape[0], dtype=np.int64)
    last = scores.shape[1] - 1
    for s in range(0, scores.shape[0], chunk):
        block = -scores[s : s + chunk, ::-1]
        order = np.argsort(block, axis=1, kind="stable")
        out[s : s + chunk] = np.argmax(order == last, axis=1)
    return out


def bench_ranking_metrics(n_users: int = 1_000_000, n_cand: int = 100) -> None:
    """llmsrec.metrics.ranking_metrics vs a numpy argsort reference."""
    from llmsrec.metrics import metrics_from_ranks, positive_ranks, ranking_metrics

    print(f"## ranking_metrics: {n_users:,} users x {n_cand} candidates (float32)")
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((n_users, n_cand), dtype=np.float32)
    scores[:, 0] += 1.0  # some signal, so the ranks are spread out
    # ties with the positive on ~1% of users, to exercise the pessimistic rule
    tie_rows = rng.choice(n_users, size=n_users // 100, replace=False)
    scores[tie_rows, 1] = scores[tie_rows, 0]

    t = time.perf_counter()
    ranking_metrics(scores[:10])  # numba compile, or load from its on-disk cache
    warm = time.perf_counter() - t

    t_numba, metrics = _best_of(lambda: ranking_metrics(scores), 3)
    t_numpy, ref_ranks = _best_of(lambda: _numpy_positive_ranks(scores), 1)
    ref = metrics_from_ranks(ref_ranks)
    same = np.array_equal(positive_ranks(scores), ref_ranks)
    import numba

    print(f"numba threads: {numba.get_num_threads()}; first call (compile or cache load, "
          f"excluded below): {warm:.2f} s")
    print(f"{'implementation':<34} {'seconds':>8} {'users/s':>14}")
    print(f"{'ranking_metrics (numba, best of 3)':<34} {t_numba:>8.3f} {n_users / t_numba:>14,.0f}")
    print(f"{'numpy argsort reference (1 run)':<34} {t_numpy:>8.3f} {n_users / t_numpy:>14,.0f}")
    print(f"speed-up numba / numpy: {t_numpy / t_numba:.1f}x; identical ranks: {same}; "
          f"NDCG@10 {metrics['NDCG@10']:.6f} (numpy {ref['NDCG@10']:.6f})")


def bench_sasrec_epoch(timed_epochs: int = 2) -> None:
    """One SASRec training epoch on MovieLens-100k (paper configuration, CPU)."""
    import torch

    from llmsrec.cfsrec import SASRec, SASRecConfig
    from llmsrec.cfsrec.train import TrainingData, evaluate_split, train_epoch
    from llmsrec.data import load_prepared
    from llmsrec.data.loaders import prepare_ml100k

    print("## SASRec epoch on ml-100k (hidden 64, 2 blocks, 1 head, maxlen 128, batch 128, CPU)")
    with tempfile.TemporaryDirectory() as tmp:
        ds = prepare_ml100k(Path(tmp) / "ml-100k")
        ds = load_prepared(ds.root)
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        cfg = SASRecConfig(n_items=ds.n_items)
        model = SASRec(cfg)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
        data = TrainingData.from_dataset(ds, cfg.maxlen)
        n_seq = int(data.uids.size)
        n_pos = int((data.targets != 0).sum())
        t = time.perf_counter()
        train_epoch(model, opt, data, rng, 128)  # warm-up (first-call overheads)
        warm = time.perf_counter() - t
        times = []
        for _ in range(timed_epochs):
            t = time.perf_counter()
            train_epoch(model, opt, data, rng, 128)
            times.append(time.perf_counter() - t)
        t_eval, _ = _best_of(lambda: evaluate_split(model, ds, "valid"), 1)
        sec = float(np.mean(times))
        print(f"torch threads: {torch.get_num_threads()}; {n_seq} training sequences, "
              f"{n_pos:,} target positions per epoch")
        print(f"warm-up epoch: {warm:.2f} s; mean of {timed_epochs} epochs: {sec:.2f} s/epoch, "
              f"{n_seq / sec:,.0f} sequences/s, {n_pos / sec:,.0f} positions/s")
        print(f"validation (943 users x 100 candidates): {t_eval:.2f} s")


def bench_precompute() -> None:
    """Precompute throughput (real tokens/s): batched fp32 at three token budgets, one prompt
    at a time, the fp32 roofline, bf16, int8 and one thread, side by side."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_precompute as b

    b.bench(budgets=(4096, 2048, 8192))


def bench_prefixes() -> None:
    """Prefix samples: one prompt tree per user vs one forward per sample (tokens, seconds)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_prefixes as b

    b.bench()


def bench_heads() -> None:
    """One LLM-SRec epoch on the cache vs the same epoch with the LLM in the loop."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_heads as b

    b.bench()


def bench_heads_default() -> None:
    """The default heads: a step's profile; per-step states vs prepared vs --step-dtype bf16."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_heads_default as b

    b.bench()


def bench_rerun() -> None:
    """A head-only rerun of the demo: its parts, fp32 vs --step-dtype bf16, and the FLOP floor."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_rerun as b

    b.bench()


def bench_sweep() -> None:
    """Head sweep on the ml-100k cache (the demo's grid, reduced schedule): one variant at a time vs --stack."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_sweep as b

    b.bench(samples=400, epochs=1, reps=2)  # the demo's own schedule is hours per path


def bench_e2e() -> None:
    """One e2e epoch (measured steps of the real trainer, scaled) vs one cached-heads epoch."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_e2e as b

    b.bench()


def bench_distributed() -> None:
    """Sharded precompute (torchrun) 1 vs 2 CPU processes on a ml-100k slice; Electronics GPU estimate."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_distributed as b

    b.bench()


def bench_llm4rec() -> None:
    """Table 9: train min/epoch and inference min of TALLRec, LLaRA, CoLLM, A-LLMRec, LLM-SRec e2e vs cache mode."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_llm4rec as b

    b.bench()


def bench_scale() -> None:
    """Heads training + evaluation at SCALE_USERS users (default 100000), in memory vs streamed (optional)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_scale as b

    users = [int(x) for x in os.environ.get("SCALE_USERS", "100000").split(",")]
    b.bench(users, out=os.environ.get("SCALE_OUT") or None, workdir=os.environ.get("SCALE_DIR") or None)


BENCHES = [bench_ranking_metrics, bench_sasrec_epoch, bench_precompute, bench_prefixes, bench_heads,
           bench_heads_default, bench_rerun, bench_sweep, bench_e2e,
           bench_distributed, bench_llm4rec]
#: run only when named
OPTIONAL = [bench_scale]


def main(argv: list[str] | None = None) -> int:
    names = {b.__name__.removeprefix("bench_"): b for b in BENCHES + OPTIONAL}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("only", nargs="*", help=f"sections to run (default: all): {', '.join(names)}")
    p.add_argument("--list", action="store_true", help="list the sections and exit")
    args = p.parse_args(argv)
    if args.list:
        for n, b in names.items():
            print(f"{n}: {b.__doc__.splitlines()[0]}")
        return 0
    unknown = [n for n in args.only if n not in names]
    if unknown:
        p.error(f"unknown section(s) {unknown}; known: {list(names)}")
    for n in args.only or [b.__name__.removeprefix("bench_") for b in BENCHES]:
        names[n]()
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
