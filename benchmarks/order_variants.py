"""Collect the head variants trained on one cache into a markdown + JSON record.

Reads the ``results.json`` of each heads folder given (``llmsrec train --out DIR``) and
writes one row per folder: its readouts, prefix samples and distillation, validation
NDCG@10 (what defaults are chosen on), test NDCG@10 / HR@10, test NDCG@10 on the shuffled
test view and its change, training seconds.

``python benchmarks/order_variants.py --out benchmarks/results/order-variants-ml100k DIR...``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(d: Path) -> dict:
    res = json.loads((d / "results.json").read_text())
    c = res["config"]
    t, s = res["test"]["NDCG@10"], res.get("test-shuffled", {}).get("NDCG@10")
    return {"dir": str(d), "user_readout": c.get("user_readout", "out"), "item_readout": c.get("item_readout", "out"),
            "prefixes": c.get("prefixes", 1), "distill": c["distill"], "seed": c["seed"],
            "valid NDCG@10": res["valid"]["NDCG@10"], "test NDCG@10": t, "test HR@10": res["test"]["HR@10"],
            "test-shuffled NDCG@10": s, "change": (s / t - 1) if s is not None else None,
            "train_seconds": res["train_seconds"], "best_epoch": res["best"]["epoch"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="path without suffix: writes OUT.json and OUT.md")
    p.add_argument("--title", default="ml-100k, SmolLM2-135M cache: head variants")
    p.add_argument("dirs", nargs="+")
    a = p.parse_args()
    rows = [row(Path(d)) for d in a.dirs]
    Path(a.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [f"# {a.title}", "", "| f_user reads | f_item reads | prefixes | L_Distill | seed | valid NDCG@10 | "
             "test NDCG@10 | test HR@10 | shuffled NDCG@10 | change | train s |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ch = f"{100 * r['change']:+.2f}%" if r["change"] is not None else "n/a"
        sh = f"{r['test-shuffled NDCG@10']:.4f}" if r["test-shuffled NDCG@10"] is not None else "n/a"
        lines.append(f"| {r['user_readout']} | {r['item_readout']} | {r['prefixes']} | "
                     f"{'yes' if r['distill'] != 'none' else 'no'} | {r['seed']} | {r['valid NDCG@10']:.4f} | "
                     f"{r['test NDCG@10']:.4f} | {r['test HR@10']:.4f} | {sh} | {ch} | {r['train_seconds']:.0f} |")
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
